"""The training host for diffusers + transformers models (the standalone CLI uses it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import BaseModelError, InvalidInputError
from ..model.families import Family, detect_family
from ..model.kv import cross_attention_weights
from .base import HostBase

logger = logging.getLogger("classdiffusion")


class DiffusersHost(HostBase):
    """Frozen SD1.x or SDXL components from diffusers/transformers behind the TrainingHost interface.

    The family is read from the components' shapes (``families.detect_family``). SDXL brings a
    second tokenizer and text encoder (bigG, ``CLIPTextModelWithProjection``); its UNet also takes
    the pooled embedding and the size/crop ids, which ``predict_noise`` adds."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, device: torch.device | str,
                 tokenizer_2=None, text_encoder_2=None):
        device = torch.device(device)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        family = diffusers_family(unet, [text_encoder, text_encoder_2], scheduler)
        tokenizers, encoders = [tokenizer, tokenizer_2][:len(family.text_folders)], \
            [text_encoder, text_encoder_2][:len(family.text_folders)]
        text = family.text_encoder(tokenizers, encoders, device)
        for model in (text_encoder, text_encoder_2, unet, vae):
            if model is not None:
                model.requires_grad_(False)
                model.eval()
                model.to(device)
        self._pooled_width = int(encoders[-1].config.projection_dim) if family.pooled else None
        super().__init__(device, text, scheduler.alphas_cumprod, unet, family)
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
        context, pooled = self.family.unet_inputs(context, self._pooled_width)
        if pooled is None:
            return self._forward(noisy_latents, timesteps, encoder_hidden_states=context).sample
        added = {"text_embeds": pooled, "time_ids": self.family.time_ids(noisy_latents).to(pooled.dtype)}
        return self._forward(noisy_latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

    def cross_attention_weights(self, train_mode: str) -> dict[str, torch.Tensor]:
        return cross_attention_weights(self.unet, train_mode)

    def delta_modules(self, names: Sequence[str]) -> dict[str, nn.Module]:
        return dict(self.unet.named_modules())

    def _configure_memory(self, config) -> None:
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers only checkpoints in training mode; no dropout in SD1.5
            for encoder in (self.text_encoder, self.text_encoder_2):
                if hasattr(encoder, "gradient_checkpointing_enable"):
                    encoder.gradient_checkpointing_enable()
                    encoder.train()
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor() if config.attention == "eager" else AttnProcessor2_0())


def diffusers_family(unet: nn.Module, text_encoders: Sequence[nn.Module | None], scheduler=None) -> Family:
    """The family of diffusers components from their configs (BaseModelError for one not trained here)."""
    context_dim = unet.config.cross_attention_dim
    if isinstance(context_dim, (list, tuple)):
        context_dim = context_dim[0]
    prediction = getattr(scheduler.config, "prediction_type", "epsilon") if scheduler is not None else "epsilon"
    return detect_family(
        context_dim=int(context_dim), in_channels=int(unet.config.in_channels),
        added_conditioning=getattr(unet.config, "addition_embed_type", None),
        text_widths=tuple(int(e.config.hidden_size) for e in text_encoders if e is not None),
        prediction=prediction)


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


#: The diffusers folders every base has; a family adds its further encoders' (``Family.extra_folders``).
SD_FOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def load_base_components(
    base: str | Path,
    *,
    base_config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """The components of a local SD1.x or SDXL base by name (``tokenizer``, ``text_encoder``,
    ``unet``, ``vae``, ``scheduler``, and the family's further encoders, e.g. SDXL's
    ``tokenizer_2``, ``text_encoder_2``), from a diffusers folder or a single-file checkpoint
    (``.safetensors``; needs ``base_config``, a local diffusers folder of the same family holding the
    configs, since nothing is fetched from a hub). The family is read from what the folder or file
    holds, not from its name."""
    base = Path(base)
    if not base.exists():
        raise InvalidInputError(f"The base model {base} does not exist.")
    if base.is_dir():
        return _load_folder(base, dtype)
    if not base.is_file():
        raise InvalidInputError(f"The base model {base} is neither a folder nor a regular file.")
    if base.suffix.lower() not in (".safetensors", ".sft"):
        raise InvalidInputError(
            f"{base.name}: only diffusers folders and .safetensors checkpoints are loaded "
            "(pickled .ckpt files can run code; convert them to .safetensors first)."
        )
    if base_config is None:
        raise InvalidInputError(
            "A single-file checkpoint needs --base-config DIR: a local diffusers folder of the same family "
            "(SD1.5 or SDXL: model_index.json and the component configs/tokenizers; weights not needed), "
            "since no configuration is downloaded."
        )
    return _load_single_file(base, Path(base_config), dtype)


def _folder_extras(base: Path) -> tuple[str, ...]:
    """The further encoder folders ``base`` holds (those of the family with the most that it has)."""
    from ..model.families import FAMILIES

    for family in sorted(FAMILIES.values(), key=lambda f: -len(f.extra_folders)):
        present = [s for s in family.extra_folders if (base / s).is_dir()]
        if present and len(present) != len(family.extra_folders):
            raise BaseModelError(f"{base} has {present[0]} but not {set(family.extra_folders) - set(present)}: a "
                                 f"{family.label} folder needs both; copy the whole folder.")
        if present:
            return family.extra_folders
    return ()


def _load_folder(base: Path, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    missing = [s for s in SD_FOLDERS if not (base / s).is_dir()]
    if missing:
        raise BaseModelError(
            f"{base} is not a diffusers Stable Diffusion folder: it lacks {missing}. Give a folder "
            "saved by StableDiffusionPipeline/StableDiffusionXLPipeline.save_pretrained or a .safetensors file."
        )
    extras = _folder_extras(base)
    tokenizers = ("tokenizer", *extras[0::2])
    try:
        parts = {name: CLIPTokenizer.from_pretrained(base / name, local_files_only=True) for name in tokenizers}
        parts["scheduler"] = DDPMScheduler.from_pretrained(base / "scheduler", local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise BaseModelError(f"{base}: its tokenizers or scheduler folder cannot be read ({_first_line(exc)}).") from None
    parts["text_encoder"] = _load_checked(CLIPTextModel, base / "text_encoder", dtype)
    for name in extras[1::2]:  # the further encoders carry the pooled projection (SDXL's bigG)
        parts[name] = _load_checked(CLIPTextModelWithProjection, base / name, dtype)
    parts["unet"] = _load_checked(UNet2DConditionModel, base / "unet", dtype)
    parts["vae"] = _load_checked(AutoencoderKL, base / "vae", dtype)
    return parts


def _load_single_file(base: Path, base_config: Path, dtype: torch.dtype) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..model.families import SD15, SDXL

    family = SDXL if _single_file_has_second_encoder(base) else SD15
    pipeline = StableDiffusionXLPipeline if family.extra_folders else StableDiffusionPipeline
    extra = {} if family.extra_folders else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = pipeline.from_single_file(str(base), config=str(base_config), local_files_only=True,
                                         torch_dtype=dtype, **extra)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise BaseModelError(
            f"{base.name} cannot be loaded as a {family.label} checkpoint with the configs in "
            f"{base_config} ({_first_line(exc)})."
        ) from None
    parts = {name: getattr(pipe, name) for name in SD_FOLDERS + family.extra_folders}
    parts["scheduler"] = DDPMScheduler.from_config(pipe.scheduler.config)
    return parts


def _single_file_has_second_encoder(path: Path) -> bool:
    """An SDXL single file holds the second text encoder under ``conditioner.embedders.1``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return any(key.startswith("conditioner.embedders.1.") for key in handle.keys())
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise BaseModelError(f"{path.name} is not a readable .safetensors file ({_first_line(exc)}).") from None


def load_components(base: str | Path, *, base_config: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(tokenizer, text_encoder, unet, vae, scheduler) of a local base (see :func:`load_base_components`)."""
    parts = load_base_components(base, base_config=base_config, dtype=dtype)
    return tuple(parts[name] for name in SD_FOLDERS)


def load_host(
    base: str | Path,
    *,
    base_config: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusersHost:
    """A training host for a local SD1.x or SDXL base (diffusers folder or single file)."""
    components = load_base_components(base, base_config=base_config, dtype=dtype)
    return DiffusersHost(**components, device=device or default_device())
