"""Sampling with a concept applied (diffusers StableDiffusionPipeline / StableDiffusionXLPipeline)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..hosts.diffusers_host import default_device, load_base_components
from ..model.embedding_adjustment import DEFAULT_ALPHA, adjust_towards_class
from ..model.text import replace_token
from . import load_concept
from .apply import apply_concept_to_pipeline

logger = logging.getLogger("classdiffusion")


def build_pipeline(base: str | Path, *, base_config=None, device=None, dtype=torch.float32):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for an SDXL base) over a local base, with
    a DDIM scheduler (the paper samples with DDIM-style eta=1.0, 100 steps, guidance 6.0)."""
    import diffusers
    from diffusers import DDIMScheduler

    from ..model.families import family_of_folders

    parts = load_base_components(base, base_config=base_config, dtype=dtype)
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
    family = family_of_folders(parts)
    extra = {} if family.extra_folders else {"safety_checker": None, "feature_extractor": None,
                                             "requires_safety_checker": False}
    pipe = getattr(diffusers, family.pipeline)(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def sample_rows(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                size: int | None = None, tea: float = 0.0, tea_alpha: float = DEFAULT_ALPHA,
                tokens: Sequence[str] = ()) -> list[list]:
    """Pictures of each prompt (outer list) at each seed (inner list); seed ``s`` gives every prompt
    the same starting noise (drawn on the CPU, so a seed means the same noise on every device), so
    the pictures of one column differ only by their prompt."""
    rows: list[list] = [[] for _ in prompts]
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    channels, side = pipe.unet.config.in_channels, size // pipe.vae_scale_factor
    for seed in seeds:
        latents = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(int(seed)))
        latents = latents.expand(len(prompts), -1, -1, -1).clone().to(pipe.device, pipe.unet.dtype)
        text = {"prompt": list(prompts)}
        if tea:  # TEA: the prompts with ``tokens`` turned towards their class prompts
            text = tea_prompt_embeds(pipe, list(prompts), [replace_token(p, tokens) for p in prompts], None, tea,
                                     tea_alpha)
        images = pipe(**text, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                      height=size, width=size).images
        for row, image in zip(rows, images):
            row.append(image)
    return rows


def concept_sampler(pipe, *, steps: int, guidance: float, size: int | None = None, strict: bool = True):
    """``sample(concept_file or None, prompts, seeds)`` over ``pipe`` (the step picker's sampler):
    the file's concept applied for the call and removed after; None samples the base model."""

    def sample(path, prompts: Sequence[str], seeds: Sequence[int]) -> list[list]:
        applied = None
        if path is not None:
            applied = apply_concept_to_pipeline(pipe, load_concept(path), strict=strict)
        try:
            with torch.no_grad():
                return sample_rows(pipe, prompts, seeds, steps=steps, guidance=guidance, size=size)
        finally:
            if applied is not None:
                applied.remove()

    return sample


def generate(
    base: str | Path,
    concept_paths: Sequence[str | Path],
    prompt: str,
    out_dir: str | Path,
    *,
    steps: int = 100,
    guidance: float = 6.0,
    eta: float = 1.0,
    seed: int = 0,
    num_images: int = 1,
    size: int | None = None,
    strength: float = 1.0,
    strict: bool = True,
    base_config=None,
    negative_prompt: str | None = None,
    progress: bool = False,
    tea: float = 0.0,
    tea_alpha: float = DEFAULT_ALPHA,
) -> list[Path]:
    """Generate ``num_images`` images for ``prompt`` with the concepts applied; returns the files.
    ``progress``: a bar over the sampling steps (stderr). ``tea``: TEA's rho (0 = off), the prompt's
    embedding turned towards the class prompt's at sampling time (``model.embedding_adjustment``)."""
    pipe = build_pipeline(base, base_config=base_config)
    pipe.set_progress_bar_config(disable=not progress, desc=f"sampling {num_images} image(s)")
    tokens = []
    for path in concept_paths:
        concept = load_concept(path)
        apply_concept_to_pipeline(pipe, concept, strength=strength, strict=strict)
        tokens += concept.tokens
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = {"prompt": prompt, "negative_prompt": negative_prompt}
    class_prompt = replace_token(prompt, tokens)
    if tea and class_prompt != prompt:  # a prompt without the token is the class prompt already: as it is
        prompts = tea_prompt_embeds(pipe, prompt, class_prompt, negative_prompt, tea, tea_alpha)
    images = pipe(
        **prompts, num_inference_steps=steps, guidance_scale=guidance,
        eta=eta, generator=generator, num_images_per_prompt=num_images, height=size, width=size,
    ).images
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"{seed:05d}-{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def tea_prompt_embeds(pipe, prompt: str | Sequence[str], class_prompt: str | Sequence[str],
                      negative_prompt: str | None, rho: float, alpha: float) -> dict:
    """The pipeline's prompt arguments with TEA applied: each prompt's embeddings (and, on SDXL, its
    pooled embedding, as the source's SDXL-family pipelines do) turned towards its class prompt's; a
    prompt that is its own class prompt (no token in it) and the negative prompt stay as they are."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    classes = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt)

    def encode(texts: list[str]):
        out = pipe.encode_prompt(prompt=texts, device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True,
                                 negative_prompt=None if negative_prompt is None else [negative_prompt] * len(texts))
        return out if len(out) == 4 else (*out, None, None)  # SD1.x: (prompt, negative); SDXL adds pooled

    embeds, negative, pooled, negative_pooled = encode(prompts)
    class_embeds, _, class_pooled, _ = encode(classes)
    changed = torch.tensor([p != c for p, c in zip(prompts, classes)], device=embeds.device)

    def adjusted(own, towards):
        keep = changed.reshape(-1, *([1] * (own.ndim - 1)))
        return torch.where(keep, adjust_towards_class(own, towards, rho, alpha), own)

    out = {"prompt_embeds": adjusted(embeds, class_embeds), "negative_prompt_embeds": negative}
    if pooled is not None:
        out["pooled_prompt_embeds"] = adjusted(pooled, class_pooled)
        out["negative_pooled_prompt_embeds"] = negative_pooled
    return out
