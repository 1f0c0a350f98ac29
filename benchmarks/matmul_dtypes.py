"""Why `--dtype bfloat16` is not twice float32 on a CPU, even one with AVX512-BF16 and AMX.

The weights of one bench-checkpoint Delay decode step (8 Qwen3 layers of hidden 512 + the 32 x 1025
audio heads: 168 MB in float32, 84 MB in bf16) pushed through the matmuls a step runs, at 1 and 16
rows, in float32, bfloat16 and float16, with 1 and 2 threads. Prints the time and the rate at which
each reads its weights, next to a streaming `sum()` (the memory's read bandwidth). Half the bytes
pay only if the kernel keeps up with memory; a kernel that converts slower than memory delivers
reads at its own pace.

    .venv/bin/python benchmarks/matmul_dtypes.py
"""
import torch
import torch.nn.functional as F
from timing import best

SHAPES = [(1024, 512), (512, 512), (3072, 512), (512, 1536)] * 8 + [(32800, 512)]  # qkv, o, gate|up, down; heads


def streaming_read_rate() -> float:
    """GB/s that a plain sum() reads a 256 MB tensor at: the memory's read bandwidth."""
    big = torch.randn(64 * 1024 * 1024)
    return big.numel() * 4 / best(lambda: big.sum(), 5) / 1e9


def main() -> None:
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(f"{threads} thread(s): streaming sum() {streaming_read_rate():.1f} GB/s")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            weights = [torch.randn(n, k).to(dtype) for n, k in SHAPES]
            total = sum(w.numel() * w.element_size() for w in weights)
            for rows in (1, 16):
                x = {k: torch.randn(rows, k).to(dtype) for k in (512, 1536)}
                linear = best(lambda: [F.linear(x[w.shape[1]], w) for w in weights], 7)
                line = (f"  {str(dtype).removeprefix('torch.'):8s} {rows:2d} row(s), {total / 1e6:3.0f} MB: "
                        f"F.linear {linear * 1e3:6.2f} ms ({total / linear / 1e9:4.1f} GB/s)")
                if rows == 1:
                    mv = best(lambda: [torch.mv(w, x[w.shape[1]][0]) for w in weights], 7)
                    line += f", torch.mv {mv * 1e3:6.2f} ms ({total / mv / 1e9:4.1f} GB/s)"
                print(line)


if __name__ == "__main__":
    main()
