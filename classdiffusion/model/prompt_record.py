"""Where a word stands in what the UNet is given.

The UNet sees only text features, not the prompt. A hook on the text encoder records (features,
token ids) of every prompt it encodes in a :class:`ConditionRegistry`; whoever changes a module's
output at a word's positions (Infusion's residuals) looks each context row up by its content —
exact after a host's dtype/device cast, also when the host repeats a short context to the length
of a longer one. A row nobody registered (an empty negative prompt, a conditioning another node
computed) matches nothing. :func:`patch_outputs` installs such output patches on modules.
"""

from __future__ import annotations

import weakref
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .kv import remover

#: An output patch: (module output, the module's input context [B, T, D]) → the new output.
OutputPatch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def word_positions(input_ids: torch.Tensor, word_ids: Sequence[int]) -> torch.Tensor:
    """bool [B, T]: True at every token of every occurrence of the token sequence ``word_ids``."""
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    n = len(word_ids)
    found = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    if n == 0 or ids.shape[1] < n:
        return found
    word = torch.as_tensor(list(word_ids), dtype=ids.dtype, device=ids.device)
    windows = ids.unfold(1, n, 1)  # [B, T-n+1, n]
    starts = (windows == word).all(dim=-1)
    for offset in range(n):
        found[:, offset:offset + starts.shape[1]] |= starts
    return found


class ConditionRegistry:
    """Text features → their token ids, so UNet hooks can find the concept word's positions.

    The newest ``capacity`` encodings are kept (their features, ~236 KB per 77-token prompt in
    fp32). A host may hand the UNet a converted copy of what the encoder returned (another dtype or
    device, repeated to a longer context), so rows are matched by value, not by identity.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._entries: list[dict] = []
        self._last: tuple | None = None  # (weakref to the context, result): one lookup per UNet call

    def register(self, features: torch.Tensor, token_ids: torch.Tensor) -> None:
        """``features`` [B, T, D] and the ids [B, T] they were computed from."""
        features = features.detach()
        ids = torch.as_tensor(token_ids).detach().cpu().reshape(features.shape[0], -1)
        if ids.shape[1] != features.shape[1]:
            return  # not a plain per-token encoding: nothing to look up by
        for b in range(features.shape[0]):
            row = features[b]
            key = row[-1, :8].float().cpu()
            self._entries = [e for e in self._entries
                             if not (torch.equal(e["ids"], ids[b]) and torch.equal(e["key"], key))]
            self._entries.append({"row": row, "ids": ids[b].clone(), "key": key, "copies": {}})
        self._entries = self._entries[-self.capacity:]
        self._last = None

    def token_ids(self, context: torch.Tensor) -> list[torch.Tensor | None]:
        """For each row of ``context`` [B, T, D]: the token ids it was encoded from (repeated if the
        host repeated the row), or None when it matches no registered encoding."""
        last = self._last
        if last is not None and last[0]() is context:
            return last[1]
        out: list[torch.Tensor | None] = []
        for b in range(context.shape[0]):
            out.append(self._match(context[b]))
        try:
            self._last = (weakref.ref(context), out)
        except TypeError:
            self._last = None
        return out

    def _match(self, row: torch.Tensor) -> torch.Tensor | None:
        length = row.shape[0]
        row_keys: dict[int, torch.Tensor] = {}  # one device→host copy per prompt length, not per entry
        for entry in reversed(self._entries):
            ids = entry["ids"]
            size = ids.shape[0]
            if length % size:
                continue
            # cheap filter: the last position's features depend on the whole prompt (causal CLIP)
            if size not in row_keys:
                row_keys[size] = row[size - 1, :8].float().cpu()
            if not torch.equal(row_keys[size], entry["key"].to(row.dtype).float()):
                continue
            stored = entry["row"]
            key = (row.device, row.dtype)
            copy = entry["copies"].get(key)
            if copy is None:
                copy = entry["copies"][key] = stored.to(row.device, row.dtype)
            # SDXL's context holds CLIP-L's features first, bigG's beside them: an encoding of one
            # encoder is found in the columns it fills.
            width = copy.shape[-1]
            if all(torch.equal(row[k * size:(k + 1) * size, :width], copy) for k in range(length // size)):
                return ids.repeat(length // size)
        return None

    def positions(self, context: torch.Tensor, word_ids: Sequence[int]) -> torch.Tensor | None:
        """bool [B, T] of the word's positions in each row; None when no row holds the word."""
        rows = self.token_ids(context)
        if all(ids is None for ids in rows):
            return None
        mask = torch.zeros(context.shape[:2], dtype=torch.bool)
        for b, ids in enumerate(rows):
            if ids is not None:
                mask[b] = word_positions(ids, word_ids)[0]
        return mask.to(context.device) if bool(mask.any()) else None


class RegistryPositions:
    """Positions of one concept word, looked up in a registry by each context's content."""

    def __init__(self, registry: ConditionRegistry, word_ids: Sequence[int]):
        self.registry, self.word_ids = registry, list(word_ids)

    def for_context(self, context: torch.Tensor) -> torch.Tensor | None:
        return self.registry.positions(context, self.word_ids)


def record_text_encodings(text_encoder: nn.Module, registry: ConditionRegistry,
                          output_index: int = 0) -> Callable[[], None]:
    """A forward hook on a transformers CLIP text model that registers the features it returns
    (``last_hidden_state``) with the input ids; returns the function that removes it."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return output
        features = output[output_index] if isinstance(output, (tuple, list)) else output.last_hidden_state
        registry.register(features, ids)
        hidden = getattr(output, "hidden_states", None)
        if hidden:  # clip skip: the pipeline may take a hidden state (then normalised) instead
            for state in hidden:
                registry.register(state, ids)
        return output

    handle = text_encoder.register_forward_hook(hook, with_kwargs=True)
    return handle.remove


def patch_outputs(modules: Mapping[str, nn.Module], patches: Sequence[tuple[str, OutputPatch]]) -> Callable[[], None]:
    """Forward hooks that pass each named module's output through its patches (calls with a
    context that is not [B, T, D] are left alone); returns the function that removes them."""
    handles = []
    for name, patch in patches:
        if name not in modules:
            raise KeyError(f"the UNet has no layer {name!r}")

        def hook(module, inputs, output, patch=patch):
            context = inputs[0]
            return output if context.ndim != 3 else patch(output, context)

        handles.append(modules[name].register_forward_hook(hook))
    return remover(handles)
