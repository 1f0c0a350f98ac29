"""The engine's figures on a CUDA GPU, in one short run (scripts/gpu_check.sh runs it after the
CUDA tests), bfloat16 with CUDA graphs:

1. the bench checkpoint (`mossserve bench`'s default model): throughput at 1/4/16 streams, first
   audio against its floor, the batch-1 step against the GPU's weight-bandwidth floor;
2. a Delay checkpoint of MOSS-TTS's layer width (Qwen3-8B: hidden 4096, MLP 12288, 32 query / 8 KV
   heads of 128, n_vq 32) with fewer layers (built once into the bench cache; a layer of the 8B's
   reads the same bytes whatever the count): the same figures, and 32 streams.

Each run's JSON goes to OUT_DIR/<name>.json, and a line per run to stdout.

    python3 benchmarks/gpu.py OUT_DIR [LAYERS] [FRAMES]
"""
import json
import sys
from pathlib import Path

from mossserve.bench.checkpoint import bench_checkpoint
from mossserve.bench.engine import run_engine_bench

WIDTH_8B = {"hidden": 4096, "intermediate": 12288, "heads": 32, "kv_heads": 8, "head_dim": 128, "n_vq": 32}
CONTROL_8B = 256.0  # keeps the control logit on top through layers of this width (checkpoint.py)

out = Path(sys.argv[1])
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
frames = int(sys.argv[3]) if len(sys.argv) > 3 else 32
out.mkdir(parents=True, exist_ok=True)
say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

runs = {
    "bench_checkpoint": dict(model=None, requests=16, concurrency=(1, 4, 16)),
    f"width_8b_{layers}_layers": dict(model=bench_checkpoint(family="delay", layers=layers, control=CONTROL_8B,
                                                             **WIDTH_8B),
                                      requests=32, concurrency=(1, 4, 16, 32)),
}
for name, run in runs.items():
    result = run_engine_bench(device="cuda", dtype="bfloat16", frames=frames, ttfa_runs=3, log=say, **run)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    f, t = result["floors"], result["throughput"]
    print(f"{name}: {result['parameters'] / 1e9:.2f} B parameters; audio s/s at "
          + " / ".join(f"{c}: {t[c]:.1f}" for c in t)
          + f"; speedup_16 {result['speedup_16']:.1f}; first audio {result['ttfa_s'] * 1e3:.0f} ms "
          f"({result['ttfa_ratio']:.2f}x its floor), at 16 {result['ttfa_16_vs_1']:.2f}x; decode step at 1 "
          f"{f['decode_step_s_1'] * 1e3:.2f} ms against a {f['step_floor_s_1'] * 1e3:.2f} ms floor "
          f"({f['weight_bytes_per_step'] / 1e9:.2f} GB at {f['memory_bandwidth_gb_s']:.0f} GB/s): "
          f"{f['decode_step_s_1'] / f['step_floor_s_1']:.2f}x; peak GPU memory "
          f"{result['peak_device_memory_mb']:.0f} MB", flush=True)
