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


#: History keys that are not loss terms or per-concept diagnostics.
NOT_TERMS = ("step", "loss", "lr", "seconds", "drift_rank")


def loss_terms(history: Sequence[dict]) -> list[str]:
    """The loss terms a run's history records (the method's: recon, spl, prior, ...), in order;
    a term that is 0 at every step (older Infusion files wrote spl = 0) is left out."""
    first = history[0] if history else {}
    return [key for key, value in first.items() if key not in NOT_TERMS and isinstance(value, (int, float))
            and any(h.get(key) for h in history)]


def diagnostics(history: Sequence[dict]) -> list[str]:
    """The per-concept diagnostics a history records (ClassDiffusion: ``cos``); empty lists are none."""
    first = history[0] if history else {}
    return [key for key, value in first.items() if key not in NOT_TERMS and isinstance(value, list) and value]


#: How the summary and the plots name a history key.
LABELS = {"recon": "recon", "spl": "SPL", "prior": "prior", "cos": "EOS cos(token phrase, class phrase)"}


def summary_line(history: Sequence[dict]) -> str:
    """One line for a UI: final smoothed losses, each per-concept diagnostic, the drift rank."""
    if not history:
        return "no training steps recorded"
    last = history[-1]
    terms = ", ".join(f"{LABELS.get(key, key)} {ema([h[key] for h in history])[-1]:.5f}"
                      for key in loss_terms(history))
    line = f"step {last['step']}: loss {ema([h['loss'] for h in history])[-1]:.4f}"
    line += f" ({terms}, smoothed)" if terms else " (smoothed)"
    for key in diagnostics(history):
        line += f" · {LABELS.get(key, key)} " + ", ".join(f"{c:.4f}" for c in last.get(key, []))
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
