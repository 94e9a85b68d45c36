#!/usr/bin/env bash
# A new user's install, not a developer's: build the wheel and the sdist from a clean clone, install
# the wheel (not editable) into a fresh venv, and run `classdiffusion demo` and a short `train` from
# there, outside the source tree. An editable install imports from the source tree and so cannot
# see a module left out of the wheel; this can.
#
#   bash tools/check_wheel_install.sh
#
# Needs git, network access to PyPI (the build backend and the pack's dependencies) and the
# torch==2.13.0 wheel pip finds on this machine. Work happens in a temporary folder, removed at exit.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "check_wheel_install: $*" >&2; }

git clone --quiet --no-local "$repo" "$work/clone"
# Uncommitted changes count too when run by hand: CI runs on a clean clone, where there are none.
git -C "$repo" diff HEAD | { git -C "$work/clone" apply --allow-empty 2>/dev/null || true; }

venv=$work/venv
"${PYTHON:-python3}" -m venv "$venv"
source "$repo/tools/pip_install.sh"
pip_install build
"$venv/bin/python" -m build --outdir "$work/dist" "$work/clone" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; say "FAILED: python -m build"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
say "built $(basename "$wheel") and $(basename "$sdist")"

pip_install torch==2.13.0
pip_install "$wheel"

cd "$work"   # nowhere near the source tree
"$venv/bin/python" -c "import classdiffusion, sys; sys.exit(0 if '/site-packages/' in classdiffusion.__file__ else 'imported ' + classdiffusion.__file__)"
"$venv/bin/classdiffusion" demo --out "$work/demo" -q >"$work/demo.log" 2>&1 \
    || { cat "$work/demo.log"; say "FAILED: classdiffusion demo"; exit 1; }
for name in concept.safetensors grid.png scores.json; do
    [[ -s $work/demo/$name ]] || { say "FAILED: the demo wrote no $name"; exit 1; }
done
# The toy base ships inside the wheel: train on it from there.
base=$("$venv/bin/python" -c "from classdiffusion.toyworld.base import base_path; print(base_path())")
[[ $base == */site-packages/* ]] || { say "FAILED: the toy base is not the installed one ($base)"; exit 1; }
"$venv/bin/classdiffusion" train --base "$base" --images "$work/demo/images" --token "<sks>" \
    --class-word star --steps 3 --resolution 64 --out "$work/toy.safetensors" >"$work/train.log" 2>&1 \
    || { cat "$work/train.log"; say "FAILED: classdiffusion train"; exit 1; }
"$venv/bin/classdiffusion" train --method infusion --base "$base" --images "$work/demo/images" \
    --class-word star --steps 2 --resolution 64 --out "$work/toy_inf.safetensors" >>"$work/train.log" 2>&1 \
    || { cat "$work/train.log"; say "FAILED: classdiffusion train --method infusion"; exit 1; }
"$venv/bin/classdiffusion" inspect "$work/toy.safetensors" >/dev/null
say "wheel install: demo, train (both methods) and inspect ran from $(basename "$wheel")"
