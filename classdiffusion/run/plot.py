"""Loss-history plots drawn with PIL (no matplotlib needed: it is not a ComfyUI dependency).

Per-step losses mostly show which timestep was drawn, so each curve is drawn raw (faint) and
smoothed with an exponential moving average (bold).
"""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .summary import ema

COLORS = {"loss": (40, 40, 40), "recon": (31, 119, 180), "spl": (214, 39, 40), "prior": (44, 160, 44)}
COSINE_COLORS = [(148, 103, 189), (255, 127, 14), (23, 190, 207)]
#: Distinct colours for one point per method (matplotlib's tab10).
POINT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127)]


def _panel(draw: ImageDraw.ImageDraw, box, series: dict[str, tuple[list[float], list[float], tuple]],
           title: str, font, steps: list[int], marks: Sequence[int] = ()) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180), fill=(255, 255, 255))
    draw.text((left + 6, top + 4), title, fill=(0, 0, 0), font=font)
    values = [v for raw, smooth, _ in series.values() for v in raw + smooth if math.isfinite(v)]
    if not values or not steps:
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1) * 1e-3, hi + 0.5 * abs(hi or 1) * 1e-3
    pad_top, pad_bottom, pad_left = 22, 16, 52
    x0, x1, y0, y1 = left + pad_left, right - 8, top + pad_top, bottom - pad_bottom
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, value):
        return (x0 + (step - s0) / (s1 - s0) * (x1 - x0), y1 - (value - lo) / (hi - lo) * (y1 - y0))

    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = y1 - frac * (y1 - y0)
        draw.line([(x0, y), (x1, y)], fill=(235, 235, 235))
        draw.text((left + 4, y - 6), f"{value:.4g}", fill=(90, 90, 90), font=font)
    for mark in marks:  # saved checkpoints: dashed verticals
        if s0 <= mark <= s1:
            x = xy(mark, lo)[0]
            for y in range(int(y0), int(y1), 6):
                draw.line([(x, y), (x, min(y + 3, y1))], fill=(120, 120, 120))
            draw.text((x + 2, y0), f"@{mark}", fill=(120, 120, 120), font=font)
    draw.text((x0, y1 + 2), str(s0), fill=(90, 90, 90), font=font)
    draw.text((x1 - 30, y1 + 2), str(steps[-1]), fill=(90, 90, 90), font=font)
    legend_x = x1 - 10
    for name, (raw, smooth, color) in series.items():
        faint = tuple(int(c + (255 - c) * 0.7) for c in color)
        if len(steps) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, raw)], fill=faint, width=1)
            draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=color, width=2)
        else:
            x, y = xy(steps[0], raw[0])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        legend_x -= 8 * len(name) + 18
        draw.line([(legend_x, top + 11), (legend_x + 10, top + 11)], fill=color, width=3)
        draw.text((legend_x + 13, top + 4), name, fill=color, font=font)


def plot_history(history: Sequence[dict], width: int = 768, height: int | None = None,
                 tokens: Sequence[str] = (), checkpoints: Sequence[int] = ()) -> Image.Image:
    """Panels: the total loss and each loss term the method recorded (ClassDiffusion: recon, SPL,
    prior), one panel per per-concept diagnostic (ClassDiffusion: the EOS cosine) and — when the
    run logged it (``drift_every``) — each token's drift rank among the adjective phrases.
    ``checkpoints``: steps marked in each panel."""
    from .summary import LABELS, diagnostics, loss_terms

    font = ImageFont.load_default()
    drift = [h for h in history if h.get("drift_rank")]
    per_concept = diagnostics(history)
    panels = 1 + len(per_concept) + bool(drift)
    height = height or 256 * panels
    image = Image.new("RGB", (width, height), (248, 248, 248))
    draw = ImageDraw.Draw(image)
    steps = [h["step"] for h in history]
    losses = {}
    for k, key in enumerate(["loss"] + loss_terms(history) if history else []):
        raw = [h[key] for h in history]
        losses[LABELS.get(key, key)] = (raw, ema(raw), COLORS.get(key, COSINE_COLORS[k % len(COSINE_COLORS)]))
    size = height // panels
    boxes = [(4, 4 + i * size, width - 4, (i + 1) * size - 2) for i in range(panels)]
    _panel(draw, boxes[0], losses, "loss per step (faint: raw, bold: smoothed)", font, steps, checkpoints)
    n = max([len(history[0][key]) for key in per_concept] + [len(drift[0]["drift_rank"]) if drift else 0])
    labels = [tokens[k] if k < len(tokens) else f"concept {k + 1}" for k in range(n)]

    def series(records, key):
        return {labels[k]: ([float(h[key][k]) for h in records],) * 2 + (COSINE_COLORS[k % len(COSINE_COLORS)],)
                for k in range(len(records[0][key]))}

    for box, key in zip(boxes[1:], per_concept):
        title = DIAGNOSTIC_TITLES.get(key, key)
        _panel(draw, box, series(history, key), title, font, steps, checkpoints)
    if drift:
        _panel(draw, boxes[-1], series(drift, "drift_rank"),
               "drift rank of 'a <token> <class>' among 'a <adjective> <class>' (1 = closest to class)",
               font, [h["step"] for h in drift], checkpoints)
    return image


#: Panel titles of the per-concept diagnostics a method records.
DIAGNOSTIC_TITLES = {"cos": "EOS cosine: token phrase vs class phrase (higher = closer to class)"}


def plot_drift_map(drift_map, width: int = 640, height: int = 560, title: str | None = None) -> Image.Image:
    """Scatter of the adjective phrases, the class phrase (black) and the token phrase before
    (orange) and after (red) training, as in the paper's Fig. 12; distances to the class point
    give the 2-D rank."""
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    tokens = dict(drift_map.token_points)
    everything = [p for p in drift_map.points] + [drift_map.class_point] + list(tokens.values())
    xs, ys = [float(p[0]) for p in everything], [float(p[1]) for p in everything]
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = max(hi_x - lo_x, 1e-9), max(hi_y - lo_y, 1e-9)
    margin, header = 40, 44

    def xy(p):
        return (margin + (float(p[0]) - lo_x) / span_x * (width - 2 * margin),
                header + (1 - (float(p[1]) - lo_y) / span_y) * (height - header - margin))

    n = len(drift_map.labels) + 1
    ranks = ", ".join(f"{label}: {rank}/{n}" for label, rank in drift_map.map_ranks.items())
    draw.text((8, 6), title or f"'{drift_map.class_word}' phrases, {drift_map.method.upper()} map", fill=(0, 0, 0), font=font)
    draw.text((8, 22), f"rank of the token phrase by 2-D distance to the class (1 = closest): {ranks}",
              fill=(60, 60, 60), font=font)
    for label, point in zip(drift_map.labels, drift_map.points):
        x, y = xy(point)
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(150, 150, 150))
        draw.text((x + 3, y - 5), label, fill=(170, 170, 170), font=font)
    cx, cy = xy(drift_map.class_point)
    draw.rectangle((cx - 4, cy - 4, cx + 4, cy + 4), fill=(0, 0, 0))
    draw.text((cx + 6, cy - 6), f"a {drift_map.class_word}", fill=(0, 0, 0), font=font)
    colors = {"before": (255, 127, 14), "after": (214, 39, 40)}
    previous = None
    for k, (label, point) in enumerate(tokens.items()):
        x, y = xy(point)
        color = colors.get(label, COSINE_COLORS[k % len(COSINE_COLORS)])
        if previous is not None:
            draw.line([previous, (x, y)], fill=color, width=1)
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=color)
        draw.text((x + 7, y - 6), f"token ({label})", fill=color, font=font)
        previous = (x, y)
    return image


def plot_tradeoff(points: dict[str, tuple[float, float, float, float]], *, x_label: str, y_label: str,
                  title: str, width: int = 720, height: int = 540) -> Image.Image:
    """One point per label with ±std bars: ``points[label] = (x, x_std, y, y_std)``, axes from 0 to 1
    (the toy world's identity-vs-alignment plot)."""
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 230, 40, height - 50

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * (right - left), bottom - y * (bottom - top)

    draw.text((8, 8), title, fill=(0, 0, 0), font=font)
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for k in range(11):
        gx, gy = xy(k / 10, k / 10)
        draw.line([(gx, top), (gx, bottom)], fill=(232, 232, 232))
        draw.line([(left, gy), (right, gy)], fill=(232, 232, 232))
        draw.text((gx - 8, bottom + 5), f"{k / 10:.1f}", fill=(90, 90, 90), font=font)
        draw.text((left - 28, gy - 6), f"{k / 10:.1f}", fill=(90, 90, 90), font=font)
    draw.text(((left + right) / 2 - 80, bottom + 24), x_label, fill=(0, 0, 0), font=font)
    draw.text((8, top - 16), y_label, fill=(0, 0, 0), font=font)
    for k, (label, (x, dx, y, dy)) in enumerate(points.items()):
        color = POINT_COLORS[k % len(POINT_COLORS)]
        px, py = xy(x, y)
        draw.line([xy(max(0.0, x - dx), y), xy(min(1.0, x + dx), y)], fill=color, width=1)
        draw.line([xy(x, max(0.0, y - dy)), xy(x, min(1.0, y + dy))], fill=color, width=1)
        draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=color)
        draw.rectangle((right + 14, top + 18 * k + 2, right + 24, top + 18 * k + 12), fill=color)
        draw.text((right + 30, top + 18 * k), label, fill=(0, 0, 0), font=font)
    return image
