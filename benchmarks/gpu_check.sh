#!/usr/bin/env bash
# One prepared GPU check (issues #15, #27): the SD1.5-shaped 512 px, batch 2, bf16 training table
# (ours, floor, the official recipe's loop, ours-fast = torch.compile, ours-fast-again = the same in a
# new process with the compile cache, ours-graphs = CUDA graphs) with steps/s, model FLOPs
# utilisation, peak memory (max allocated and reserved) and the extrapolated time of a 500-step run,
# then the real ComfyUI host (the Train node's path) in fp16 and in bf16, and the #27 goals.
# Writes one markdown table to stdout and gpu_check.json (plus each part's log and JSON) to the
# output folder. Meant to finish in under 9 minutes on an H100/H200 (three compiles of ≤150 s).
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# --dry-run: the same parts on the CPU with the tiny model at 64 px and a few steps (the compiled
# variants left out: torch.compile on the CPU takes minutes), so a test keeps the script from rotting.
# The ComfyUI part needs COMFYUI_PATH (a ComfyUI folder) and COMFYUI_PYTHON (a Python that runs
# it; default: python3); without COMFYUI_PATH it is reported as not run.
# PYTHON picks the Python for the trainer's part (default: python3).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$repo/gpu_check_out}
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--out DIR] [--dry-run]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "$dry_run" = 1 ]; then
  train_args=(--model tiny --resolution 64 --steps 3 --warmup 1 --mixed-precision no --device cpu
              --variants ours,floor,reference --flops --peak-tflops 1)
  comfy_args=(--model tiny --resolution 64 --steps 2 --warmup 1 --cpu)
else
  train_args=(--model sd15 --resolution 512 --steps 30 --warmup 5 --mixed-precision bf16 --flops
              --variants ours,floor,reference,ours-fast,ours-fast-again,ours-graphs --variant-timeout 150)
  comfy_args=(--model sd15 --resolution 512 --steps 30 --warmup 5)
fi

status=0
echo "## trainer (bench_train.py ${train_args[*]})" >&2
"$python" "$repo/benchmarks/bench_train.py" "${train_args[@]}" --json "$out/train.json" \
  > "$out/train.md" 2> "$out/train.log" || status=1

# The Train node's path twice: fp16 autocast over ComfyUI's fp16 UNet (its default on most GPUs), and
# bf16 autocast over a bf16 UNet (--bf16-unet), the trainer's precision above.
for precision in fp16 bf16; do
  if [ -n "${COMFYUI_PATH:-}" ]; then
    echo "## ComfyUI host, $precision (bench_comfy_host.py ${comfy_args[*]})" >&2
    (cd "$COMFYUI_PATH" && "${COMFYUI_PYTHON:-python3}" "$repo/benchmarks/bench_comfy_host.py" "${comfy_args[@]}" \
       --mixed-precision "$precision" --unet-dtype "$precision" --json "$out/comfy_$precision.json") \
       > "$out/comfy_$precision.log" 2>&1 || status=1
  else
    echo "ComfyUI host: not run (COMFYUI_PATH is not set)" > "$out/comfy_$precision.log"
  fi
done

"$python" "$repo/benchmarks/gpu_check_report.py" "$out" || status=1
exit $status
