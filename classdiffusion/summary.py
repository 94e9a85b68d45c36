"""One-line text summaries of a run (the CLI's last line, the Loss Monitor's text, the demo's JSON)."""

from __future__ import annotations

from typing import Sequence


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Bias-corrected exponential moving average, as TensorBoard's smoothing does."""
    out, avg, weight = [], 0.0, 0.0
    for value in values:
        avg = (1 - alpha) * avg + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def summary_line(history: Sequence[dict]) -> str:
    """One line for a UI: final smoothed losses and each concept's EOS cosine."""
    if not history:
        return "no training steps recorded"
    last = history[-1]
    smooth = {key: ema([h[key] for h in history])[-1] for key in ("loss", "recon", "spl")}
    cos = ", ".join(f"{c:.4f}" for c in last.get("cos", []))
    line = (f"step {last['step']}: loss {smooth['loss']:.4f} (recon {smooth['recon']:.4f}, "
            f"SPL {smooth['spl']:.5f}, smoothed) · EOS cos(token phrase, class phrase) {cos}")
    drift = [h for h in history if h.get("drift_rank")]
    if drift:
        line += f" · drift rank {drift[0]['drift_rank']} (step {drift[0]['step']}) → {drift[-1]['drift_rank']}"
    return line


def drift_line(initial: Sequence[dict] | None, final: Sequence[dict] | None) -> str:
    """"<sks>: cos 0.91 → 0.95, rank 26/72 → 36/72" for each concept, from a concept's metadata."""
    if not initial or not final:
        return ""
    parts = []
    for before, after in zip(initial, final):
        parts.append(f"{after['token']}: cos {before['cosine']:.4f} → {after['cosine']:.4f}, "
                     f"drift rank {before['rank']}/{before['total']} → {after['rank']}/{after['total']}")
    return "drift (1 = closest to class): " + "; ".join(parts)
