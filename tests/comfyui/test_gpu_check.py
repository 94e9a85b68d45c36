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
    comfy = summary["comfy"]
    assert comfy["steps_per_s"] > 0 and comfy["settings"]["model"] == "tiny"
    assert summary["goals"] is None  # the H100 goals apply to GPU runs only
    for column in ("| floor |", "speed vs floor", "ComfyUI node path"):
        assert column in run.stdout
