#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run on a machine whose python3 holds a CUDA torch
# and the packages these need (no install; audio I/O, the server and Ray are not used):
#   1. the CUDA tests: graph decode steps (Delay, Fish's slow backbone, Local's and Realtime's depth loops), the codec
#      on the GPU, the codec thread on its own CUDA stream;
#   2. benchmarks/gpu.py: the engine's figures in bfloat16 (bench checkpoint; MOSS-TTS's 8B width).
# Logs and JSON go to $OUT (default gpu_out/). Usage: scripts/gpu_check.sh [LAYERS] [FRAMES]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
python3 -m pytest -q -rs -p no:cacheprovider tests/test_engine.py tests/test_engine_api.py tests/test_local_engine.py \
    tests/test_realtime_offline.py tests/test_fish_generation.py tests/test_codec_loader.py tests/test_fish_codec.py -k cuda 2>&1 | tee "$out/cuda_tests.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu.py "$out" "${1:-8}" "${2:-32}" 2>"$out/gpu_bench.log"
bench=$?
echo "cuda tests: exit $tests; bench: exit $bench (log: $out/gpu_bench.log)"
exit $((tests || bench))
