"""`classdiffusion eval`: one report of what a concept costs, as JSON and a PNG summary.

Data flow: base + concept files → (text encoder) drift before/after → (UNet, no images) Latent
Fisher divergence on prompts without the concept → (pipeline) images of the DreamBooth prompts
from the base (class word) and the tuned model (token), same seeds → CLIP-T / CLIP-I / DINO-I when
those models are given, and the Wasserstein metric on their features (else on the latents).
"""

from __future__ import annotations

import json
import re
import logging
import math
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..concept.apply import apply_concept
from ..concept import Concept, load_concept
from ..run.data import load_images
from ..errors import InvalidInputError
from ..hosts.diffusers_host import DiffusersHost, default_device, load_components
from ..run.plot import plot_drift_map
from .drift import concept_drifts, summary as drift_summary
from .image_metrics import GENERIC_PROMPTS, ClipScorer, DinoScorer, clip_t, dreambooth_prompts, image_similarity, replace_token
from .overfitting import latent_fisher_divergence, wasserstein_metric

logger = logging.getLogger("classdiffusion")


def _combined_deltas(concepts: Sequence[Concept]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for concept in concepts:
        for name, delta in concept.deltas.items():
            total[name] = total.get(name, 0) + delta.float()
    return total


def _read_prompts(path: str | Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise InvalidInputError(f"{path} has no prompts (one per line).")
    return prompts


def evaluate(
    base: str | Path,
    concept_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    base_config: str | Path | None = None,
    device: str | None = None,
    clip: str | Path | None = None,
    dino: str | Path | None = None,
    reference_images: Sequence[str | Path] | None = None,
    prompts_file: str | Path | None = None,
    subject_kind: str = "auto",
    num_images: int = 1,
    steps: int | None = None,
    guidance: float = 6.0,
    size: int | None = None,
    seed: int = 0,
    fisher_prompts_file: str | Path | None = None,
    fisher_steps: int = 20,
    map_method: str = "pca",
    images: bool = True,
    strict: bool = True,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    say: Callable[[str], None] = logger.info,
) -> dict:
    """Evaluate concepts on their base; writes ``report.json``, ``summary.png``, the drift maps and the
    generated images to ``out_dir`` and returns the report. ``steps=None`` picks a count for the model
    at hand (50 for SD1.5-sized UNets, 10 for small test bases). Before the work starts, ``say`` gets
    the plan with a time estimate measured on this machine; ``progress(phase, total)`` returns the
    function to call after each unit of a phase."""
    progress = progress or (lambda phase, total: (lambda: None))
    concepts, device, host = _load(base, concept_paths, base_config, device, num_images, steps)
    (out_dir := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    size = size or int(host.unet.config.sample_size) * 8
    steps = steps or default_sampling_steps(host.unet)
    fisher_prompts = _read_prompts(fisher_prompts_file) if fisher_prompts_file else list(GENERIC_PROMPTS)
    say(_plan(host, size, concepts, steps, num_images, len(_tuned_prompts(concepts, prompts_file, subject_kind))
              if images else 0, len(fisher_prompts), fisher_steps))
    settings = dict(steps=steps, guidance=guidance, size=size, seed=seed, num_images=num_images, map_method=map_method)
    report: dict = {"base": str(base), "concepts": [str(p) for p in concept_paths], "drift": [],
                    "methods": [c.method for c in concepts], "settings": settings}
    # 1. Semantic drift (text encoder only).
    maps = _drift_section(host, concepts, out_dir, report, map_method=map_method, strict=strict)
    # 2. Concept-agnostic overfitting: Latent Fisher divergence on prompts without the concept.
    fisher = latent_fisher_divergence(host, _combined_deltas(concepts), fisher_prompts,
                                      tokens=[t for c in concepts for t in c.tokens], steps=fisher_steps,
                                      seeds=(seed,), latent_size=size // 8, concepts=concepts,
                                      progress=progress("Latent Fisher divergence", len(fisher_prompts) * fisher_steps))
    report["latent_fisher_divergence"] = fisher.to_dict()
    host.close()
    # 3. Images of the DreamBooth prompts: base with the class word, tuned with the token.
    if images:
        report.update(_image_metrics(host.tokenizer, host.text_encoder, host.unet, host.vae, host.scheduler, device,
                                     concepts, out_dir,
                                     clip=clip, dino=dino, reference_images=reference_images,
                                     prompts_file=prompts_file, subject_kind=subject_kind, num_images=num_images,
                                     steps=steps, guidance=guidance, size=size, seed=seed, progress=progress))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=_jsonable))
    summary_image(report, maps).save(out_dir / "summary.png")
    return report


def _load(base, concept_paths, base_config, device, num_images: int, steps: int | None):
    """(the concepts, the device, a host over the base's components), after the inputs' checks."""
    if num_images < 1 or (steps is not None and steps < 1):
        raise InvalidInputError("num_images and steps must be at least 1.")
    concepts = [load_concept(p) for p in concept_paths]
    if not concepts:
        raise InvalidInputError("Give at least one concept file.")
    device = torch.device(device) if device else default_device()
    tokenizer, text_encoder, unet, vae, scheduler = load_components(base, base_config=base_config)
    return concepts, device, DiffusersHost(tokenizer, text_encoder, unet, vae, scheduler, device)


def _drift_section(host, concepts, out_dir: Path, report: dict, *, map_method: str, strict: bool) -> list:
    """Each token's semantic drift (text encoder only) into ``report["drift"]``, with its map
    drawn to ``out_dir``; returns the map pictures."""
    maps: list[Image.Image] = []
    for concept in concepts:
        concept.check_against(host.cross_attention_weights(concept.train_mode), strict=strict)
        host.add_tokens(concept.tokens)
        for drift in concept_drifts(host.encode_text, host.word_embedding, concept, method=map_method,
                                    device=host.device):
            drift_map = drift.pop("map")
            name = f"drift_{len(report['drift'])}.png"
            image = plot_drift_map(drift_map)
            image.save(out_dir / name)
            maps.append(image)
            drift.update(map=drift_map.to_dict(), map_image=name, summary=drift_summary(drift))
            report["drift"].append(drift)
    return maps


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(type(value).__name__)


def default_sampling_steps(unet) -> int:
    """50 DDIM steps for an SD1.5-sized UNet; 10 for small test bases (the demo's), whose images
    only show the mechanics and whose 50-step runs would take minutes for nothing."""
    parameters = sum(p.numel() for p in unet.parameters())
    return 50 if parameters > 100_000_000 else 10


def _tuned_prompts(concepts, prompts_file, subject_kind) -> list[str]:
    if prompts_file:
        return _read_prompts(prompts_file)
    # Infusion concepts have no token: their prompts say the class word alone ("a dog in the jungle").
    return [p for c in concepts for t, w in zip(c.tokens or [""] * len(c.class_words), c.class_words)
            for p in _concept_prompts(t, w, subject_kind)]


def _plan(host, size: int, concepts, steps: int, num_images: int, image_prompts: int, fisher_prompts: int,
          fisher_steps: int) -> str:
    """What eval will do and how long it should take here (one UNet call timed on this device)."""
    import time

    latent = torch.zeros(2, 4, size // 8, size // 8, device=host.device)
    context = host.encode_text(["", "a photo"], {}).context
    with torch.no_grad():
        host.predict_noise(latent, torch.tensor([500, 500], device=host.device), context)  # warm-up
        start = time.perf_counter()
        host.predict_noise(latent, torch.tensor([500, 500], device=host.device), context)
        if host.device.type == "cuda":
            torch.cuda.synchronize()
        per_call = time.perf_counter() - start
    image_calls = image_prompts * num_images * steps * 2  # base and tuned, one CFG batch per step
    fisher_calls = fisher_prompts * fisher_steps * 2
    total = (image_calls + fisher_calls) * per_call

    def minutes(seconds: float) -> str:
        return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"

    lines = [f"eval plan ({len(concepts)} concept(s), {size} px, one UNet call ≈ {per_call * 1000:.0f} ms here):",
             f"  drift of each token; Latent Fisher divergence: {fisher_prompts} prompts × {fisher_steps} steps"]
    if image_prompts:
        lines.append(f"  images: {image_prompts} prompts × {num_images} image(s) × {steps} steps, base and tuned")
        lines.append(f"  ≈ {minutes(total)} in all; --no-images for drift and Fisher only (≈ {minutes(fisher_calls * per_call)})")
    else:
        lines.append(f"  ≈ {minutes(total)} in all (no images)")
    return "\n".join(lines)


def _image_metrics(tokenizer, text_encoder, unet, vae, scheduler, device, concepts, out_dir, *, clip, dino,
                   reference_images, prompts_file, subject_kind, num_images, steps, guidance, size, seed,
                   progress=None) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    tokens = [t for c in concepts for t in c.tokens]
    tuned_prompts = _tuned_prompts(concepts, prompts_file, subject_kind)
    base_prompts = [replace_token(p, tokens) for p in tuned_prompts]

    def run(prompts: list[str], folder: str) -> tuple[list[Image.Image], torch.Tensor]:
        (out_dir / folder).mkdir(exist_ok=True)
        advance = (progress or (lambda phase, total: (lambda: None)))(
            f"images ({folder.removeprefix('images_')})", len(prompts) * num_images)
        pictures, latents = [], []
        for i, prompt in enumerate(prompts):
            for j in range(num_images):
                generator = torch.Generator(device=pipe.device).manual_seed(seed + j)
                latent = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, eta=1.0, height=size,
                              width=size, generator=generator, output_type="latent").images
                with torch.no_grad():
                    decoded = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
                picture = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
                picture.save(out_dir / folder / f"{i:03d}-{j:02d}.png")
                pictures.append(picture)
                latents.append(latent.float().cpu().flatten())
                advance()
        return pictures, torch.stack(latents)

    base_pictures, base_latents = run(base_prompts, "images_base")
    handles = [apply_concept(pipe.unet, c, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer) for c in concepts]
    try:
        tuned_pictures, tuned_latents = run(tuned_prompts, "images_tuned")
    finally:
        for handle in reversed(handles):
            handle.remove()
    prompts_per_image = [p for p in tuned_prompts for _ in range(num_images)]
    base_prompts_per_image = [p for p in base_prompts for _ in range(num_images)]
    result: dict = {"prompts": tuned_prompts, "images": {"count": len(tuned_pictures)}}
    references = _references(concepts, reference_images)
    result["images"]["references"] = len(references)
    features = _scores(result["images"], clip, dino, device, tokens, references,
                       (tuned_pictures, prompts_per_image), (base_pictures, base_prompts_per_image))
    features = features or ("latents", tuned_latents, base_latents)
    if len(tuned_pictures) >= 2:
        result["wasserstein"] = wasserstein_metric(features[1], features[2], features[0]).to_dict()
    result["thumbnails"] = [str(Path("images_tuned") / f"{i:03d}-00.png") for i in range(min(6, len(tuned_prompts)))]
    return result


def _scores(scores: dict, clip, dino, device, tokens, references, tuned, base) -> tuple | None:
    """CLIP-T, CLIP-I and DINO-I of the tuned and the base pictures into ``scores``; returns the
    features the Wasserstein metric compares (DINO's if given, else CLIP's, else None)."""
    (tuned_pictures, tuned_prompts), (base_pictures, base_prompts) = tuned, base
    features = None
    if clip:
        scorer = ClipScorer(clip, device)
        scores["clip_t"] = clip_t(scorer, tuned_pictures, tuned_prompts, tokens)
        scores["clip_t_base"] = clip_t(scorer, base_pictures, base_prompts, tokens)
        if references:
            scores["clip_i"] = image_similarity(scorer, tuned_pictures, references)
            scores["clip_i_base"] = image_similarity(scorer, base_pictures, references)
        features = ("clip", scorer.image_features(tuned_pictures), scorer.image_features(base_pictures))
    if dino:
        scorer = DinoScorer(dino, device)
        if references:
            scores["dino_i"] = image_similarity(scorer, tuned_pictures, references)
            scores["dino_i_base"] = image_similarity(scorer, base_pictures, references)
        features = ("dino", scorer.image_features(tuned_pictures), scorer.image_features(base_pictures))
    return features


def _concept_prompts(token: str, class_word: str, kind: str) -> list[str]:
    return [re.sub(r"\s+", " ", p).strip() for p in dreambooth_prompts(token, class_word, kind)]


def _references(concepts: Sequence[Concept], given) -> list[Image.Image]:
    if given:
        return load_images(given, "reference")
    paths = [p for c in concepts for spec in c.meta.concepts or [] for p in spec.get("images", [])]
    existing = [p for p in paths if Path(p).exists()]
    if not existing:
        if paths:
            logger.warning("The concept's training images are gone; CLIP-I/DINO-I need --reference-images.")
        return []
    return load_images(existing, "reference")


def summary_image(report: dict, maps: Sequence[Image.Image], width: int = 1280) -> Image.Image:
    """Drift map(s) on the left, the numbers on the right."""
    font = ImageFont.load_default()
    lines = ["ClassDiffusion evaluation", ""]
    for drift in report["drift"]:
        lines.append(drift["summary"])
    fisher = report.get("latent_fisher_divergence")
    if fisher:
        lines += ["", f"Latent Fisher divergence (concept-agnostic overfitting, {fisher['weighting']}-weighted): "
                  f"{fisher['value']:.6g}", "  lower = the model kept more of what it knew about other things"]
    metrics = report.get("images", {})
    for key, label in (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I")):
        if key in metrics:
            lines.append(f"{label}: {metrics[key]:.4f}  (base model: {metrics.get(key + '_base', math.nan):.4f})")
    w = report.get("wasserstein")
    if w:
        ratio = w.get("spread_ratio")
        lines += [f"Wasserstein-2 ({w['features']} features; concept-specific overfitting): {w['value']:.5g}",
                  f"  spread tuned/base: {ratio:.3f}" if ratio is not None else ""]
    lines = [piece for line in lines  # PIL's default font has no arrow glyph
             for piece in (textwrap.wrap(line.replace("→", "->"), 100, subsequent_indent="    ") or [""])]
    map_w = 640
    text_h = 16 * len(lines) + 20
    height = max(sum(m.height for m in maps) if maps else 0, text_h)
    image = Image.new("RGB", (width, max(height, 200)), (255, 255, 255))
    y = 0
    for m in maps:
        image.paste(m, (0, y))
        y += m.height
    draw = ImageDraw.Draw(image)
    x = map_w + 10 if maps else 10
    for i, line in enumerate(lines):
        draw.text((x, 10 + 16 * i), line, fill=(0, 0, 0), font=font)
    return image
