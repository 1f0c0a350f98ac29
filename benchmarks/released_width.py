"""The Delay engine at a released model's layer width, float32 and bfloat16 in one run.

The bench checkpoint (hidden 512) reads 168 MB of weights per float32 step; its batch-1 step
spends about as long in its ~400 small ops (norms, rotary, cache writes, attention, sampling) as
in its matmuls, and those ops cost the same in either dtype. The released models are wider:
MOSS-VoiceGenerator is a Qwen3-1.7B (hidden 2048, 16 query / 8 KV heads of 128, MLP 6144,
n_vq 16), MOSS-TTS a Qwen3-8B. This builds (once, in the bench cache) a random Delay checkpoint of
the 1.7B's width with fewer layers, runs `mossserve bench` on it in both dtypes, and prints the
throughput, the batch-1 step against its weight-bandwidth floor, and bfloat16 over float32.

    .venv/bin/python benchmarks/released_width.py [LAYERS] [FRAMES]
"""
import sys

from mossserve.bench.checkpoint import bench_checkpoint
from mossserve.bench.engine import run_engine_bench

WIDTH = {"hidden": 2048, "intermediate": 6144, "heads": 16, "kv_heads": 8, "head_dim": 128, "n_vq": 16}
CONTROL = 64.0  # keeps the control logit on top through layers of this width (checkpoint.py)

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
frames = int(sys.argv[2]) if len(sys.argv) > 2 else 16
path = bench_checkpoint(family="delay", layers=layers, control=CONTROL, **WIDTH)  # built once, into the cache

results = {}
for dtype in ("float32", "bfloat16"):
    r = run_engine_bench(model=path, dtype=dtype, frames=frames, requests=16, ttfa_runs=1,
                         log=lambda message: print(message, file=sys.stderr))
    results[dtype] = r
    f = r["floors"]
    print(f"{dtype:8s} audio s/s at 1/4/16: {r['throughput']['1']:.2f} / {r['throughput']['4']:.2f} / "
          f"{r['throughput']['16']:.2f}; batch-1 step {f['step_s_1'] * 1e3:.1f} ms, floor "
          f"{f['step_floor_s_1'] * 1e3:.1f} ms ({f['weight_bytes_per_step'] / 1e6:.0f} MB at "
          f"{f['memory_bandwidth_gb_s']:.1f} GB/s): {f['step_s_1'] / f['step_floor_s_1']:.2f}x the floor; "
          f"step at 16 {f['step_s_16'] * 1e3:.1f} ms")
fp32, bf16 = results["float32"]["throughput"], results["bfloat16"]["throughput"]
print("bfloat16 / float32 at 1/4/16: " + " / ".join(f"{bf16[c] / fp32[c]:.2f}" for c in ("1", "4", "16")))
