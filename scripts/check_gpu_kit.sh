#!/usr/bin/env bash
# `make gpu-kit-check`: the offline kit, tested here as a cp311 build (this machine has only
# Python 3.11). Builds it, makes a fresh venv holding only torch and what the GPU image would
# already have (the kit's provided.txt, from the package index), installs the kit with no index,
# and trains the tiny preset from that venv through Ray Train + DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KIT=dist/gpu-kit-cp311.tar.xz
.venv/bin/python scripts/build_gpu_kit.py --python 3.11 --out "$KIT"
T=$(mktemp -d -t gpu-kit-check-XXXXXX)
trap 'rm -rf "$T"' EXIT
tar -xJf "$KIT" -C "$T"
"$PY" -m venv "$T/venv"
"$T/venv/bin/python" -m pip install -q torch==2.13.0
# The image's packages: pinned as the kit resolved them (name==version from each wheel's file name).
grep -v '^#' "$T/gpu-kit/provided.txt" | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' | grep -viE '^(torch|triton|nvidia|cuda)' \
  > "$T/provided-reqs.txt"
"$T/venv/bin/python" -m pip install -q --no-deps -r "$T/provided-reqs.txt"
PIP_CONFIG_FILE=/dev/null "$T/venv/bin/python" -m pip install -q --no-index --find-links "$T/gpu-kit" modelfleet
echo "gpu-kit-check: installed offline from $KIT ($(du -h "$KIT" | cut -f1))"
cd "$T"
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0
"$T/venv/bin/modelfleet" prepare --preset tiny --set storage.path="$T/storage"
"$T/venv/bin/modelfleet" train --preset tiny --set storage.path="$T/storage" --set train.max_steps=10 \
  --set train.checkpoint_every=10 --set train.eval_every=10
echo "gpu-kit-check: OK (modelfleet train --preset tiny ran from the offline kit)"
