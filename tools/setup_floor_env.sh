#!/usr/bin/env bash
# A Python environment with the oldest dependency versions this pack declares
# (tools/floor-requirements.txt) for the trainer tests; prints its python's path.
#
#   "$(bash tools/setup_floor_env.sh)" -m pytest tests --ignore=tests/comfyui
#
# Reused while the floors and this script are unchanged (CLASSDIFFUSION_HOST_DIR, default
# ~/.cache/comfyui-classdiffusion). torch is this machine's 2.13.0 CPU wheel.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host_dir=${CLASSDIFFUSION_HOST_DIR:-$HOME/.cache/comfyui-classdiffusion}
venv=$host_dir/floor-venv
inputs=$(cat "$repo/tools/setup_floor_env.sh" "$repo/tools/pip_install.sh" "$repo/tools/floor-requirements.txt" | sha256sum | cut -d' ' -f1)
source "$repo/tools/pip_install.sh"
if [[ -f $venv/.inputs && $(cat "$venv/.inputs") == "$inputs" ]]; then
    echo "setup_floor_env: reusing $venv" >&2
else
    echo "setup_floor_env: building $venv" >&2
    rm -rf "$venv"
    mkdir -p "$host_dir"
    "${PYTHON:-python3}" -m venv "$venv"
    pip_install torch==2.13.0
    pip_install -r "$repo/tools/floor-requirements.txt" numpy tqdm pytest
    echo "$inputs" > "$venv/.inputs"
fi
# The pack itself, without letting pip move any dependency off its floor.
pip_install --no-deps -e "$repo"
"$venv/bin/python" - "$repo/tools/floor-requirements.txt" >&2 <<'PY'
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, wanted = line.split("==")
        assert version(name) == wanted, f"{name} {version(name)} installed, floor {wanted}"
print("setup_floor_env: floors installed:", open(sys.argv[1]).read().count("=="), "packages")
PY
echo "$venv/bin/python"
