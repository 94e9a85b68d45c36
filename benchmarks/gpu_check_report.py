"""gpu_check.sh's summary: one markdown table from its parts' JSON files, and gpu_check.json.

    python benchmarks/gpu_check_report.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The goals on the H200 (issue #27).
GOAL_NODE_VS_CLI = 0.95
GOAL_COMPILED_STEPS_S = 20.0
GOAL_COMPILED_500_STEPS_S = 25.0  # after setup
GOAL_COMPILE_S = 60.0
GOAL_PEAK_GB = 6.0
PRECISIONS = ("fp16", "bf16")


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def goals(train: dict | None, comfy: dict) -> dict | None:
    """The #27 goals against this run's numbers; None off a GPU (they are set for the H200)."""
    rows = (train or {}).get("rows", {})
    ours, floor = rows.get("ours"), rows.get("floor")
    if not ours or "peak_reserved_mib" not in ours:
        return None
    out = {"peak_gb": ours["peak_memory_mib"] * 2**20 / 1e9, "goal_peak_gb": GOAL_PEAK_GB}
    if floor:
        out["ours_vs_floor"] = ours["steps_per_s"] / floor["steps_per_s"]
    node = comfy.get(train["settings"]["mixed_precision"])
    if node:
        out["node_vs_cli"] = node["steps_per_s"] / ours["steps_per_s"]
    compiled = {name: rows[name] for name in ("ours-fast", "ours-fast-again", "ours-graphs") if name in rows}
    if compiled:
        best = max(compiled, key=lambda name: compiled[name]["steps_per_s"])
        out.update(compiled_best=best, compiled_steps_s=compiled[best]["steps_per_s"],
                   compiled_500_steps_after_setup_s=500 / compiled[best]["steps_per_s"])
    if "ours-fast-again" in rows:  # setup of a second compiled run: the cached compile
        out["compile_cached_s"] = rows["ours-fast-again"]["setup_and_first_step_s"]
    if "ours-fast" in rows:
        out["compile_first_s"] = rows["ours-fast"]["setup_and_first_step_s"]
    return out


def _goal_lines(g: dict) -> list[str]:
    def check(ok: bool) -> str:
        return "met" if ok else "missed"

    lines = ["Goals (#27, H200):", ""]
    if "node_vs_cli" in g:
        lines.append(f"- node path / CLI at the same precision: {g['node_vs_cli']:.2f} (goal ≥ {GOAL_NODE_VS_CLI}) — "
                     f"{check(g['node_vs_cli'] >= GOAL_NODE_VS_CLI)}")
    if "ours_vs_floor" in g:
        lines.append(f"- ours eager / floor: {g['ours_vs_floor']:.2f} (goal ≥ 1.0) — {check(g['ours_vs_floor'] >= 1.0)}")
    if "compiled_steps_s" in g:
        lines.append(f"- compiled ({g['compiled_best']}): {g['compiled_steps_s']:.1f} steps/s, 500 steps in "
                     f"{g['compiled_500_steps_after_setup_s']:.1f} s after setup (goal ≥ {GOAL_COMPILED_STEPS_S:.0f} "
                     f"steps/s) — {check(g['compiled_steps_s'] >= GOAL_COMPILED_STEPS_S)}")
    if "compile_first_s" in g or "compile_cached_s" in g:
        first, cached = g.get("compile_first_s"), g.get("compile_cached_s")
        best = min(v for v in (first, cached) if v is not None)
        lines.append(f"- setup + compile: first run {first if first is None else round(first, 1)} s, with the cache "
                     f"{cached if cached is None else round(cached, 1)} s (goal ≤ {GOAL_COMPILE_S:.0f} s or cached) — "
                     f"{check(best <= GOAL_COMPILE_S)}")
    lines.append(f"- peak {g['peak_gb']:.2f} GB (goal ≤ {GOAL_PEAK_GB:.0f} GB) — {check(g['peak_gb'] <= GOAL_PEAK_GB)}")
    return lines


def report(out: Path) -> tuple[str, dict, bool]:
    """(markdown, summary dict, every part ran)."""
    from bench_train import markdown_table

    train = _load(out / "train.json")
    comfy = {p: _load(out / f"comfy_{p}.json") for p in PRECISIONS}
    ok = bool(train and train["rows"] and not train["failed"])
    lines = ["# GPU check", ""]
    if train and train["rows"]:
        lines += [markdown_table(train["settings"], train["rows"]), ""]
    if not train or train["failed"]:
        lines += ["trainer variants failed: " + ", ".join(train["failed"] if train else ["all"]), "```",
                  tail(out / "train.log"), "```", ""]
    ours = (train or {}).get("rows", {}).get("ours")
    ran = {p: c for p, c in comfy.items() if c}
    if ran:
        first = next(iter(ran.values()))
        s = first["settings"]
        lines += [f"ComfyUI host (the Train node's path; model={s['model']} resolution={s['resolution']} "
                  f"batch={s['batch_size']}, device={first['device']})", "",
                  "| node path | UNet dtype | steps/s | vs CLI (ours) | peak memory MiB | peak reserved MiB | 500 steps s |",
                  "|---|---|---|---|---|---|---|"]
        for precision, row in ran.items():
            reserved = f"{row['peak_reserved_mib']:.0f}" if "peak_reserved_mib" in row else "-"
            versus = f"{row['steps_per_s'] / ours['steps_per_s']:.2f}x" if ours else "-"
            lines.append(f"| autocast {precision} | {row['unet_dtype']} | {row['steps_per_s']:.3f} | {versus} | "
                         f"{row['peak_memory_mib']:.0f} | {reserved} | {row['run_500_steps_s']:.1f} |")
        lines.append("")
    for precision in PRECISIONS:
        if comfy[precision]:
            continue
        log = out / f"comfy_{precision}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        if "not run" in text:
            lines += [f"ComfyUI host ({precision}): {text.strip()}", ""]
        else:
            ok = False
            lines += [f"ComfyUI host part ({precision}) failed:", "```", tail(log), "```", ""]
    summary_goals = goals(train, ran)
    if summary_goals:
        lines += _goal_lines(summary_goals)
    summary = {"train": train, "comfy": comfy, "goals": summary_goals, "complete": ok}
    return "\n".join(lines), summary, ok


def main() -> None:
    out = Path(sys.argv[1])
    text, summary, ok = report(out)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(text)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
