"""The training host for diffusers + transformers models (the standalone CLI uses it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import BaseModelError, InvalidInputError
from ..text import TransformersTextEncoder
from ..kv import cross_attention_weights
from .base import SD15_CONTEXT_DIM, HostBase

logger = logging.getLogger("classdiffusion")


class DiffusersHost(HostBase):
    """Frozen SD1.5 components from diffusers/transformers behind the TrainingHost interface."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, device: torch.device | str):
        device = torch.device(device)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        check_sd15_shaped(unet, text_encoder)
        if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
            raise BaseModelError(
                f"The base model predicts {scheduler.config.prediction_type!r}, not noise (ε): "
                "ClassDiffusion trains SD1.5-style ε-prediction models only."
            )
        for model in (text_encoder, unet, vae):
            model.requires_grad_(False)
            model.eval()
            model.to(device)
        super().__init__(device, TransformersTextEncoder(tokenizer, text_encoder, device),
                         scheduler.alphas_cumprod, unet)
        self._scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return (
            dist.mean.float() * self._scaling_factor,
            dist.std.float() * self._scaling_factor,
        )

    def _vae_module(self):
        return self.vae

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = self.vae.decode((latents / self._scaling_factor).to(self.device, self.vae.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1)

    def predict_noise(self, noisy_latents, timesteps, context) -> torch.Tensor:
        return self._forward(noisy_latents, timesteps, encoder_hidden_states=context).sample

    def cross_attention_weights(self, train_mode: str) -> dict[str, torch.Tensor]:
        return cross_attention_weights(self.unet, train_mode)

    def delta_modules(self, names: Sequence[str]) -> dict[str, nn.Module]:
        return dict(self.unet.named_modules())

    def _configure_memory(self, config) -> None:
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers only checkpoints in training mode; no dropout in SD1.5
            if hasattr(self.text_encoder, "gradient_checkpointing_enable"):
                self.text_encoder.gradient_checkpointing_enable()
                self.text_encoder.train()
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor() if config.attention == "eager" else AttnProcessor2_0())


def check_sd15_shaped(unet: nn.Module, text_encoder: nn.Module) -> None:
    """SD1.5 = 4-channel latents and a 768-wide CLIP-L context (SD2.x has 1024, SDXL 2048)."""
    context_dim = unet.config.cross_attention_dim
    if isinstance(context_dim, (list, tuple)):
        context_dim = context_dim[0]
    text_dim = text_encoder.config.hidden_size
    if context_dim != SD15_CONTEXT_DIM or text_dim != SD15_CONTEXT_DIM:
        raise BaseModelError(
            f"This base model is not SD1.5-shaped: its cross-attention context is {context_dim} wide "
            f"and its text encoder {text_dim} (SD1.5: {SD15_CONTEXT_DIM}). ClassDiffusion here trains "
            "Stable Diffusion 1.x models (and fine-tunes of them); SD2.x and SDXL are not supported."
        )
    if unet.config.in_channels != 4:
        raise BaseModelError(
            f"This UNet takes {unet.config.in_channels} input channels, not 4: inpainting and other "
            "special UNets are not supported; use a plain SD1.5 checkpoint."
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Keys a loader may report without a weight being lost (buffers rebuilt from the config).
_HARMLESS_KEYS = ("position_ids",)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _load_checked(model_class, folder: Path, dtype: torch.dtype):
    """``from_pretrained`` that refuses a model whose weights were not all loaded.

    transformers and diffusers only *warn* when checkpoint keys do not fit the model and leave
    those weights randomly initialised (e.g. a text encoder saved by transformers 5 without the
    ``text_model.`` prefix, read by transformers 4): training would silently run on noise."""
    try:
        model, info = model_class.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                  output_loading_info=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as exc:
        raise BaseModelError(
            f"{folder} cannot be loaded as a {model_class.__name__} ({_first_line(exc)}). It needs its "
            "config.json and its weights as .safetensors (pickled .bin weights are never read)."
        ) from None
    problems = {}
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else str(k[0]) for k in (info.get(kind) or [])]
        keys = sorted(k for k in keys if not k.endswith(_HARMLESS_KEYS))
        if keys:
            problems[kind.replace("_keys", "")] = keys
    if problems:
        detail = "; ".join(f"{kind}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''} ({len(keys)} in all)"
                           for kind, keys in problems.items())
        raise BaseModelError(
            f"{folder}: the weights do not fit the {model_class.__name__} they are loaded into ({detail}). "
            "Those weights would be random. The folder was probably written by another transformers/"
            "diffusers version with another key layout, or is incomplete: re-save it with "
            "StableDiffusionPipeline.save_pretrained, or use the original checkpoint file."
        )
    return model


def load_components(
    base: str | Path,
    *,
    base_config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Loads (tokenizer, text_encoder, unet, vae, scheduler) from a local diffusers folder or a
    single-file SD1.5 checkpoint (``.safetensors``; needs ``base_config``, a local diffusers
    folder holding the configs, since nothing is fetched from a hub)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(base)
    if not base.exists():
        raise InvalidInputError(f"The base model {base} does not exist.")
    if base.is_dir():
        missing = [s for s in ("tokenizer", "text_encoder", "unet", "vae", "scheduler") if not (base / s).is_dir()]
        if missing:
            raise BaseModelError(
                f"{base} is not a diffusers Stable Diffusion folder: it lacks {missing}. Give a folder "
                "saved by StableDiffusionPipeline.save_pretrained or an SD1.5 .safetensors file."
            )
        try:
            tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
            scheduler = DDPMScheduler.from_pretrained(base / "scheduler", local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise BaseModelError(f"{base}: its tokenizer or scheduler folder cannot be read ({_first_line(exc)}).") from None
        text_encoder = _load_checked(CLIPTextModel, base / "text_encoder", dtype)
        unet = _load_checked(UNet2DConditionModel, base / "unet", dtype)
        vae = _load_checked(AutoencoderKL, base / "vae", dtype)
        return tokenizer, text_encoder, unet, vae, scheduler
    if not base.is_file():
        raise InvalidInputError(f"The base model {base} is neither a folder nor a regular file.")
    if base.suffix.lower() not in (".safetensors", ".sft"):
        raise InvalidInputError(
            f"{base.name}: only diffusers folders and .safetensors checkpoints are loaded "
            "(pickled .ckpt files can run code; convert them to .safetensors first)."
        )
    if base_config is None:
        raise InvalidInputError(
            "A single-file checkpoint needs --base-config DIR: a local diffusers SD1.5 folder "
            "(model_index.json and the component configs/tokenizer; weights not needed), since "
            "no configuration is downloaded."
        )
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(base), config=str(base_config), local_files_only=True, torch_dtype=dtype,
            safety_checker=None, requires_safety_checker=False,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise BaseModelError(
            f"{base.name} cannot be loaded as an SD1.5 checkpoint with the configs in {base_config} "
            f"({_first_line(exc)})."
        ) from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, scheduler


def load_host(
    base: str | Path,
    *,
    base_config: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusersHost:
    """A training host for a local SD1.5 base (diffusers folder or single file)."""
    components = load_components(base, base_config=base_config, dtype=dtype)
    return DiffusersHost(*components, device=device or default_device())
