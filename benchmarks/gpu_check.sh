#!/usr/bin/env bash
# The GPU check, for one H100/H200 machine without network (about 8 minutes):
#   - torch is installed already; every other package comes as wheels in ../wheels (or $WHEELS);
#   - EVA02-CLIP-B/16, bf16, sdpa (flash kernels), DeepSpeed ZeRO-1, masking 0 and 0.5, largest batch that fits;
#   - writes benchmarks/results/gpu.json (samples/s, masking speed-up, peak memory, MFU against the measured
#     bf16 matmul rate) and copies it to $OUT when that is set (the device tool's result folder).
# Make the wheel folder on a machine with network: pip download -d ../wheels -c constraints.txt -e . (minus torch)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-../wheels}
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
if ! python -c "import evaclip, deepspeed, open_clip, timm" 2>/dev/null; then
  python -m pip install -q --no-index --find-links "$WHEELS" -e .
fi
python -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name(0))"
timeout 450 python benchmarks/gpu_check.py --out benchmarks/results/gpu.json "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.json "$OUT/"; fi
