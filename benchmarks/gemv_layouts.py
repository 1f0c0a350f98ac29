"""The weights of one bench-checkpoint Delay decode step (8 Qwen3 layers of hidden 512 + the 32 x 1025
audio heads: 168 MB fp32) pushed through batch-1 and batch-16 matmuls in the two weight layouts:
N-major (out, in), as checkpoints store them and `layers/heads.py` multiplies them, and K-major
(in, out). Prints the time and the bandwidth each layout reaches next to a streaming `sum()`.

    .venv/bin/python benchmarks/gemv_layouts.py
"""
import torch
from timing import best

torch.set_num_threads(2)


shapes = [(1024, 512), (512, 512), (3072, 512), (512, 1536)] * 8 + [(32800, 512)]  # qkv, o, gate|up, down; heads
n_major = [torch.randn(n, k) for n, k in shapes]
k_major = [w.t().contiguous() for w in n_major]
total = sum(w.numel() * 4 for w in n_major)
for batch in (1, 16):
    x = {k: torch.randn(batch, k) for k in (512, 1536)}
    n = best(lambda: [w @ x[w.shape[1]].T for w in n_major], 15)
    k = best(lambda: [x[w.shape[0]] @ w for w in k_major], 15)
    print(f"batch {batch}: {total / 1e6:.0f} MB of weights; N-major {n * 1e3:.2f} ms ({total / n / 1e9:.1f} GB/s), "
          f"K-major {k * 1e3:.2f} ms ({total / k / 1e9:.1f} GB/s)")
big = torch.randn(64 * 1024 * 1024)
print(f"streaming sum(): {big.numel() * 4 / best(lambda: big.sum(), 5) / 1e9:.1f} GB/s")
