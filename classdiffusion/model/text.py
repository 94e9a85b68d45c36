"""A transformers CLIP text encoder with trainable new tokens injected (used by every host).

The embedding matrix is never resized: rows of added tokens come from vectors passed per call,
so the rest of the vocabulary stays bit-identical and gradients reach only those vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import InvalidInputError


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
    #: [B, P] the pooled text embedding where the base's UNet takes one (SDXL: bigG's projected
    #: EOS feature, first-EOS rule); None for SD1.x.
    pooled: torch.Tensor | None = None
    #: Width of each text encoder's part of ``eos`` (and ``context``), in order: SPL may compare
    #: the encoders' features one by one. None: one encoder.
    widths: tuple[int, ...] | None = None

    def rows(self, index: torch.Tensor) -> "TextFeatures":
        """The features of rows ``index`` (gradients flow back to the rows taken)."""
        return TextFeatures(context=self.context[index], eos=self.eos[index], max_id=self.max_id[index],
                            pooled=None if self.pooled is None else self.pooled[index], widths=self.widths)


class TokenInjectingEmbedding(nn.Module):
    """Wraps the text encoder's token embedding: rows of added tokens come from trainable
    vectors supplied per call, every other row from the frozen matrix (which is never resized,
    so the rest of the vocabulary stays bit-identical)."""

    def __init__(self, base: nn.Embedding, position_embedding: nn.Embedding | None = None):
        super().__init__()
        self.base = base
        self.position_embedding = position_embedding
        self.token_ids: dict[str, int] = {}
        self.vectors: Mapping[str, torch.Tensor] = {}
        #: Set per call: new tokens enter without their position embedding (see encode()).
        self.without_position = False

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
            value = vector.to(out.dtype).expand_as(out)
            if self.without_position:
                # The text model adds position embeddings to what this returns; take them off
                # first, so the token's input is its bare vector.
                positions = self.position_embedding.weight[: input_ids.shape[1]].to(out.dtype)
                value = value - positions.unsqueeze(0)
            out = torch.where(hit, value, out)
        return out


class TransformersTextEncoder:
    """Tokenizer + frozen CLIP text model, with new tokens as injectable vectors.

    ``context_layer`` selects the hidden state used as UNet context: None = the last layer (after
    the final layer norm, SD1.5's choice); a negative index = that hidden layer, passed through the
    final layer norm when ``context_final_norm`` (ComfyUI's "CLIP skip" on SD1.x) or as it is (SDXL's
    penultimate layer). The EOS feature for SPL is always the last layer's, after the final norm.
    """

    def __init__(self, tokenizer, text_model: nn.Module, device: torch.device, context_layer: int | None = None,
                 context_final_norm: bool = True):
        self.tokenizer = tokenizer
        self.model = text_model
        self.device = torch.device(device)
        self.context_layer = context_layer
        self.context_final_norm = context_final_norm
        self.width = int(text_model.config.hidden_size)
        self.models = [text_model]
        self.injector = TokenInjectingEmbedding(text_model.get_input_embeddings(), self._embeddings().position_embedding)
        text_model.set_input_embeddings(self.injector)
        self._token_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # ComfyUI's copy of the CLIP tokenizer reports 8192; the model has 77 positions.
        self.max_length = min(int(tokenizer.model_max_length), int(text_model.config.max_position_embeddings))

    def _hidden_states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, last) hidden states."""
        if self.context_layer is None:
            last = self.model(ids).last_hidden_state
            return last, last
        out = self.model(ids, output_hidden_states=True)
        context = out.hidden_states[self.context_layer]
        if self.context_final_norm:
            context = self._final_layer_norm()(context)
        return context, out.last_hidden_state

    def _embeddings(self) -> nn.Module:
        inner = getattr(self.model, "text_model", self.model)
        return inner.embeddings

    def _final_layer_norm(self) -> nn.Module:
        norm = getattr(self.model, "final_layer_norm", None)
        if norm is None:
            norm = self.model.text_model.final_layer_norm
        return norm

    def vocabulary_id(self, word: str) -> int | None:
        """The id of ``word`` if the tokenizer has it as one whole word, else None."""
        vocab = self.tokenizer.get_vocab()
        for key in (word, word.lower(), word + "</w>", word.lower() + "</w>"):
            if key in vocab:
                return vocab[key]
        return None

    def add_tokens(self, tokens: Sequence[str]) -> None:
        for token in tokens:
            if token in self.injector.token_ids:
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
            self.injector.token_ids[token] = token_id
        self._token_cache.clear()

    def word_token_count(self, word: str) -> int:
        return len(self.tokenizer(word, add_special_tokens=False).input_ids)

    def initializer_ids(self, word: str) -> list[int]:
        """The vocabulary rows a new token starts from, picked as the official code picks them.

        The official code (diffusers' Custom Diffusion script) calls ``tokenizer.encode([word])``;
        under transformers 4.x a list of strings is looked up piece by piece, so a word that is
        one vocabulary piece gives that piece's row: "ktn" → id 42170 in the real CLIP vocabulary
        (the piece without the end-of-word mark), not the ``k`` + ``tn</w>`` a prompt splits it
        into. A word that is not one piece (the official code refuses it) is split as inside a
        prompt, and the token starts from the mean of its pieces' rows."""
        piece = self.tokenizer.get_vocab().get(word)
        if piece is not None and piece not in self.injector.token_ids.values():
            return [piece]
        return self.word_ids(word)

    def word_embedding(self, word: str) -> torch.Tensor:
        """A new token's starting vector: the mean of :meth:`initializer_ids`' rows."""
        ids = self.initializer_ids(word)
        if not ids:
            raise InvalidInputError(f"The word {word!r} gives no tokens; use a real word.")
        known = [i for i in ids if i not in self.injector.token_ids.values()]
        if not known:
            raise InvalidInputError(f"The initializer {word!r} is itself a new token; use a word.")
        rows = self.injector.base.weight[torch.tensor(known, device=self.injector.base.weight.device)]
        return rows.float().mean(0).detach().clone()

    def word_ids(self, word: str) -> list[int]:
        """The token ids ``word`` is split into, as it appears inside a prompt."""
        return list(self.tokenizer(word, add_special_tokens=False).input_ids)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, T] ids of the prompts exactly as :meth:`encode` feeds them to the model."""
        return self._tokenize(prompts)[0]

    def _tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(ids, first EOS position, highest-id position, length up to the last prompt's EOS),
        cached per prompt list."""
        key = tuple(prompts)
        cached = self._token_cache.get(key)
        if cached is None:
            ids = self.tokenizer(
                list(prompts),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).input_ids
            eos_id = self.tokenizer.eos_token_id
            is_eos = ids == eos_id
            if not bool(is_eos.any(dim=1).all()):
                raise InvalidInputError("A prompt is too long: its end-of-text token was cut off.")
            eos_pos = is_eos.int().argmax(dim=1)  # first EOS = the real end of the prompt
            max_pos = ids.argmax(dim=1)  # first highest id: transformers' legacy pooling
            # Cut length for eos_only: past the last EOS, rounded up to a multiple of 16 so that
            # phrases encoded in different batches run at the same length (bitwise-equal features).
            length = min(ids.shape[1], -(-(int(eos_pos.max()) + 1) // 16) * 16)
            cached = (ids.to(self.device), eos_pos.to(self.device), max_pos.to(self.device), length)
            if len(self._token_cache) < 4096:
                self._token_cache[key] = cached
        return cached

    def encode(
        self, prompts: Sequence[str], token_vectors: Mapping[str, torch.Tensor], *,
        tokens_without_position: bool = False, eos_only: bool = False,
    ) -> TextFeatures:
        """``tokens_without_position``: each new token enters as its bare vector, without its
        position embedding. The official code's SPL encoder does this (it overwrites the embedded
        sequence at the token's position with the raw embedding row); only for reproducing it.

        ``eos_only``: only the EOS features are wanted (drift measurements), so the sequences are
        cut after the last EOS instead of running all 77 positions: CLIP's attention is causal,
        so later positions cannot change them (≈5× less work for short phrases); ``context`` and
        ``max_id`` then cover the cut sequence only."""
        ids, eos_pos, max_pos, length = self._tokenize(prompts)
        if eos_only:
            ids = ids[:, :length]
            max_pos = max_pos.clamp(max=length - 1)
        self.injector.vectors = token_vectors
        self.injector.without_position = tokens_without_position
        try:
            context, last = self._hidden_states(ids)
        finally:
            self.injector.vectors = {}
            self.injector.without_position = False
        rows = torch.arange(last.shape[0], device=last.device)
        return TextFeatures(context=context, eos=last[rows, eos_pos], max_id=last[rows, max_pos])

    def project(self, eos: torch.Tensor) -> torch.Tensor:
        """The model's pooled embedding from its EOS features: ``text_projection`` (SDXL's bigG)."""
        projection = getattr(self.model, "text_projection", None)
        if projection is None:
            raise InvalidInputError("This text encoder has no text projection, so it gives no pooled embedding.")
        return projection(eos.to(projection.weight.dtype))

    def close(self) -> None:
        """Give the text model its plain embedding back."""
        self.model.set_input_embeddings(self.injector.base)


class CombinedTextEncoder:
    """Several text encoders read as one (SDXL: CLIP-L then bigG), with the same interface as
    :class:`TransformersTextEncoder`.

    A new token's vector is the encoders' vectors side by side ([768 | 1280] on SDXL), so the
    loop, the methods and the concept file handle one vector per token whatever the family; each
    encoder receives its own part. Contexts and EOS features are concatenated along the width
    (``widths`` says where each part lies); the pooled embedding is the last encoder's projected
    EOS feature. The encoders share the CLIP vocabulary, so word positions are the first one's."""

    def __init__(self, encoders: Sequence[TransformersTextEncoder]):
        self.encoders = list(encoders)
        self.widths = tuple(e.width for e in self.encoders)
        self.width = sum(self.widths)
        self.models = [m for e in self.encoders for m in e.models]
        self.device = self.encoders[0].device

    def _parts(self, vectors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        split = {token: vector.split(list(self.widths), dim=-1) for token, vector in vectors.items()}
        return [{token: parts[i] for token, parts in split.items()} for i in range(len(self.encoders))]

    def add_tokens(self, tokens: Sequence[str]) -> None:
        for encoder in self.encoders:
            encoder.add_tokens(tokens)

    def word_token_count(self, word: str) -> int:
        return self.encoders[0].word_token_count(word)

    def initializer_ids(self, word: str) -> list[int]:
        return self.encoders[0].initializer_ids(word)

    def word_embedding(self, word: str) -> torch.Tensor:
        """Each encoder's start from its own embedding table, side by side."""
        return torch.cat([encoder.word_embedding(word) for encoder in self.encoders])

    def word_ids(self, word: str) -> list[int]:
        return self.encoders[0].word_ids(word)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encoders[0].token_ids(prompts)

    def encode(self, prompts: Sequence[str], token_vectors: Mapping[str, torch.Tensor], *,
               tokens_without_position: bool = False, eos_only: bool = False) -> TextFeatures:
        features = [encoder.encode(prompts, vectors, tokens_without_position=tokens_without_position,
                                   eos_only=eos_only)
                    for encoder, vectors in zip(self.encoders, self._parts(token_vectors))]
        length = min(f.context.shape[1] for f in features)
        dtype = features[0].context.dtype
        return TextFeatures(
            context=torch.cat([f.context[:, :length].to(dtype) for f in features], dim=-1),
            eos=torch.cat([f.eos.to(dtype) for f in features], dim=-1),
            max_id=torch.cat([f.max_id.to(dtype) for f in features], dim=-1),
            pooled=self.encoders[-1].project(features[-1].eos),
            widths=self.widths,
        )

    def close(self) -> None:
        for encoder in self.encoders:
            encoder.close()


def replace_token(prompt: str, tokens: Sequence[str]) -> str:
    """Drop the concept tokens ("a <sks> dog" → "a dog"): the class prompt CLIP-T scores, output
    preservation trains on and TEA steers towards."""
    for token in tokens:
        prompt = re.sub(r"\s*" + re.escape(token) + r"\s*", " ", prompt)
    return re.sub(r"\s+", " ", prompt).strip()
