#!/usr/bin/env bash
# Downloads benchmarks/gpu/requirements.txt for the GPU machine (CPython 3.12, x86_64 Linux) into
# benchmarks/gpu/wheels/, which the device tool carries with the checkout (at most 64 MiB in all):
#   benchmarks/gpu/vendor.sh        # here, with network access to PyPI
# Binary wheels for cp312 (or abi3 / pure Python); DeepSpeed as its source distribution (built there).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../../.venv/bin/python}
out=$here/wheels
rm -rf "$out" && mkdir -p "$out"
requirements=$(mktemp)
sed 's/#.*//' "$here/requirements.txt" | grep -v '^deepspeed' | grep -v '^\s*$' > "$requirements"
export PIP_CONSTRAINT="" PIP_FIND_LINKS=""
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$out" -r "$requirements"
"$python" -m pip download --quiet --no-deps --no-binary=:all: -d "$out" \
  "$(grep '^deepspeed==' "$here/requirements.txt" | sed 's/ .*//')"
rm -f "$requirements"
bytes=$(du -sb "$out" | cut -f1)
files=$(ls "$out" | wc -l)
echo "benchmarks/gpu/wheels: $files files, $((bytes / 1048576)) MiB"
printf '{"benchmark": "gpu_wheels", "python": "cp312", "files": %s, "bytes": %s, "mib": %s}\n' \
  "$files" "$bytes" "$(awk "BEGIN {printf \"%.1f\", $bytes / 1048576}")" > "$here/../results/gpu-wheels.json"
if [ "$bytes" -gt $((56 * 1048576)) ]; then  # the checkout itself needs the rest of the 64 MiB
  echo "more than 56 MiB: the device tool carries at most 64 MiB with the checkout" >&2
  exit 1
fi
