"""benchmarks/gpu_check.sh, the one prepared GPU check, cannot rot: its --dry-run runs every part
(trainer variants incl. the floor and the official recipe's loop, the ComfyUI node path on the real
host, the report) on the CPU with the tiny model, and the report holds each part's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comfy_server import COMFYUI_PATH, COMFYUI_PYTHON, REPO, unavailable_reason

_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "COMFYUI_PATH": str(COMFYUI_PATH),
           "COMFYUI_PYTHON": str(COMFYUI_PYTHON)}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["complete"]
    rows = summary["train"]["rows"]
    assert set(rows) == {"ours", "floor", "reference"}
    assert all(row["steps_per_s"] > 0 and row["peak_memory_mib"] > 0 for row in rows.values())
    assert rows["ours"]["run_500_steps_s"] > rows["ours"]["setup_and_first_step_s"]
    # model FLOPs utilisation: one step's FLOPs counted once, × steps/s, against the given peak
    step_flops = summary["train"]["settings"]["step_flops"]
    assert step_flops > 1e8
    for row in rows.values():
        assert row["tflops"] == pytest.approx(step_flops * row["steps_per_s"] / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops"] / 1.0)  # --peak-tflops 1
    # the node path in fp16 and in bf16, each on a UNet of that dtype
    for precision in ("fp16", "bf16"):
        comfy = summary["comfy"][precision]
        assert comfy["steps_per_s"] > 0 and comfy["settings"]["model"] == "tiny"
        assert comfy["settings"]["mixed_precision"] == precision and comfy["unet_dtype"] == {"fp16": "float16",
                                                                                               "bf16": "bfloat16"}[precision]
    assert summary["goals"] is None  # the H200 goals apply to GPU runs only
    for column in ("| floor |", "speed vs floor", "MFU", "| autocast fp16 |", "| autocast bf16 |", "vs CLI (ours)"):
        assert column in run.stdout
