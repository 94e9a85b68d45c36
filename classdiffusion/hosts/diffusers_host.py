"""The training host for diffusers + transformers models (the standalone CLI uses it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BaseModelError, InvalidInputError
from ..host import SD15_CONTEXT_DIM, TextFeatures

logger = logging.getLogger("classdiffusion")


class TokenInjectingEmbedding(nn.Module):
    """Wraps the text encoder's token embedding: rows of added tokens come from trainable
    vectors supplied per call, every other row from the frozen matrix (which is never resized,
    so the rest of the vocabulary stays bit-identical)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.token_ids: dict[str, int] = {}
        self.vectors: Mapping[str, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight for dtype/device checks
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        new_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.token_ids.values():
            new_mask |= input_ids == token_id
        safe_ids = torch.where(new_mask, torch.zeros_like(input_ids), input_ids)
        out = self.base(safe_ids)
        for token, token_id in self.token_ids.items():
            vector = self.vectors.get(token)
            if vector is None:
                if bool((input_ids == token_id).any()):
                    raise InvalidInputError(f"No vector was given for the token {token!r}.")
                continue
            hit = (input_ids == token_id).unsqueeze(-1)
            out = torch.where(hit, vector.to(out.dtype).expand_as(out), out)
        return out


class DiffusersHost:
    """Frozen SD1.5 components from diffusers/transformers behind the TrainingHost interface."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, device: torch.device | str):
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        check_sd15_shaped(unet, text_encoder)
        for model in (text_encoder, unet, vae):
            model.requires_grad_(False)
            model.eval()
            model.to(self.device)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.text_dim = int(text_encoder.config.hidden_size)
        self._alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
            raise BaseModelError(
                f"The base model predicts {scheduler.config.prediction_type!r}, not noise (ε): "
                "ClassDiffusion trains SD1.5-style ε-prediction models only."
            )
        self._injector = TokenInjectingEmbedding(text_encoder.get_input_embeddings())
        text_encoder.set_input_embeddings(self._injector)
        self._token_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))

    # -- text -------------------------------------------------------------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def vocabulary_id(self, word: str) -> int | None:
        """The id of ``word`` if the tokenizer has it as one whole word, else None."""
        vocab = self.tokenizer.get_vocab()
        for key in (word, word.lower(), word + "</w>", word.lower() + "</w>"):
            if key in vocab:
                return vocab[key]
        return None

    def add_tokens(self, tokens: Sequence[str]) -> None:
        for token in tokens:
            if token in self._injector.token_ids:
                continue
            if self.vocabulary_id(token) is not None:
                raise InvalidInputError(
                    f"The token {token!r} is already a word of the tokenizer's vocabulary; training "
                    "it would change that word everywhere. Pick a new word such as '<sks>' or '<my-dog>'."
                )
            self.tokenizer.add_tokens([token])
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            probe = self.tokenizer(f"a {token} b", add_special_tokens=False).input_ids
            if probe.count(token_id) != 1:
                raise InvalidInputError(
                    f"The tokenizer does not keep {token!r} as one token; use letters, digits, '<>' or '-'."
                )
            self._injector.token_ids[token] = token_id
        self._token_cache.clear()

    def word_token_count(self, word: str) -> int:
        return len(self.tokenizer(word, add_special_tokens=False).input_ids)

    def word_embedding(self, word: str) -> torch.Tensor:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise InvalidInputError(f"The word {word!r} gives no tokens; use a real word.")
        known = [i for i in ids if i not in self._injector.token_ids.values()]
        if not known:
            raise InvalidInputError(f"The initializer {word!r} is itself a new token; use a word.")
        rows = self._injector.base.weight[torch.tensor(known, device=self._injector.base.weight.device)]
        return rows.float().mean(0).detach().clone()

    def _tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(prompts)
        cached = self._token_cache.get(key)
        if cached is None:
            ids = self.tokenizer(
                list(prompts),
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            eos_id = self.tokenizer.eos_token_id
            is_eos = ids == eos_id
            if not bool(is_eos.any(dim=1).all()):
                raise InvalidInputError("A prompt is too long: its end-of-text token was cut off.")
            eos_pos = is_eos.int().argmax(dim=1)  # first EOS = the real end of the prompt
            cached = (ids.to(self.device), eos_pos.to(self.device))
            if len(self._token_cache) < 4096:
                self._token_cache[key] = cached
        return cached

    def encode_text(
        self, prompts: Sequence[str], token_vectors: Mapping[str, torch.Tensor]
    ) -> TextFeatures:
        ids, eos_pos = self._tokenize(prompts)
        self._injector.vectors = token_vectors
        try:
            hidden = self.text_encoder(ids).last_hidden_state
        finally:
            self._injector.vectors = {}
        eos = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_pos]
        return TextFeatures(context=hidden, eos=eos)

    # -- images and noise -------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return (
            dist.mean.float() * self._scaling_factor,
            dist.std.float() * self._scaling_factor,
        )

    def predict_noise(self, noisy_latents, timesteps, context) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=context).sample

    # -- trainable weights ------------------------------------------------------------------
    def cross_attention_weights(self, train_mode: str) -> dict[str, torch.Tensor]:
        return cross_attention_weights(self.unet, train_mode)

    def attach_deltas(self, deltas: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        modules = dict(self.unet.named_modules())
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        for name, delta in deltas.items():
            module_name, _, kind = name.rpartition(".")
            if module_name not in modules:
                raise InvalidInputError(f"The UNet has no layer {module_name!r}.")
            per_module.setdefault(module_name, {})[kind] = delta
        handles = []
        for module_name, parts in per_module.items():
            weight, bias = parts.get("weight"), parts.get("bias")

            def hook(module, inputs, output, weight=weight, bias=bias):
                x = inputs[0]
                if weight is None:
                    return output + bias.to(output.dtype)
                return output + F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

            handles.append(modules[module_name].register_forward_hook(hook))

        def detach() -> None:
            for handle in handles:
                handle.remove()

        return detach

    def configure_training(self, gradient_checkpointing: bool, attention: str) -> None:
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers only checkpoints in training mode; no dropout in SD1.5
            if hasattr(self.text_encoder, "gradient_checkpointing_enable"):
                self.text_encoder.gradient_checkpointing_enable()
                self.text_encoder.train()
        if attention == "eager":
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())

    def close(self) -> None:
        """Give the text encoder its plain embedding back."""
        self.text_encoder.set_input_embeddings(self._injector.base)


def cross_attention_weights(unet: nn.Module, train_mode: str) -> dict[str, torch.Tensor]:
    """Canonical-name → weight for every UNet cross-attention (attn2) layer that is trained."""
    suffixes = (".attn2.to_k", ".attn2.to_v")
    if train_mode == "crossattn":
        suffixes += (".attn2.to_q", ".attn2.to_out.0")
    out: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if name.endswith(suffixes) and isinstance(module, nn.Linear):
            out[f"{name}.weight"] = module.weight
            if module.bias is not None and train_mode == "crossattn":
                out[f"{name}.bias"] = module.bias
    if not out:
        raise BaseModelError("The UNet has no cross-attention (attn2) layers: it is not an SD1.5 UNet.")
    return dict(sorted(out.items()))


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
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=dtype, local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=dtype, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(base / "scheduler", local_files_only=True)
        return tokenizer, text_encoder, unet, vae, scheduler
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

    pipe = StableDiffusionPipeline.from_single_file(
        str(base), config=str(base_config), local_files_only=True, torch_dtype=dtype,
        safety_checker=None, requires_safety_checker=False,
    )
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
