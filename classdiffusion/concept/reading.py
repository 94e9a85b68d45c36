"""Reading a concept file back: the header, the metadata and every tensor, validated (keys,
shapes, dtypes, finite values, a complete optimizer state) before anything uses them. Only
safetensors is opened; nothing is unpickled."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from ..errors import ConceptFileError
from ..methods import method_class
from ..model.families import family_named
from .file import (_FLOAT_DTYPES, _OPTIM_STATES, DOWN_PREFIX, EXACT_INDEX_PREFIX, EXACT_VALUE_PREFIX, FORMAT,
                   FORMAT_VERSION, KV_PREFIX, MAX_ABS_VALUE, OPTIM_PREFIX, TOKEN_KEY, UP_PREFIX,
                   Concept)
from .meta import ConceptMeta
from .storage import check_regular_file, run_files

def checkpoint_table(path: str | Path) -> list[dict[str, Any]]:
    """One row per step checkpoint of ``path``'s run (and the final file): step, loss (raw and
    smoothed as the monitor draws it), the drift rank where it was logged, the file. Headers only."""
    from ..run.summary import ema

    final, steps = run_files(path)
    files = steps + ([(None, final)] if final.is_file() else [])
    rows = []
    for step, file in files:
        meta = read_metadata(file)
        history = meta.history
        if not history:
            continue
        smoothed = ema([h["loss"] for h in history])
        last = history[-1]
        rows.append({"step": last.get("step", step), "file": file.name, "loss": last["loss"],
                     "loss_smoothed": smoothed[-1], "drift_rank": last.get("drift_rank"),
                     "final": step is None})
    return rows


def read_metadata(path: str | Path) -> ConceptMeta:
    """The concept's metadata, validated, without loading tensors."""
    path = Path(path)
    header = _open_header(path)
    return _parse_meta(path, header)


def _open_header(path: Path) -> dict[str, str]:
    check_regular_file(path, "concept file")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ConceptFileError(
            f"{path.name} is not a .safetensors file; concept files are .safetensors "
            "(pickled .pt/.bin/.ckpt files are not loaded here)."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise ConceptFileError(
            f"{path.name} is not a readable safetensors file ({exc}); it may be truncated or "
            "corrupt. Copy it again or retrain the concept."
        ) from None


def _parse_meta(path: Path, header: Mapping[str, str]) -> ConceptMeta:
    if header.get("format") != FORMAT:
        raise ConceptFileError(
            f"{path.name} is a safetensors file but not a ClassDiffusion concept "
            f"(format {header.get('format')!r}). For a LoRA use a LoRA loader."
        )
    try:
        version = int(header.get("format_version", "0"))
    except ValueError:
        version = 0
    if version < 1 or version > FORMAT_VERSION:
        raise ConceptFileError(
            f"{path.name} has concept format version {header.get('format_version')!r}; this "
            f"version of the pack reads versions 1–{FORMAT_VERSION}. Update the pack."
        )
    if "classdiffusion" not in header:
        raise ConceptFileError(f"{path.name} has no ClassDiffusion metadata; retrain or re-export it.")
    return ConceptMeta.from_json(header["classdiffusion"], path.name)


def load_concept(path: str | Path, *, device: str | torch.device = "cpu") -> Concept:
    """Load and validate a concept file (keys, shapes, dtypes, finite values)."""
    path = Path(path)
    meta = _parse_meta(path, _open_header(path))
    method = method_class(meta.method)
    parts = _read_tensors(path, device, method.tensor_prefix)
    deltas = parts[KV_PREFIX]
    factors = _expand_factors(path, parts[UP_PREFIX], parts[DOWN_PREFIX], deltas)
    _check_deltas(path, deltas, meta.layers)
    exact = _check_exact(path, parts[EXACT_INDEX_PREFIX], parts[EXACT_VALUE_PREFIX], deltas)
    own = parts.get(method.tensor_prefix, {}) if method.tensor_prefix else {}
    listed = (getattr(meta, method.tensor_layers_key) or {}) if method.tensor_layers_key else {}
    method.check_tensors(path.name, own, listed, lambda what, tensor: _check_float(path, what, tensor))
    tokens = list(meta.tokens)
    token_vectors = parts[TOKEN_KEY].get("")
    _check_token_vectors(path, token_vectors, tokens, meta.family)
    shapes = [tuple(deltas[n].shape) for n in sorted(deltas)] + [tuple(own[n].shape) for n in sorted(own)]
    _check_optimizer(path, parts[OPTIM_PREFIX], shapes + ([tuple(token_vectors.shape)] if tokens else []))
    return Concept(deltas=deltas, token_vectors=token_vectors, tokens=tokens, class_words=list(meta.class_words),
                   meta=meta, optimizer_tensors=parts[OPTIM_PREFIX] or None, factors=factors or None,
                   exact=exact or None, method_tensors=own)


#: The kinds of tensor every concept file may hold, by key prefix (``TOKEN_KEY`` is a whole key).
_SHARED_PREFIXES = (KV_PREFIX, UP_PREFIX, DOWN_PREFIX, EXACT_INDEX_PREFIX, EXACT_VALUE_PREFIX, OPTIM_PREFIX)


def _read_tensors(path: Path, device, own_prefix: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """prefix → {name: tensor} for every tensor of the file (the token embedding under TOKEN_KEY,
    name ""); a key of no known kind, or of another method's kind, means the file is damaged."""
    prefixes = _SHARED_PREFIXES + ((own_prefix,) if own_prefix else ())
    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in (*prefixes, TOKEN_KEY)}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for key in handle.keys():
                if key == TOKEN_KEY:
                    parts[TOKEN_KEY][""] = handle.get_tensor(key)
                    continue
                prefix = next((p for p in prefixes if key.startswith(p)), None)
                if prefix is None:
                    raise ConceptFileError(f"{path.name}: unexpected tensor {key!r}; the file is damaged.")
                parts[prefix][key[len(prefix):]] = handle.get_tensor(key)
    except ConceptFileError:
        raise
    except Exception as exc:
        raise ConceptFileError(
            f"{path.name} could not be read ({exc}); it may be truncated. Copy it again or retrain."
        ) from None
    return parts


def _check_deltas(path: Path, deltas: Mapping[str, torch.Tensor], layers: Mapping[str, list]) -> None:
    if set(layers) != set(deltas):
        raise ConceptFileError(
            f"{path.name}: its tensors do not match its layer list "
            f"({len(deltas)} tensors, {len(layers)} listed); the file is damaged."
        )
    for name, tensor in deltas.items():
        if list(tensor.shape) != list(layers[name]):
            raise ConceptFileError(f"{path.name}: {name} has shape {list(tensor.shape)}, listed {layers[name]}.")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ConceptFileError(f"{path.name}: {name} has dtype {tensor.dtype}; expected a float tensor.")
        _check_values(path, name, tensor)


def _check_token_vectors(path: Path, token_vectors, tokens: list[str], family: str) -> None:
    if token_vectors is None or token_vectors.ndim != 2 or token_vectors.shape[0] != len(tokens):
        raise ConceptFileError(
            f"{path.name}: the token embedding is missing or does not have one row per token {tokens}."
        )
    if token_vectors.dtype not in _FLOAT_DTYPES:
        raise ConceptFileError(f"{path.name}: the token embedding is not a float tensor.")
    width = family_named(family).context_dim
    if tokens and token_vectors.shape[1] != width:
        raise ConceptFileError(f"{path.name}: its token vectors are {token_vectors.shape[1]} wide, but a "
                               f"{family} concept's are {width}; the file is damaged.")
    _check_values(path, "the token embedding", token_vectors)


def _check_float(path: Path, name: str, tensor: torch.Tensor) -> None:
    """A float tensor with finite values of plausible size."""
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ConceptFileError(f"{path.name}: {name} is not a float tensor.")
    _check_values(path, name, tensor)


def _check_values(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Finite and of plausible size (see MAX_ABS_VALUE)."""
    if not tensor.numel():
        return
    low, high = (float(v) for v in torch.aminmax(tensor.detach()))  # one pass; NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConceptFileError(f"{path.name}: {name} holds NaN/inf values; the concept is unusable.")
    largest = max(-low, high)
    if largest > MAX_ABS_VALUE:
        raise ConceptFileError(
            f"{path.name}: {name} holds values up to {largest:.3g}, far beyond any trained concept "
            f"(limit {MAX_ABS_VALUE:g}); the file is damaged."
        )


def _check_optimizer(path: Path, optim: Mapping[str, torch.Tensor], shapes: list[tuple[int, ...]]) -> None:
    """A resumable checkpoint's AdamW state: ``<i>.step|exp_avg|exp_avg_sq`` for each trained tensor
    in the trainer's order (``Concept.trained_shapes``), finite, in its shape."""
    if not optim:
        return
    seen: dict[int, set[str]] = {}
    for key, tensor in optim.items():
        match = re.fullmatch(r"(\d{1,6})\.(\w+)", key)
        index = int(match.group(1)) if match else -1
        if not match or index >= len(shapes) or match.group(2) not in _OPTIM_STATES:
            raise ConceptFileError(f"{path.name}: unexpected optimizer state {OPTIM_PREFIX}{key}; the checkpoint is damaged.")
        state = match.group(2)
        seen.setdefault(index, set()).add(state)
        expected = () if state == "step" else shapes[index]
        if tuple(tensor.shape) != expected or not tensor.dtype.is_floating_point:
            raise ConceptFileError(f"{path.name}: optimizer state {key} has shape {list(tensor.shape)}, "
                                   f"expected {list(expected)}; the checkpoint is damaged.")
        if not bool(torch.isfinite(tensor).all()) or (state != "exp_avg" and bool((tensor < 0).any())):
            raise ConceptFileError(f"{path.name}: optimizer state {key} holds invalid values; the checkpoint is damaged.")
    if len(seen) != len(shapes) or any(states != _OPTIM_STATES for states in seen.values()):
        raise ConceptFileError(f"{path.name}: its optimizer state is incomplete; resume from another checkpoint.")


def _check_exact(path: Path, indices, values, deltas: dict[str, torch.Tensor]) -> dict:
    """Validates the exact trained values of an imported concept: pairs of 1-D int64 flat
    indices (in range, no repeats) and finite float32 values of the same length."""
    if set(indices) != set(values):
        raise ConceptFileError(f"{path.name}: its exact-value entries are incomplete; the file is damaged.")
    exact = {}
    for name, index in indices.items():
        value = values[name]
        if name not in deltas:
            raise ConceptFileError(f"{path.name}: exact values for {name}, which has no delta; the file is damaged.")
        size = deltas[name].numel()
        if (index.dtype != torch.int64 or index.ndim != 1 or value.dtype != torch.float32
                or value.shape != index.shape):
            raise ConceptFileError(f"{path.name}: the exact values of {name} are malformed; the file is damaged.")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size
                              or index.unique().numel() != index.numel()):
            raise ConceptFileError(f"{path.name}: the exact values of {name} point outside the layer; the file is damaged.")
        _check_values(path, f"the exact values of {name}", value)
        exact[name] = (index, value)
    return exact


def _expand_factors(path: Path, ups, downs, deltas: dict[str, torch.Tensor]) -> dict:
    """Low-rank factors → dense deltas (in memory only); validates the pairs."""
    if set(ups) != set(downs):
        raise ConceptFileError(f"{path.name}: its low-rank factors are incomplete; the file is damaged.")
    factors = {}
    for name, up in ups.items():
        down = downs[name]
        if name in deltas or up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ConceptFileError(f"{path.name}: the factors of {name} do not fit together; the file is damaged.")
        for t in (up, down):
            if t.dtype not in _FLOAT_DTYPES or not bool(torch.isfinite(t).all()):
                raise ConceptFileError(f"{path.name}: {name} holds non-float or NaN/inf factors.")
        factors[name] = (up, down)
        deltas[name] = up.float() @ down.float()  # checked with the dense deltas by the caller
    return factors


