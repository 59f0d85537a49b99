#!/usr/bin/env bash
# The GPU check, unattended, on one H100/H200 machine without network (Python 3.12 and torch present):
#   1. installs benchmarks/gpu/wheels/ (made here by benchmarks/gpu/vendor.sh, carried with the checkout) into a
#      virtualenv that sees the machine's torch: DeepSpeed builds from its source distribution without ops;
#   2. runs benchmarks/gpu_check.py: the real `evaclip prepare`, `evaclip train` (bf16 at masking 0.5 and 0,
#      fp16 at 0.5, flash-attn where installed) and `evaclip evaluate` for EVA02-CLIP-B/16, and writes
#      benchmarks/results/gpu.json (copied to $OUT when set: the device tool's result folder).
# Budget: at most 8 minutes (install ~1, check ~5). Usage: benchmarks/gpu_check.sh [gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-benchmarks/gpu/wheels}
VENV=${VENV:-/tmp/evaclip-gpu-venv}
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 \
  PIP_FIND_LINKS="$WHEELS" PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name(0))"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q setuptools wheel
  # No build isolation: DeepSpeed's setup imports torch (the machine's), and no index can be reached.
  "$VENV/bin/pip" install -q --no-build-isolation -r benchmarks/gpu/requirements.txt
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
fi
timeout 420 "$VENV/bin/python" benchmarks/gpu_check.py --out benchmarks/results/gpu.json "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.json "$OUT/"; fi
