"""gpu_check.sh's summary: one markdown table from its parts' JSON files, and gpu_check.json.

    python benchmarks/gpu_check_report.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The goals on an H100 (issue #15): a 500-step run and its peak memory.
GOAL_500_STEPS_S = 15.0
GOAL_PEAK_GB = 6.0


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def report(out: Path) -> tuple[str, dict, bool]:
    """(markdown, summary dict, every part ran)."""
    from bench_train import markdown_table

    train_file, comfy_file = out / "train.json", out / "comfy.json"
    train = json.loads(train_file.read_text()) if train_file.exists() else None
    comfy = json.loads(comfy_file.read_text()) if comfy_file.exists() else None
    ok = bool(train and train["rows"] and not train["failed"])
    lines = ["# GPU check", ""]
    if train and train["rows"]:
        lines += [markdown_table(train["settings"], train["rows"]), ""]
    if not train or train["failed"]:
        lines += ["trainer variants failed: " + ", ".join(train["failed"] if train else ["all"]), "```",
                  tail(out / "train.log"), "```", ""]
    comfy_log = (out / "comfy.log").read_text(errors="replace") if (out / "comfy.log").exists() else ""
    if comfy:
        s = comfy["settings"]
        reserved = f"{comfy['peak_reserved_mib']:.0f}" if "peak_reserved_mib" in comfy else "-"
        lines += [f"ComfyUI host (Train node path, UNet {comfy['unet_dtype']}, autocast {s['mixed_precision']}, "
                  f"model={s['model']} resolution={s['resolution']} batch={s['batch_size']}, device={comfy['device']})", "",
                  "| loop | steps/s | peak memory MiB | peak reserved MiB | 500 steps s |", "|---|---|---|---|---|",
                  f"| ComfyUI node path | {comfy['steps_per_s']:.3f} | {comfy['peak_memory_mib']:.0f} | {reserved} | "
                  f"{comfy['run_500_steps_s']:.1f} |", ""]
    elif "not run" in comfy_log:
        lines += [comfy_log.strip(), ""]
    else:
        ok = False
        lines += ["ComfyUI host part failed:", "```", tail(out / "comfy.log"), "```", ""]
    ours = (train or {}).get("rows", {}).get("ours")
    goals = None
    if ours and "peak_reserved_mib" in ours:  # a GPU run: the goals apply
        goals = {"run_500_steps_s": ours["run_500_steps_s"], "goal_500_steps_s": GOAL_500_STEPS_S,
                 "peak_gb": ours["peak_memory_mib"] * 2**20 / 1e9, "goal_peak_gb": GOAL_PEAK_GB}
        lines.append(f"Goals (H100): 500 steps in {goals['run_500_steps_s']:.1f} s (goal ≤ {GOAL_500_STEPS_S:.0f} s), "
                     f"peak {goals['peak_gb']:.2f} GB (goal ≤ {GOAL_PEAK_GB:.0f} GB)")
    summary = {"train": train, "comfy": comfy, "goals": goals, "complete": ok}
    return "\n".join(lines), summary, ok


def main() -> None:
    out = Path(sys.argv[1])
    text, summary, ok = report(out)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(text)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
