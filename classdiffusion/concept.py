"""The concept file: one ``.safetensors`` with K/V deltas, token embeddings and JSON metadata.

Layout (format version 1)::

    kv.<diffusers layer>.weight   float32 [out, in]   trained weight − base weight
    kv.<diffusers layer>.bias     float32 [out]       only with train_mode "crossattn"
    token.embedding               float32 [N, 768]    one row per token, in metadata order
    optim.<i>.<state>             float32             only in resumable checkpoints (AdamW state)

    metadata: format="classdiffusion.concept", format_version="1", classdiffusion=<JSON>

An Infusion concept (format version 4, ``--method infusion``) has no deltas and no tokens; it
stores one residual vector per changed projection (canonical module name, e.g. ``…attn2.to_v``)::

    residual.<diffusers module>   float32 [out]       added to the projection's output at the class word

A compressed concept (format version 2, ``classdiffusion compress``) stores a 2-D delta as its
truncated-SVD factors instead, ``delta = up @ down``::

    kv_up.<layer>.weight          float32 [out, r]
    kv_down.<layer>.weight        float32 [r, in]

The JSON holds tokens, class words, initializers, prompts, the base fingerprint, the training
config, the step and the per-step loss history. Files are written atomically (temp + rename) and
read with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BaseMismatchError, ConceptFileError
from .families import family_named
from .kv import base_fingerprint, compare_fingerprints, compress_deltas, trained_names
from .meta import ConceptMeta
from .methods import METHOD_CLASSES, InfusionMethod

FORMAT = "classdiffusion.concept"
FORMAT_VERSION = 4  #: newest version read; each file is written with the oldest version that holds it
KV_PREFIX = "kv."
UP_PREFIX = "kv_up."
DOWN_PREFIX = "kv_down."
EXACT_INDEX_PREFIX = "kv_exact_index."
EXACT_VALUE_PREFIX = "kv_exact_value."
RESIDUAL_PREFIX = "residual."
TOKEN_KEY = "token.embedding"
OPTIM_PREFIX = "optim."
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Largest magnitude a stored delta, factor product, exact value or token vector may have. Trained
#: K/V deltas and CLIP embeddings are orders of magnitude smaller; far larger values are damage, and
#: would overflow fp16 weights (max 65504) when applied at the nodes' strengths (up to ±2, stacked).
MAX_ABS_VALUE = 1e3
#: AdamW's state per parameter, as torch.optim.AdamW writes it.
_OPTIM_STATES = {"step", "exp_avg", "exp_avg_sq"}


@dataclass
class Concept:
    """A trained concept (or a resumable checkpoint of one) in memory."""

    deltas: dict[str, torch.Tensor]
    token_vectors: torch.Tensor
    tokens: list[str]
    class_words: list[str]
    meta: ConceptMeta = field(default_factory=ConceptMeta)
    optimizer_tensors: dict[str, torch.Tensor] | None = None
    #: Low-rank factors (up, down) of compressed deltas; ``deltas`` then holds up @ down.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: Trained weights kept exactly where ``base + delta`` cannot reach them in float32 (imported
    #: weights that AdamW's decay moved towards or across zero): layer → (flat indices int64,
    #: trained values float32). Applying at strength 1 writes these values, so an imported
    #: concept reproduces the trained weights bit for bit.
    exact: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: Infusion's residual vectors: canonical module name (``…attn2.to_v``) → [out] float32.
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):  # a plain mapping (e.g. from a script): validated like a file's
            self.meta = ConceptMeta.from_dict(
                {"tokens": list(self.tokens), "class_words": list(self.class_words),
                 "layers": {name: list(t.shape) for name, t in self.deltas.items()},
                 **({"residual_layers": {n: list(t.shape) for n, t in self.residuals.items()},
                     "method": InfusionMethod.name} if self.residuals else {}), **self.meta},
                "the concept's metadata")

    @property
    def method(self) -> str:
        """The training method's name (``classdiffusion.methods``; "classdiffusion" for older files)."""
        return self.meta.method

    @property
    def family(self) -> str:
        """The model family of the base it was trained on ("sd15", "sdxl"; ``classdiffusion.families``)."""
        return self.meta.family

    @property
    def method_label(self) -> str:
        """The training method as people call it ("Textual Inversion")."""
        return METHOD_CLASSES[self.meta.method].label

    def trained_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the trained tensors in the optimizer's order: deltas, residuals (each sorted by
        name), then the token rows if there are tokens."""
        shapes = [tuple(self.deltas[n].shape) for n in sorted(self.deltas)]
        shapes += [tuple(self.residuals[n].shape) for n in sorted(self.residuals)]
        return shapes + ([tuple(self.token_vectors.shape)] if len(self.tokens) else [])

    @property
    def step(self) -> int:
        return self.meta.step

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.meta.history

    @property
    def train_mode(self) -> str:
        return self.meta.train_mode

    @property
    def resumable(self) -> bool:
        return self.optimizer_tensors is not None

    def token_dict(self) -> dict[str, torch.Tensor]:
        return {token: self.token_vectors[i] for i, token in enumerate(self.tokens)}

    def check_against(self, base_weights: Mapping[str, torch.Tensor], *, what: str = "this base model",
                      strict: bool = True) -> None:
        """The one check of a concept against a base: ``base_weights`` (canonical diffusers names →
        the base's cross-attention weights, at least those of the concept's train mode) must hold
        every layer the concept changes, in its shape; with ``strict`` the base's fingerprint must
        be the one the concept was trained on (BaseMismatchError says what differs). A concept of
        another model family (SD1.x on SDXL or the reverse) is refused first, by name."""
        family = family_named(self.family)
        base_family = weights_family(base_weights)
        if base_family is not None and base_family is not family:
            raise BaseMismatchError(
                f"This concept was trained on a {family.label} base, and {what} is {base_family.label}: a concept "
                f"only works on the model family it was trained on. Load a {family.label} checkpoint, or train "
                f"the concept again on this one.")
        unknown = sorted(set(self.deltas) - set(base_weights))
        if unknown:
            raise BaseMismatchError(
                f"This concept changes {len(unknown)} layer(s) {what} lacks (e.g. {unknown[0]}): it was "
                f"trained on a UNet of another architecture; {family.label} concepts fit {family.label} models only."
            )
        for name, delta in self.deltas.items():
            if tuple(delta.shape) != tuple(base_weights[name].shape):
                raise BaseMismatchError(
                    f"{name}: the concept's delta is {tuple(delta.shape)}, {what}'s weight "
                    f"{tuple(base_weights[name].shape)}; the concept belongs to another architecture."
                )
        for name, residual in self.residuals.items():
            weight = base_weights.get(f"{name}.weight")
            if weight is None or weight.shape[0] != residual.shape[0]:
                raise BaseMismatchError(
                    f"{name}: the concept's residual has {residual.shape[0]} values, {what} "
                    f"{'lacks the layer' if weight is None else f'outputs {weight.shape[0]}'}; the concept "
                    "belongs to another architecture."
                )
        expected = self.meta.base_fingerprint
        if not strict or not expected:
            return
        names = trained_names(base_weights, self.train_mode)
        reason = compare_fingerprints(expected, base_fingerprint({n: base_weights[n] for n in names}))
        if reason:
            raise BaseMismatchError(
                f"This concept ({', '.join(self.tokens)}) does not fit {what}: {reason}. Load the "
                f"base it was trained on ({self.meta.base_name or 'see `classdiffusion inspect`'}), "
                "or apply it anyway with strict=False / --force / allow_other_base (results may be poor)."
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
        for name, t in self.residuals.items():
            tensors[RESIDUAL_PREFIX + name] = t.detach().to("cpu", torch.float32).contiguous()
        tensors[TOKEN_KEY] = self.token_vectors.detach().to("cpu", torch.float32).contiguous()
        for name, t in (self.optimizer_tensors or {}).items():
            tensors[OPTIM_PREFIX + name] = t.detach().to("cpu").contiguous()
        return tensors

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, fsync, then rename over ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dataclasses.replace(self.meta, tokens=list(self.tokens), class_words=list(self.class_words),
                                   layers={name: list(t.shape) for name, t in self.deltas.items()},
                                   residual_layers={n: list(t.shape) for n, t in self.residuals.items()} or None)
        text = meta.to_json()
        ConceptMeta.from_json(text, path.name)  # never write what the loader would refuse
        metadata = {
            "format": FORMAT,
            "format_version": "4" if self.residuals else "3" if self.exact else "2" if self.factors else "1",
            "classdiffusion": text,
        }
        atomic_save_file(self.to_tensors(), path, metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "Concept":
        return load_concept(path, device=device)


_STEP_FILE = re.compile(r"(?P<stem>.+)-step(?P<step>\d{5,})")


def embedding_tensors(concept: Concept) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Each token as a ComfyUI embedding: (token, {key: float32 [1, width]}) with one key per text
    encoder of the concept's family ({"clip_l"} on SD1.x; {"clip_l", "clip_g"} on SDXL, what
    ``comfy/sd1_clip.py::load_embed`` reads for each of SDXL's encoders)."""
    family = family_named(concept.family)
    out = []
    for token, vector in zip(concept.tokens, concept.token_vectors):
        parts = family.split(vector.detach().to("cpu", torch.float32))
        out.append((token, {key: part[None].contiguous() for key, part in zip(family.embedding_keys, parts)}))
    return out


def save_embeddings(concept: Concept, folder: str | Path, name: str) -> list[Path]:
    """``folder``/NAME.safetensors per token (several tokens: NAME_1, NAME_2 …), written atomically;
    ``embedding:NAME`` in a ComfyUI prompt (or ``load_textual_inversion`` in diffusers) reads it."""
    paths = []
    tokens = embedding_tensors(concept)
    for k, (token, tensors) in enumerate(tokens):
        path = Path(folder) / f"{name if len(tokens) == 1 else f'{name}_{k + 1}'}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(tensors, path, {"classdiffusion_token": token, "classdiffusion_family": concept.family})
        paths.append(path)
    return paths


def weights_family(base_weights: Mapping[str, torch.Tensor]):
    """The family a UNet's cross-attention weights belong to, by their context width (None: unknown)."""
    from .families import FAMILIES

    widths = {int(w.shape[1]) for name, w in base_weights.items() if name.endswith("attn2.to_k.weight")}
    if len(widths) != 1:
        return None
    width = widths.pop()
    return next((f for f in FAMILIES.values() if f.context_dim == width), None)


def run_files(path: str | Path) -> tuple[Path, list[tuple[int, Path]]]:
    """A run's final file and its step checkpoints ``STEM-stepNNNNN.safetensors`` (sorted by step),
    given the final file or any of its checkpoints; the final file may not exist (a cancelled run)."""
    path = Path(path)
    match = _STEP_FILE.fullmatch(path.stem)
    final = path.with_name(f"{match['stem']}{path.suffix}") if match else path
    steps = []
    for candidate in final.parent.glob(f"{glob.escape(final.stem)}-step*{final.suffix}"):
        found = _STEP_FILE.fullmatch(candidate.stem)
        if found and found["stem"] == final.stem and candidate.is_file():
            steps.append((int(found["step"]), candidate))
    return final, sorted(steps)


#: A temporary file of ours older than this is a leftover of a killed save (SIGKILL, power loss).
STALE_TEMP_SECONDS = 60.0


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete leftovers ``.NAME.xxxxxxxx.tmp`` of earlier saves to ``path`` (only our own naming,
    only regular files not touched for STALE_TEMP_SECONDS); returns what was removed."""
    import time

    removed = []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    now = time.time()
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        try:
            info = candidate.lstat()
            if (pattern.fullmatch(candidate.name) and stat.S_ISREG(info.st_mode)
                    and now - info.st_mtime > STALE_TEMP_SECONDS):
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue
    return removed


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save that never leaves a partial file at ``path`` (a crash keeps the old one;
    an interrupted save removes its temporary file, and a killed one's is removed next time)."""
    _write_whole(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (reports, plots), as concept files are written."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    _write_whole(Path(path), write)


def _write_whole(path: Path, write) -> None:
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
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


def checkpoint_table(path: str | Path) -> list[dict[str, Any]]:
    """One row per step checkpoint of ``path``'s run (and the final file): step, loss (raw and
    smoothed as the monitor draws it), the drift rank where it was logged, the file. Headers only."""
    from .summary import ema

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


def check_regular_file(path: Path, what: str = "file") -> None:
    """Only regular files are opened: a named pipe or device would block a read forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConceptFileError(f"The {what} {path} does not exist.") from None
    except OSError as exc:
        raise ConceptFileError(f"The {what} {path} cannot be read ({exc.strerror}).") from None
    if stat.S_ISDIR(mode):
        raise ConceptFileError(f"{path} is a folder, not a {what}.")
    if not stat.S_ISREG(mode):
        raise ConceptFileError(f"{path} is not a regular file (a pipe or device?); give a {what} on disk.")


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
    header = _open_header(path)
    meta = _parse_meta(path, header)
    deltas: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    exact_index: dict[str, torch.Tensor] = {}
    exact_value: dict[str, torch.Tensor] = {}
    residuals: dict[str, torch.Tensor] = {}
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
                elif key.startswith(RESIDUAL_PREFIX):
                    residuals[key[len(RESIDUAL_PREFIX):]] = tensor
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
    layers = meta.layers
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
    exact = _check_exact(path, exact_index, exact_value, deltas)
    listed = meta.residual_layers or {}
    if set(listed) != set(residuals):
        raise ConceptFileError(f"{path.name}: its residual vectors do not match its residual layer list "
                               f"({len(residuals)} tensors, {len(listed)} listed); the file is damaged.")
    for name, tensor in residuals.items():
        if list(tensor.shape) != list(listed[name]) or tensor.ndim != 1:
            raise ConceptFileError(f"{path.name}: the residual of {name} has shape {list(tensor.shape)}, "
                                   f"listed {listed[name]}.")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ConceptFileError(f"{path.name}: the residual of {name} is not a float tensor.")
        _check_values(path, f"the residual of {name}", tensor)
    tokens = list(meta.tokens)
    if token_vectors is None or token_vectors.ndim != 2 or token_vectors.shape[0] != len(tokens):
        raise ConceptFileError(
            f"{path.name}: the token embedding is missing or does not have one row per token {tokens}."
        )
    if token_vectors.dtype not in _FLOAT_DTYPES:
        raise ConceptFileError(f"{path.name}: the token embedding is not a float tensor.")
    width = family_named(meta.family).context_dim
    if tokens and token_vectors.shape[1] != width:
        raise ConceptFileError(f"{path.name}: its token vectors are {token_vectors.shape[1]} wide, but a "
                               f"{meta.family} concept's are {width}; the file is damaged.")
    _check_values(path, "the token embedding", token_vectors)
    shapes = [tuple(deltas[n].shape) for n in sorted(deltas)] + [tuple(residuals[n].shape) for n in sorted(residuals)]
    _check_optimizer(path, optim, shapes + ([tuple(token_vectors.shape)] if tokens else []))
    return Concept(
        deltas=deltas,
        token_vectors=token_vectors,
        tokens=tokens,
        class_words=list(meta.class_words),
        meta=meta,
        optimizer_tensors=optim or None,
        factors=factors or None,
        exact=exact or None,
        residuals=residuals,
    )


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


def compress_concept(concept: Concept, *, rank: int | None = None, energy: float | None = None
                     ) -> tuple[Concept, dict[str, dict]]:
    """A copy of ``concept`` whose 2-D deltas are truncated-SVD factors (fixed ``rank`` or an
    ``energy`` share); returns it and per-layer {"rank", "relative_error"}. The optimizer state
    is dropped: a compressed concept is not a resumable checkpoint."""
    if concept.residuals:
        from .errors import InvalidInputError

        raise InvalidInputError(
            f"This is an Infusion concept: {sum(r.numel() for r in concept.residuals.values())} residual values "
            f"({sum(r.numel() for r in concept.residuals.values()) * 4 / 1024:.0f} KB), one vector per layer, "
            "nothing a low-rank factorisation could shrink; it is already as small as it gets."
        )
    factors, stats = compress_deltas(concept.deltas, rank=rank, energy=energy)
    deltas = dict(concept.deltas)
    for name, (up, down) in factors.items():
        deltas[name] = up @ down
    errors = [s["relative_error"] for s in stats.values()]
    meta = dataclasses.replace(concept.meta)
    meta.compression = {
        "method": "truncated SVD", "rank": rank, "energy": energy, "layers": stats,
        "max_relative_error": max(errors, default=0.0),
        "parameters": sum(u.numel() + d.numel() for u, d in factors.values())
        + sum(concept.deltas[name].numel() for name in stats if name not in factors),
        "dense_parameters": sum(concept.deltas[name].numel() for name in stats),
    }
    compressed = Concept(deltas=deltas, token_vectors=concept.token_vectors.clone(), tokens=list(concept.tokens),
                         class_words=list(concept.class_words), meta=meta, factors=factors)
    return compressed, stats
