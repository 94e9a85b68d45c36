"""Applying a concept to diffusers models: K/V deltas baked into the UNet, tokens into the
text encoder, and an exact undo. A method with tensors of its own (Infusion's residuals) hooks
them in through its ``sampling_patches``; where they act at a word, the text encoder records what
it encodes so the hooks find the word."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import Concept
from ..errors import BaseMismatchError, InvalidInputError
from ..model.families import family_named
from ..methods import method_class
from ..model.kv import BakedPatch, bake_deltas, cross_attention_weights
from ..model.prompt_record import ConditionRegistry, RegistryPositions, patch_outputs, record_text_encodings


@dataclass
class AppliedConcept:
    """Handle of an applied concept; ``remove()`` restores the base bit-exactly."""

    patch: BakedPatch
    #: (text encoder, its embedding before the concept's rows were added), one per encoder changed
    embeddings: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    detach: list = field(default_factory=list)  #: hook removers (a method's own tensors)

    def remove(self) -> None:
        for detach in self.detach:
            detach()
        self.detach.clear()
        self.patch.remove()
        for text_encoder, original in reversed(self.embeddings):
            text_encoder.set_input_embeddings(original)
            text_encoder.config.vocab_size = original.num_embeddings
        self.embeddings.clear()


def apply_concept(
    unet: nn.Module,
    concept: Concept,
    *,
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    strength: float = 1.0,
    strict: bool = True,
    text_encoder_2: nn.Module | None = None,
    tokenizer_2=None,
) -> AppliedConcept:
    """Bake ``strength × delta`` into the UNet's cross-attention and teach the text encoder(s) the
    concept's tokens (SDXL: ``text_encoder_2``/``tokenizer_2`` take the bigG part of each vector).
    With ``strict`` a concept from another base is refused; one of another family always is."""
    concept.check_against(cross_attention_weights(unet, concept.train_mode), what="this UNet", strict=strict)
    encoders = []
    if text_encoder is not None and tokenizer is not None and concept.tokens:
        encoders = [(text_encoder, tokenizer)] + ([(text_encoder_2, tokenizer_2)] if text_encoder_2 is not None else [])
        family = family_named(concept.family)
        if len(encoders) != len(family.text_widths):  # refused before any weight changes
            raise BaseMismatchError(f"This {family.label} concept has token vectors for {len(family.text_widths)} text "
                                    f"encoder(s); {len(encoders)} were given.")
    handle = AppliedConcept(patch=bake_deltas(unet, concept.deltas, strength, concept.exact),
                            tokens=list(concept.tokens))
    try:
        for (encoder, encoder_tokenizer), vectors in zip(encoders, family_named(concept.family).split(
                concept.token_vectors)):
            _add_token_rows(encoder, encoder_tokenizer, concept.tokens, vectors, handle)
        _hook_method_tensors(unet, concept, text_encoder, tokenizer, strength, handle)
    except Exception:
        handle.remove()
        raise
    return handle


def _hook_method_tensors(unet: nn.Module, concept: Concept, text_encoder, tokenizer, strength: float,
                         handle: AppliedConcept) -> None:
    """The concept's own tensors (Infusion: ``strength × residual`` where the class word stands in a
    prompt the text encoder encoded; prompts without it, and the empty negative prompt, stay the base's)."""
    method = method_class(concept.method)
    positions_of = None
    if method.records_prompts:
        if text_encoder is None or tokenizer is None:
            raise InvalidInputError(f"A {method.label} concept needs the text encoder and tokenizer too: it acts "
                                    "where its word stands in the prompt.")
        registry, release = _shared_registry(text_encoder)
        handle.detach.append(release)

        def positions_of(word: str) -> RegistryPositions:
            return RegistryPositions(registry, tokenizer(word, add_special_tokens=False).input_ids)

    patches = method.sampling_patches(concept, strength, positions_of)
    if patches:
        handle.detach.append(patch_outputs(dict(unet.named_modules()), patches))


def apply_concept_to_pipeline(pipe, concept: Concept, **options) -> AppliedConcept:
    """:func:`apply_concept` on a diffusers pipeline's UNet and text encoder(s) (SD1.x or SDXL)."""
    folders = family_named(concept.family).text_folders
    extra = {f"{kind}_2": getattr(pipe, name, None)
             for pair in folders[1:] for kind, name in zip(("tokenizer", "text_encoder"), pair)}
    return apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, **extra,
                         **options)


def _shared_registry(text_encoder: nn.Module):
    """One recording hook and registry per text encoder, shared by the concepts applied to it that
    act at a word; returns (registry, release) where the last release removes the hook."""
    state = getattr(text_encoder, "_classdiffusion_registry", None)
    if state is None:
        registry = ConditionRegistry()
        state = {"registry": registry, "remove": record_text_encodings(text_encoder, registry), "users": 0}
        text_encoder._classdiffusion_registry = state
    state["users"] += 1

    def release() -> None:
        state["users"] -= 1
        if state["users"] == 0:
            state["remove"]()
            del text_encoder._classdiffusion_registry

    return state["registry"], release


def _add_token_rows(text_encoder, tokenizer, tokens: list[str], vectors: torch.Tensor, handle: AppliedConcept) -> None:
    embedding = text_encoder.get_input_embeddings()
    if vectors.shape[1] != embedding.weight.shape[1]:
        raise BaseMismatchError(
            f"The concept's token vectors are {vectors.shape[1]} wide, this text "
            f"encoder's embeddings {embedding.weight.shape[1]}."
        )
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    rows = max(max(ids) + 1, embedding.num_embeddings)
    new = nn.Embedding(rows, embedding.weight.shape[1], device=embedding.weight.device, dtype=embedding.weight.dtype)
    with torch.no_grad():
        new.weight[: embedding.num_embeddings] = embedding.weight
        for token_id, vector in zip(ids, vectors):
            if token_id < embedding.num_embeddings and token_id not in _added_ids(tokenizer):
                raise InvalidInputError(f"The tokenizer already has a word with id {token_id}.")
            new.weight[token_id] = vector.to(new.weight.dtype)
    new.requires_grad_(False)
    handle.embeddings.append((text_encoder, embedding))
    text_encoder.set_input_embeddings(new)
    text_encoder.config.vocab_size = rows


def _added_ids(tokenizer) -> set[int]:
    return set(tokenizer.get_added_vocab().values())
