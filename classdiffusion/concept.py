"""The concept file: one ``.safetensors`` with K/V deltas, token embeddings and JSON metadata.

Layout (format version 1)::

    kv.<diffusers layer>.weight   float32 [out, in]   trained weight − base weight
    kv.<diffusers layer>.bias     float32 [out]       only with train_mode "crossattn"
    token.embedding               float32 [N, 768]    one row per token, in metadata order
    optim.<i>.<state>             float32             only in resumable checkpoints (AdamW state)

    metadata: format="classdiffusion.concept", format_version="1", classdiffusion=<JSON>

A compressed concept (format version 2, ``classdiffusion compress``) stores a 2-D delta as its
truncated-SVD factors instead, ``delta = up @ down``::

    kv_up.<layer>.weight          float32 [out, r]
    kv_down.<layer>.weight        float32 [r, in]

The JSON holds tokens, class words, initializers, prompts, the base fingerprint, the training
config, the step and the per-step loss history. Files are written atomically (temp + rename) and
read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BaseMismatchError, ConceptFileError
from .kv import compare_fingerprints, compress_deltas

FORMAT = "classdiffusion.concept"
FORMAT_VERSION = 3  #: newest version read; each file is written with the oldest version that holds it
KV_PREFIX = "kv."
UP_PREFIX = "kv_up."
DOWN_PREFIX = "kv_down."
EXACT_INDEX_PREFIX = "kv_exact_index."
EXACT_VALUE_PREFIX = "kv_exact_value."
TOKEN_KEY = "token.embedding"
OPTIM_PREFIX = "optim."
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Concept:
    """A trained concept (or a resumable checkpoint of one) in memory."""

    deltas: dict[str, torch.Tensor]
    token_vectors: torch.Tensor
    tokens: list[str]
    class_words: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    optimizer_tensors: dict[str, torch.Tensor] | None = None
    #: Low-rank factors (up, down) of compressed deltas; ``deltas`` then holds up @ down.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: Trained weights kept exactly where ``base + delta`` cannot reach them in float32 (imported
    #: weights that AdamW's decay moved towards or across zero): layer → (flat indices int64,
    #: trained values float32). Applying at strength 1 writes these values, so an imported
    #: concept reproduces the trained weights bit for bit.
    exact: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.meta.get("history", [])

    @property
    def resumable(self) -> bool:
        return self.optimizer_tensors is not None

    def token_dict(self) -> dict[str, torch.Tensor]:
        return {token: self.token_vectors[i] for i, token in enumerate(self.tokens)}

    def check_base(self, fingerprint: Mapping[str, Any], *, what: str = "this base model") -> None:
        """Raise BaseMismatchError if the concept was trained on another base."""
        expected = self.meta.get("base_fingerprint")
        if not expected:
            return
        reason = compare_fingerprints(expected, fingerprint)
        if reason:
            raise BaseMismatchError(
                f"This concept ({', '.join(self.tokens)}) does not fit {what}: {reason}. Load the "
                f"base it was trained on ({self.meta.get('base_name', 'see `classdiffusion inspect`')}), "
                "or apply it anyway with strict=False / --force (results may be poor)."
            )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        factors = self.factors or {}
        tensors = {KV_PREFIX + name: t.detach().to("cpu").contiguous()
                   for name, t in self.deltas.items() if name not in factors}
        for name, (up, down) in factors.items():
            tensors[UP_PREFIX + name] = up.detach().to("cpu").contiguous()
            tensors[DOWN_PREFIX + name] = down.detach().to("cpu").contiguous()
        for name, (index, values) in (self.exact or {}).items():
            tensors[EXACT_INDEX_PREFIX + name] = index.detach().to("cpu", torch.int64).contiguous()
            tensors[EXACT_VALUE_PREFIX + name] = values.detach().to("cpu", torch.float32).contiguous()
        tensors[TOKEN_KEY] = self.token_vectors.detach().to("cpu", torch.float32).contiguous()
        for name, t in (self.optimizer_tensors or {}).items():
            tensors[OPTIM_PREFIX + name] = t.detach().to("cpu").contiguous()
        return tensors

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, fsync, then rename over ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta)
        meta.update(tokens=list(self.tokens), class_words=list(self.class_words))
        meta["layers"] = {name: list(t.shape) for name, t in self.deltas.items()}
        metadata = {
            "format": FORMAT,
            "format_version": "3" if self.exact else "2" if self.factors else "1",
            "classdiffusion": json.dumps(meta, sort_keys=True),
        }
        atomic_save_file(self.to_tensors(), path, metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "Concept":
        return load_concept(path, device=device)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save that never leaves a partial file at ``path`` (a crash keeps the old one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The concept's JSON metadata, validated, without loading tensors."""
    path = Path(path)
    header = _open_header(path)
    return _parse_meta(path, header)


def _open_header(path: Path) -> dict[str, str]:
    if not path.exists():
        raise ConceptFileError(f"The concept file {path} does not exist.")
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


def _parse_meta(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
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
    try:
        meta = json.loads(header["classdiffusion"])
    except (KeyError, json.JSONDecodeError):
        raise ConceptFileError(f"{path.name} has damaged ClassDiffusion metadata; retrain or re-export it.") from None
    for key in ("tokens", "class_words", "layers"):
        if key not in meta:
            raise ConceptFileError(f"{path.name}: metadata lacks {key!r}; the file is damaged.")
    return meta


def load_concept(path: str | Path, *, device: str | torch.device = "cpu") -> Concept:
    """Load and validate a concept file (keys, shapes, dtypes, finite values)."""
    path = Path(path)
    header = _open_header(path)
    meta = _parse_meta(path, header)
    deltas: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    exact_index: dict[str, torch.Tensor] = {}
    exact_value: dict[str, torch.Tensor] = {}
    token_vectors = None
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key.startswith(KV_PREFIX):
                    deltas[key[len(KV_PREFIX):]] = tensor
                elif key.startswith(UP_PREFIX):
                    ups[key[len(UP_PREFIX):]] = tensor
                elif key.startswith(DOWN_PREFIX):
                    downs[key[len(DOWN_PREFIX):]] = tensor
                elif key.startswith(EXACT_INDEX_PREFIX):
                    exact_index[key[len(EXACT_INDEX_PREFIX):]] = tensor
                elif key.startswith(EXACT_VALUE_PREFIX):
                    exact_value[key[len(EXACT_VALUE_PREFIX):]] = tensor
                elif key == TOKEN_KEY:
                    token_vectors = tensor
                elif key.startswith(OPTIM_PREFIX):
                    optim[key[len(OPTIM_PREFIX):]] = tensor
                else:
                    raise ConceptFileError(f"{path.name}: unexpected tensor {key!r}; the file is damaged.")
    except ConceptFileError:
        raise
    except Exception as exc:
        raise ConceptFileError(
            f"{path.name} could not be read ({exc}); it may be truncated. Copy it again or retrain."
        ) from None

    factors = _expand_factors(path, ups, downs, deltas)
    layers = meta["layers"]
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
        if not bool(torch.isfinite(tensor).all()):
            raise ConceptFileError(f"{path.name}: {name} holds NaN/inf values; the concept is unusable.")
    exact = _check_exact(path, exact_index, exact_value, deltas)
    tokens = list(meta["tokens"])
    if token_vectors is None or token_vectors.ndim != 2 or token_vectors.shape[0] != len(tokens):
        raise ConceptFileError(
            f"{path.name}: the token embedding is missing or does not have one row per token {tokens}."
        )
    if token_vectors.dtype not in _FLOAT_DTYPES or not bool(torch.isfinite(token_vectors).all()):
        raise ConceptFileError(f"{path.name}: the token embedding is not a finite float tensor.")
    return Concept(
        deltas=deltas,
        token_vectors=token_vectors,
        tokens=tokens,
        class_words=list(meta["class_words"]),
        meta=meta,
        optimizer_tensors=optim or None,
        factors=factors or None,
        exact=exact or None,
    )


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
        if not bool(torch.isfinite(value).all()):
            raise ConceptFileError(f"{path.name}: {name} holds NaN/inf exact values; the concept is unusable.")
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
        deltas[name] = up.float() @ down.float()
    return factors


def compress_concept(concept: Concept, *, rank: int | None = None, energy: float | None = None
                     ) -> tuple[Concept, dict[str, dict]]:
    """A copy of ``concept`` whose 2-D deltas are truncated-SVD factors (fixed ``rank`` or an
    ``energy`` share); returns it and per-layer {"rank", "relative_error"}. The optimizer state
    is dropped: a compressed concept is not a resumable checkpoint."""
    factors, stats = compress_deltas(concept.deltas, rank=rank, energy=energy)
    deltas = dict(concept.deltas)
    for name, (up, down) in factors.items():
        deltas[name] = up @ down
    errors = [s["relative_error"] for s in stats.values()]
    meta = dict(concept.meta)
    meta["compression"] = {
        "method": "truncated SVD", "rank": rank, "energy": energy, "layers": stats,
        "max_relative_error": max(errors, default=0.0),
        "parameters": sum(u.numel() + d.numel() for u, d in factors.values())
        + sum(concept.deltas[name].numel() for name in stats if name not in factors),
        "dense_parameters": sum(concept.deltas[name].numel() for name in stats),
    }
    compressed = Concept(deltas=deltas, token_vectors=concept.token_vectors.clone(), tokens=list(concept.tokens),
                         class_words=list(concept.class_words), meta=meta, factors=factors)
    return compressed, stats
