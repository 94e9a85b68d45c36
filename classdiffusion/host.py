"""The small interface the training loop is written against.

A *host* owns the frozen models (text encoder, UNet, VAE) and the noise schedule of one base
model. The loop never touches them directly, so the same loop runs on diffusers models
(``hosts.diffusers_host``) and inside ComfyUI (the node pack's adapter) without knowing which.

Layer names are canonical diffusers names of the UNet, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``; a host that stores its
weights under other names translates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

#: SD1.5's CLIP-L text width; the UNet's cross-attention context must have this size.
SD15_CONTEXT_DIM = 768


@dataclass
class TextFeatures:
    """What the text encoder gives the loop for a batch of prompts."""

    context: torch.Tensor  #: [B, L, D] last hidden states (after the final layer norm): UNet context
    eos: torch.Tensor  #: [B, D] the same features at each prompt's EOS token: what SPL compares
    #: [B, D] the same features at each prompt's highest token id: transformers' ``pooler_output``
    #: under SD1.5's legacy text config (``eos_token_id: 2``), which the official ClassDiffusion
    #: code uses for SPL. With a new token (id above EOS) in the prompt that is the new token's
    #: position, not EOS.
    max_id: torch.Tensor


def speed_up_unet(unet: torch.nn.Module, *, channels_last: bool, compile: bool) -> Callable:
    """The UNet forward a host should call: channels-last in place, and torch.compile'd if asked
    (forward hooks attached later still take effect)."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return torch.compile(unet) if compile else unet


@runtime_checkable
class TrainingHost(Protocol):
    """What a base model must offer to be trained by :func:`classdiffusion.train.train`."""

    device: torch.device
    #: Number of DDPM training timesteps (1000 for SD1.5).
    num_train_timesteps: int
    #: Width of the text features / token embeddings (768 for SD1.5).
    text_dim: int

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t for t = 0..T-1 as float32 on ``device`` (SD1.5: scaled-linear betas 0.00085–0.012)."""

    def add_tokens(self, tokens: Sequence[str]) -> None:
        """Make the tokenizer understand the new tokens; raise InvalidInputError for a token
        that is already a word of the vocabulary."""

    def word_token_count(self, word: str) -> int:
        """How many tokens the tokenizer splits ``word`` into (1 for a known word)."""

    def word_embedding(self, word: str) -> torch.Tensor:
        """The input embedding of ``word`` (mean over its tokens), float32 [D]: a token's start."""

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

    def configure_training(self, gradient_checkpointing: bool, attention: str, *,
                           channels_last: bool = False, compile: bool = False) -> None:
        """Switch memory/speed options of the frozen models before the first step
        (``compile``: torch.compile the UNet; hooks attached later by ``attach_deltas`` must still
        take effect, as they do with torch.compile)."""
