"""The small interface the training loop is written against, and the base both hosts share.

A *host* owns the frozen models (text encoder, UNet, VAE) and the noise schedule of one base
model. The loop never touches them directly, so the same loop runs on diffusers models
(``hosts.diffusers_host``) and inside ComfyUI (the node pack's adapter) without knowing which.
:class:`HostBase` holds what both hosts do the same way (the trainable text encoder copy, the
noise schedule, the K/V delta hooks, the speed options); a host adds its UNet call, its VAE and
the mapping of canonical layer names to its modules.

Layer names are canonical diffusers names of the UNet, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``; a host that stores its
weights under other names translates.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..model.kv import WeightReader, attach_fused_deltas
from ..model.families import SD15, Family
from ..model.text import CombinedTextEncoder, TextFeatures, TransformersTextEncoder

if TYPE_CHECKING:
    from ..config import TrainConfig

logger = logging.getLogger("classdiffusion")


def speed_up_unet(unet: torch.nn.Module, *, channels_last: bool, compile: bool, mode: str = "default",
                  fullgraph: bool = False) -> Callable:
    """The UNet forward a host should call: channels-last in place, and torch.compile'd if asked
    (the trained tensors attached later are traced with it: compilation waits for the first call).
    ``fullgraph``: the whole forward as one graph, an error instead of a silent graph break.
    Compiled kernels are cached across runs (:func:`persistent_compile_cache`)."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if not compile:
        return unet
    persistent_compile_cache()
    return torch.compile(unet, mode=None if mode == "default" else mode, fullgraph=fullgraph)


def persistent_compile_cache() -> str:
    """Keep torch.compile's caches (Inductor's FX graph and AOTAutograd caches, on by default) in
    the user's cache folder instead of the temporary one, so a later run — after a reboot too —
    loads the compiled step instead of compiling again. TORCHINDUCTOR_CACHE_DIR, when set, wins."""
    import os
    from pathlib import Path

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "classdiffusion" / "torch-compile")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@runtime_checkable
class TrainingHost(Protocol):
    """What a base model must offer to be trained by :func:`classdiffusion.run.train.train`."""

    device: torch.device
    #: The model family (``classdiffusion.model.families``): SD1.x or SDXL.
    family: Family
    #: Number of DDPM training timesteps (1000 for SD1.5).
    num_train_timesteps: int
    #: Width of the text features / token embeddings (768 for SD1.5; SDXL: 768 + 1280, one token's
    #: vectors for both encoders side by side).
    text_dim: int

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T-1 as float32 on ``device`` (SD1.5: scaled-linear betas 0.00085–0.012)."""

    def add_tokens(self, tokens: Sequence[str]) -> None:
        """Make the tokenizer understand the new tokens; raise InvalidInputError for a token
        that is already a word of the vocabulary."""

    def word_token_count(self, word: str) -> int:
        """How many tokens the tokenizer splits ``word`` into (1 for a known word)."""

    def initializer_ids(self, word: str) -> list[int]:
        """The vocabulary ids a new token starting from ``word`` takes its vector from: the one
        piece ``word`` is, as the official code looks it up, else the pieces a prompt splits it into."""

    def word_embedding(self, word: str) -> torch.Tensor:
        """A token's start, float32 [D]: the mean input embedding of :meth:`initializer_ids`."""

    def encode_text(
        self, prompts: Sequence[str], token_vectors: Mapping[str, torch.Tensor], *,
        tokens_without_position: bool = False, eos_only: bool = False,
    ) -> TextFeatures:
        """Encode prompts in which each token of ``token_vectors`` is replaced by its vector.

        Gradients must flow from the outputs into ``token_vectors`` and nowhere else.
        ``tokens_without_position``: the tokens enter without their position embedding, as in the
        official code's SPL encoder (for ``spl_feature="official"`` only). ``eos_only``: only
        ``eos`` is used (the host may skip the positions after the last EOS).
        """

    def word_ids(self, word: str) -> list[int]:
        """The token ids ``word`` becomes inside a prompt (a method acting at a word finds it with them)."""

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, T] token ids of the prompts as ``encode_text`` runs them."""

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE-encode images in [-1, 1], [B, 3, H, W] → (mean, std) of the scaled latent
        distribution, float32 [B, 4, H/8, W/8]. Called once per image variant, never per step."""

    def predict_noise(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """ε-prediction of the UNet for x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at integer timesteps t."""

    def cross_attention_weights(self, train_mode: str) -> dict[str, torch.Tensor]:
        """The base weights the run trains deltas for, by canonical name ('kv': attn2.to_k/to_v
        weights; 'crossattn': every attn2 weight and bias). Read-only views, any dtype."""

    def attach_deltas(self, deltas: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Make the UNet compute with ``base + delta`` for each named weight, with gradients
        reaching the deltas. Returns a function that detaches them again."""

    def delta_modules(self, names: Sequence[str]) -> dict[str, nn.Module]:
        """The UNet's modules that hold the named weights, by canonical module name (at least
        those): generic module access for a method that hooks its own tensors in."""

    def sample_images(self, context: torch.Tensor, uncond: torch.Tensor, *, seeds: Sequence[int], steps: int,
                      guidance: float, size: int, mixed_precision: str = "no",
                      should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
        """Sample one image per context row [P, T, D] with classifier-free guidance against ``uncond``
        [1, T, D] and the trained tensors as attached; row k's noise from ``seeds[k]``. Pixels
        [P, 3, size, size] in [0, 1]. ``should_stop`` is polled between steps (cancel)."""

    def configure_training(self, config: "TrainConfig") -> None:
        """Switch the run's memory/speed options on the frozen models before the first step
        (gradient checkpointing, attention, channels-last, torch.compile — hooks attached later by
        ``attach_deltas`` must still take effect); warn about any option the host cannot honour."""

    def close(self) -> None:
        """Undo what the run changed on the models (hooks, checkpointing, the token embedding)."""


class HostBase:
    """The half of a TrainingHost that does not depend on where the models come from."""

    def __init__(self, device: torch.device, text: TransformersTextEncoder | CombinedTextEncoder,
                 alphas_cumprod: torch.Tensor, unet: nn.Module, family: Family = SD15):
        self.device = device
        self.text = text
        self.family = family
        self.text_dim = int(text.width)
        self._alphas_cumprod = alphas_cumprod.to(device, torch.float32)
        self.num_train_timesteps = int(self._alphas_cumprod.shape[0])
        self._unet = unet
        self._forward = unet  # the compiled UNet after configure_training(compile=True)
        self._row_indices: dict[tuple[str, ...], torch.Tensor] = {}  # encode_text's de-duplication

    # -- text (a transformers copy of the host's CLIP-L; see text.py) ------------------------
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def add_tokens(self, tokens: Sequence[str]) -> None:
        self.text.add_tokens(tokens)

    def word_token_count(self, word: str) -> int:
        return self.text.word_token_count(word)

    def initializer_ids(self, word: str) -> list[int]:
        return self.text.initializer_ids(word)

    def word_embedding(self, word: str) -> torch.Tensor:
        return self.text.word_embedding(word)

    def word_ids(self, word: str) -> list[int]:
        return self.text.word_ids(word)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text.token_ids(prompts)

    def encode_text(self, prompts: Sequence[str], token_vectors: Mapping[str, torch.Tensor], *,
                    tokens_without_position: bool = False, eos_only: bool = False) -> TextFeatures:
        unique = list(dict.fromkeys(prompts))  # a batch repeats phrases (and the SPL phrase): once each
        features = self.text.encode(unique, token_vectors, tokens_without_position=tokens_without_position,
                                    eos_only=eos_only)
        if len(unique) < len(prompts):
            features = features.rows(self._row_index(tuple(prompts), unique))
        if features.pooled is not None:
            features.context = self.family.pack(features.context, features.pooled)
        return features

    def _row_index(self, prompts: tuple[str, ...], unique: list[str]) -> torch.Tensor:
        """Where each prompt's row is among the unique prompts (kept on the device, per prompt list)."""
        cache = self._row_indices
        index = cache.get(prompts)
        if index is None:
            order = {prompt: k for k, prompt in enumerate(unique)}
            index = torch.tensor([order[p] for p in prompts], device=self.device)
            if len(cache) < 4096:
                cache[prompts] = index
        return index

    # -- trained weights ---------------------------------------------------------------------
    def delta_modules(self, names: Sequence[str]) -> dict[str, nn.Module]:
        """Canonical module name (``…attn2.to_k``) → the host's module, for each delta name."""
        raise NotImplementedError

    def attach_deltas(self, deltas: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """One fused ``x·(W + ΔW)ᵀ`` per trained layer (``kv.attach_fused_deltas``), reading the
        frozen weights the host's way (:meth:`weight_reader`)."""
        return attach_fused_deltas(self.delta_modules(list(deltas)), deltas, read_weights=self.weight_reader())

    def weight_reader(self) -> WeightReader | None:
        """How this host's Linear layers get their weight for an input (None: the module's own)."""
        return None

    # -- memory planning ------------------------------------------------------------------------
    def unet_config(self) -> dict:
        """The UNet's configuration in diffusers' terms (the memory planner rebuilds it on ``meta``)."""
        from ..run.memory import SD15_UNET

        config = getattr(self._unet, "config", None)
        return dict(config) if config is not None and "block_out_channels" in config else dict(SD15_UNET)

    def resident_bytes(self) -> int:
        """Bytes of the frozen models on the training device."""
        from ..run.memory import tensor_bytes

        return tensor_bytes(self._unet, *self.text.models, self._vae_module(), device=self.device)

    def _vae_module(self):
        return None

    # -- sampling (validation previews) -------------------------------------------------------
    def sample_images(self, context: torch.Tensor, uncond: torch.Tensor, *, seeds: Sequence[int], steps: int,
                      guidance: float, size: int, mixed_precision: str = "no",
                      should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
        """DDIM (η = 0, SD1.5's "leading" spacing) with classifier-free guidance, through
        ``predict_noise``; the host decodes (``decode_latents``)."""
        from ..errors import TrainingCancelled
        from ..model.sampling import ddim_timesteps
        from ..model.precision import autocast

        alphas = self._alphas_cumprod.double()
        latents = torch.stack([torch.randn(4, size // 8, size // 8, generator=torch.Generator().manual_seed(int(s)))
                               for s in seeds]).to(self.device)
        rows = latents.shape[0]
        both = torch.cat([uncond.expand(rows, -1, -1), context])
        timesteps = ddim_timesteps(self.num_train_timesteps, steps)
        for index, t in enumerate(timesteps):
            if should_stop():
                raise TrainingCancelled("Training was cancelled during a validation; no concept file was written.")
            t_batch = torch.full((2 * rows,), t, device=self.device, dtype=torch.long)
            with autocast(self.device, mixed_precision):
                eps = self.predict_noise(torch.cat([latents, latents]), t_batch, both).double()
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            a_t = alphas[t]
            a_prev = alphas[timesteps[index + 1]] if index + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
            x0 = (latents.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            latents = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
        return self.decode_latents(latents)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    # -- options -----------------------------------------------------------------------------
    #: Whether this host's UNet forward, trained tensors attached, compiles as one graph (checked by
    #: tests/test_compile.py); with False, torch.compile may split it at graph breaks.
    compile_fullgraph = True

    def configure_training(self, config: "TrainConfig") -> None:
        self._forward = speed_up_unet(self._unet, channels_last=config.channels_last, compile=config.compile,
                                      mode=config.compile_mode, fullgraph=self.compile_fullgraph)
        self._configure_memory(config)

    def _configure_memory(self, config: "TrainConfig") -> None:
        """Gradient checkpointing and attention: each host its own way."""
        raise NotImplementedError

    def close(self) -> None:
        self.text.close()
