"""`classdiffusion demo`: see a concept learned, on a fresh machine with no downloads.

Trains one held-out instance of the toy world (docs/toyworld.md) on the committed toy base — a
64 px text-to-image model with SD1.5's architecture classes, pretrained here — from five pictures
in one plain scene, then samples the base and the concept on the class prompt and on composition
prompts, and lets the independent checker read what the pictures show.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger("classdiffusion")

DISCLAIMER = (
    "NOTE: the demo runs on the toy base, a 64 px world of shapes pretrained by this project "
    "(docs/toyworld.md). It shows a concept learned and composed in that world; for real pictures "
    "train on an SD1.5 checkpoint with photos of your concept."
)

#: The toy base's training recipe where it differs from SD1.5's defaults: 64 px pictures; a base
#: learning rate of 1e-4 (× batch 2), as the toy's K/V projections are small and 1e-5 moves nothing
#: in 400 steps (2e-4 and 1e-3 were measured worse, 800 steps no better: docs/toyworld.md); no
#: rescaling augmentation, since the world's pictures are framed alike and the official rescaling
#: pads them with a blank canvas the base never saw.
TOY_RECIPE = {"resolution": 64, "learning_rate": 1e-4, "augment": False}
DEMO_INSTANCE = "red_blue_star"
DEMO_SEEDS = (0, 1, 2, 3)


def run_demo(out: str | Path, *, steps: int = 400, spl_weight: float = 1.0, seed: int = 0,
             instance: str = DEMO_INSTANCE, method: str | None = None, progress: bool = True,
             weights: str | Path | None = None) -> dict:
    """Train ``instance`` on the toy base and score it; writes ``out``/{images/, concept.safetensors,
    loss.png, grid.png, scores.json} and returns the scores. ``weights``: another toy-world weights
    folder than the committed one (tests, pretraining runs); ``method``: a registered method (default:
    ClassDiffusion)."""
    from ..config import ConceptSpec, TrainConfig
    from ..hosts.diffusers_host import load_host
    from ..methods import DEFAULT_METHOD, method_class
    from ..run.plot import plot_history
    from ..run.progress import TqdmCallbacks
    from ..run.summary import drift_line, summary_line
    from .base import WEIGHTS, base_path
    from .evaluate import instance_pictures
    from .world import World
    from ..run.train import train

    method = method or DEFAULT_METHOD
    out = Path(out)
    started = time.perf_counter()
    base = base_path(weights or WEIGHTS)
    cls = World().instance(instance).cls
    references = instance_pictures(instance, seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, picture in enumerate(references):
        picture.save(out / "images" / f"{instance}_{k:02d}.png")

    host = load_host(base, device="cpu")
    spec = ConceptSpec(token="<sks>", class_word=cls, images=[str(out / "images")])
    config = TrainConfig(method=method, steps=steps, spl_weight=spl_weight, seed=seed,
                         drift_every=max(1, steps // 5), **TOY_RECIPE)
    result = train(host, [spec], config, out=out / "concept.safetensors",
                   callbacks=TqdmCallbacks(enabled=progress, description=method_class(method).label),
                   meta_extra={"base_name": "toy base"})
    plot_history(result.concept.history, tokens=result.concept.tokens).save(out / "loss.png")
    trained_seconds = time.perf_counter() - started

    before, base_class, after = _score_demo(base, result.concept, spec, instance, cls, references, out)
    scores = {
        "instance": instance, "method": method, "steps": steps, "spl_weight": spl_weight, "seed": seed,
        "identity_before": before.identity, "identity_after": after.identity,
        "composition_after": after.composition, "composition_base": base_class.composition,
        "composition_joint_after": after.composition_joint, "composition_joint_base": base_class.composition_joint,
        "before": before.to_dict(), "after": after.to_dict(), "base_on_class_prompt": base_class.to_dict(),
        "summary": summary_line(result.concept.history),
        "drift": drift_line(result.concept.meta.drift_initial, result.concept.meta.drift_final),
        "train_seconds": round(trained_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
        "files": {name: str(out / name) for name in ("grid.png", "scores.json", "concept.safetensors", "loss.png")},
    }
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def _score_demo(base: Path, concept, spec, instance: str, cls: str, references: list, out: Path):
    """The checker's scores of the token at its start, the base on the class prompt and the trained
    concept (before, base_class, after), and the demo's grid written to ``out``/grid.png."""
    import torch

    from ..concept.apply import apply_concept
    from ..concept.generate import build_pipeline
    from .base import WEIGHTS, ToyClip
    from .checker import Checker
    from .evaluate import picture_grid, score

    pipe = build_pipeline(base, device="cpu")
    checker = Checker.load(WEIGHTS / "checker.safetensors")  # the judge is always the committed one
    clip = ToyClip(base.parent)
    base_pictures, concept_pictures = {}, {}
    with torch.no_grad():
        # Before: the token as training starts it (its initializer word in its place), the K/V untouched.
        start_word = cls if spec.initializer == "class" else spec.initializer
        before = score(pipe, checker, clip, instance, f"{start_word} {cls}", references, DEMO_SEEDS)
        base_class = score(pipe, checker, clip, instance, cls, references, DEMO_SEEDS, keep=base_pictures)
        applied = apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        after = score(pipe, checker, clip, instance, f"<sks> {cls}", references, DEMO_SEEDS, keep=concept_pictures)
        applied.remove()

    shown = 4  # the composition prompt of the grid: another scene with a hat
    rows = [references[:len(DEMO_SEEDS)], base_pictures["concept"], base_pictures["composition"][shown - 1],
            concept_pictures["concept"], concept_pictures["composition"][shown - 1]]
    labels = ["training pictures", f"base: {base_pictures['prompts'][0]}", f"base: {base_pictures['prompts'][shown]}",
              f"concept: {concept_pictures['prompts'][0]}", f"concept: {concept_pictures['prompts'][shown]}"]
    picture_grid(rows, labels, scale=3).save(out / "grid.png")
    return before, base_class, after


SDXL_DISCLAIMER = (
    "NOTE: `demo --family sdxl` trains on a tiny SDXL-shaped base with RANDOM weights, built in DIR/base "
    "(both text encoders at their real widths, a small UNet): it shows the SDXL path end to end — two "
    "encoders, pooled and size conditioning, a [768 | 1280] token, clip_l/clip_g embeddings — not a "
    "learned look. For real pictures train on an SDXL checkpoint with photos of your concept."
)


def run_sdxl_demo(out: str | Path, *, steps: int = 10, spl_weight: float = 1.0, seed: int = 0,
                  instance: str = DEMO_INSTANCE, method: str | None = None, progress: bool = True) -> dict:
    """Build a tiny SDXL-shaped random base in ``out``/base (kept for reruns), train ``instance``'s
    pictures on it and write ``out``/{concept.safetensors, concept_embedding.safetensors, loss.png,
    scores.json}; returns the summary."""
    from ..concept import save_embeddings
    from ..config import ConceptSpec, TrainConfig
    from ..hosts.diffusers_host import load_host
    from ..methods import DEFAULT_METHOD, method_class
    from ..run.plot import plot_history
    from ..run.progress import TqdmCallbacks
    from ..run.summary import summary_line
    from ..model.tiny import build_tiny_sdxl_base
    from .evaluate import instance_pictures
    from .world import World
    from ..run.train import train

    method = method or DEFAULT_METHOD
    out = Path(out)
    started = time.perf_counter()
    base = out / "base"
    if not (base / "model_index.json").is_file():
        build_tiny_sdxl_base(base, seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k, picture in enumerate(instance_pictures(instance, seed=seed)):
        picture.save(out / "images" / f"{instance}_{k:02d}.png")
    host = load_host(base, device="cpu")
    spec = ConceptSpec(token="<sks>", class_word=World().instance(instance).cls, images=[str(out / "images")])
    config = TrainConfig(method=method, steps=steps, spl_weight=spl_weight, seed=seed, resolution=64,
                         drift_every=max(1, steps // 2))
    result = train(host, [spec], config, out=out / "concept.safetensors",
                   callbacks=TqdmCallbacks(enabled=progress, description=f"{method_class(method).label} (SDXL)"),
                   meta_extra={"base_name": "tiny SDXL-shaped random base"})
    plot_history(result.concept.history, tokens=result.concept.tokens).save(out / "loss.png")
    files = {"concept.safetensors": str(out / "concept.safetensors"), "loss.png": str(out / "loss.png")}
    if result.concept.tokens:
        embedding = save_embeddings(result.concept, out, "concept_embedding")[0]
        files[embedding.name] = str(embedding)
    summary = {"family": host.family.name, "method": method, "steps": steps, "spl_weight": spl_weight, "seed": seed,
               "token_width": int(result.concept.token_vectors.shape[-1]) if result.concept.tokens else 0,
               "layers": len(result.concept.deltas) or len(result.concept.method_tensors),
               "summary": summary_line(result.concept.history), "seconds": round(time.perf_counter() - started, 1),
               "files": files}
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
