"""Applying a concept to diffusers models: K/V deltas baked into the UNet, tokens into the
text encoder, and an exact undo."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .concept import Concept
from .errors import BaseMismatchError, InvalidInputError
from .kv import BakedPatch, bake_deltas, cross_attention_weights


@dataclass
class AppliedConcept:
    """Handle of an applied concept; ``remove()`` restores the base bit-exactly."""

    patch: BakedPatch
    text_encoder: nn.Module | None = None
    original_embedding: nn.Module | None = None
    tokens: list[str] = field(default_factory=list)

    def remove(self) -> None:
        self.patch.remove()
        if self.text_encoder is not None and self.original_embedding is not None:
            self.text_encoder.set_input_embeddings(self.original_embedding)
            self.text_encoder.config.vocab_size = self.original_embedding.num_embeddings
            self.original_embedding = None


def apply_concept(
    unet: nn.Module,
    concept: Concept,
    *,
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    strength: float = 1.0,
    strict: bool = True,
) -> AppliedConcept:
    """Bake ``strength × delta`` into the UNet's cross-attention and teach the text encoder the
    concept's tokens. With ``strict`` a concept from another base is refused."""
    concept.check_against(cross_attention_weights(unet, concept.train_mode), what="this UNet", strict=strict)
    handle = AppliedConcept(patch=bake_deltas(unet, concept.deltas, strength, concept.exact),
                            tokens=list(concept.tokens))
    if text_encoder is not None and tokenizer is not None:
        try:
            _add_token_rows(text_encoder, tokenizer, concept, handle)
        except Exception:
            handle.remove()
            raise
    return handle


def _add_token_rows(text_encoder, tokenizer, concept: Concept, handle: AppliedConcept) -> None:
    embedding = text_encoder.get_input_embeddings()
    if concept.token_vectors.shape[1] != embedding.weight.shape[1]:
        raise BaseMismatchError(
            f"The concept's token vectors are {concept.token_vectors.shape[1]} wide, this text "
            f"encoder's embeddings {embedding.weight.shape[1]}."
        )
    tokenizer.add_tokens([t for t in concept.tokens if t not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(concept.tokens)
    rows = max(max(ids) + 1, embedding.num_embeddings)
    new = nn.Embedding(rows, embedding.weight.shape[1], device=embedding.weight.device, dtype=embedding.weight.dtype)
    with torch.no_grad():
        new.weight[: embedding.num_embeddings] = embedding.weight
        for token_id, vector in zip(ids, concept.token_vectors):
            if token_id < embedding.num_embeddings and token_id not in _added_ids(tokenizer):
                raise InvalidInputError(f"The tokenizer already has a word with id {token_id}.")
            new.weight[token_id] = vector.to(new.weight.dtype)
    new.requires_grad_(False)
    handle.text_encoder, handle.original_embedding = text_encoder, embedding
    text_encoder.set_input_embeddings(new)
    text_encoder.config.vocab_size = rows


def _added_ids(tokenizer) -> set[int]:
    return set(tokenizer.get_added_vocab().values())
