#!/usr/bin/env bash
# A real ComfyUI host for the tests in tests/comfyui: a Python environment that runs ComfyUI,
# and writable copies of ComfyUI, AnimateDiff-Evolved and VideoHelperSuite.
#
#   eval "$(bash tools/setup_comfyui_env.sh)" && python -m pytest tests
#
# Sources: the snapshots in ../shared/comfyui (or COMFYUI_SNAPSHOTS=DIR holding ComfyUI/,
# ComfyUI-AnimateDiff-Evolved/ and ComfyUI-VideoHelperSuite/). The environment lives in
# CLASSDIFFUSION_HOST_DIR (default ~/.cache/comfyui-classdiffusion) and is reused while its inputs
# (this script, ComfyUI's requirements, this pack's requirements) are unchanged; otherwise it is
# rebuilt. ComfyUI's torch/torchvision/torchaudio must install together: torch 2.9.1 from the
# registry (several GB, once). Progress goes to stderr; stdout is only the `export` lines.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
snapshots=${COMFYUI_SNAPSHOTS:-$repo/../shared/comfyui}
host_dir=${CLASSDIFFUSION_HOST_DIR:-$HOME/.cache/comfyui-classdiffusion}
venv=$host_dir/comfy-venv
python=${PYTHON:-python3}

say() { echo "setup_comfyui_env: $*" >&2; }
fail() { say "ERROR: $*"; exit 1; }

for pack in ComfyUI ComfyUI-AnimateDiff-Evolved ComfyUI-VideoHelperSuite; do
    [[ -d $snapshots/$pack ]] || fail "no $snapshots/$pack (set COMFYUI_SNAPSHOTS to the folder holding the snapshots)"
done

# The host must not write beside the read-only snapshots: work on copies (about 33 MB).
mkdir -p "$host_dir"
rm -rf "$host_dir/src.new"
mkdir "$host_dir/src.new"
cp -R "$snapshots/ComfyUI" "$snapshots/ComfyUI-AnimateDiff-Evolved" "$snapshots/ComfyUI-VideoHelperSuite" "$host_dir/src.new/"
chmod -R u+w "$host_dir/src.new"
rm -rf "$host_dir/src"
mv "$host_dir/src.new" "$host_dir/src"
comfy=$host_dir/src/ComfyUI

inputs=$(cat "$repo/tools/setup_comfyui_env.sh" "$repo/tools/pip_install.sh" "$comfy/requirements.txt" "$repo/requirements.txt" | sha256sum | cut -d' ' -f1)
check='import torch, torchvision, torchaudio, aiohttp, cv2, diffusers, transformers, safetensors'
if [[ -f $venv/.inputs && $(cat "$venv/.inputs") == "$inputs" ]] && "$venv/bin/python" -c "$check" 2>/dev/null; then
    say "reusing $venv"
else
    say "building $venv (torch 2.9.1 + ComfyUI's requirements; a few minutes)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    source "$repo/tools/pip_install.sh"
    pip_install --upgrade pip
    # torchvision and torchaudio pin their torch; installed in two steps as measured to work.
    pip_install torch==2.9.1 torchvision==0.24.1
    pip_install torch==2.9.1 'torchaudio==2.9.*'
    # ComfyUI's requirements without the torch family (already there, never changed).
    grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$host_dir/comfy-requirements.txt"
    pip_install -r "$host_dir/comfy-requirements.txt"
    # VideoHelperSuite's needs (headless OpenCV, ffmpeg for MP4); comfy-cli (+ ruff, which its
    # validate runs) for the registry checks.
    pip_install opencv-python-headless imageio-ffmpeg comfy-cli ruff
    # This pack's requirements, line by line and never touching torch, as ComfyUI-Manager does.
    while read -r line; do
        line=${line%%#*}
        [[ -z ${line// /} ]] && continue
        [[ $line =~ ^(torch|torchvision|torchaudio|torchsde)([^a-zA-Z0-9_-]|$) ]] && continue
        pip_install "$line"
    done < "$repo/requirements.txt"
    "$venv/bin/python" -c "$check" || fail "the environment does not import ComfyUI's requirements"
    echo "$inputs" > "$venv/.inputs"
fi

printf 'export COMFYUI_PATH=%q\n' "$comfy"
printf 'export COMFYUI_PYTHON=%q\n' "$venv/bin/python"
printf 'export COMFY_CLI=%q\n' "$venv/bin/comfy"
printf 'export ANIMATEDIFF_EVOLVED_PATH=%q\n' "$host_dir/src/ComfyUI-AnimateDiff-Evolved"
printf 'export VIDEOHELPERSUITE_PATH=%q\n' "$host_dir/src/ComfyUI-VideoHelperSuite"
echo 'export CLASSDIFFUSION_REQUIRE_HOST=1'
