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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import BaseMismatchError
from ..methods import METHOD_CLASSES, method_class, tensor_owner
from ..model.families import family_named
from ..model.kv import base_fingerprint, compare_fingerprints, compress_deltas, trained_names
from .meta import ConceptMeta
from .storage import atomic_save_file

FORMAT = "classdiffusion.concept"
FORMAT_VERSION = 4  #: newest version read; each file is written with the oldest version that holds it
KV_PREFIX = "kv."
UP_PREFIX = "kv_up."
DOWN_PREFIX = "kv_down."
EXACT_INDEX_PREFIX = "kv_exact_index."
EXACT_VALUE_PREFIX = "kv_exact_value."
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
    #: The tensors only the concept's method trains, by name (Infusion: one residual vector per
    #: projection, canonical module name ``…attn2.to_v`` → [out] float32); the method's class says
    #: how the file holds them, how they fit a base and how they apply (``methods.base.TrainingMethod``).
    method_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):  # a plain mapping (e.g. from a script): validated like a file's
            owner = method_class(self.meta["method"]) if "method" in self.meta else tensor_owner(self.method_tensors)
            self.meta = ConceptMeta.from_dict(
                {"tokens": list(self.tokens), "class_words": list(self.class_words),
                 "layers": {name: list(t.shape) for name, t in self.deltas.items()},
                 **({owner.tensor_layers_key: self.tensor_layers(), "method": owner.name}
                    if self.method_tensors else {}), **self.meta},
                "the concept's metadata")

    def tensor_layers(self) -> dict[str, list[int]]:
        """The shapes of the method's own tensors, as the metadata lists them."""
        return {name: list(t.shape) for name, t in self.method_tensors.items()}

    @property
    def method(self) -> str:
        """The training method's name (``classdiffusion.methods``; "classdiffusion" for older files)."""
        return self.meta.method

    @property
    def family(self) -> str:
        """The model family of the base it was trained on ("sd15", "sdxl"; ``classdiffusion.model.families``)."""
        return self.meta.family

    @property
    def method_label(self) -> str:
        """The training method as people call it ("Textual Inversion")."""
        return METHOD_CLASSES[self.meta.method].label

    def trained_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the trained tensors in the optimizer's order: deltas, the method's own tensors
        (each sorted by name), then the token rows if there are tokens."""
        shapes = [tuple(self.deltas[n].shape) for n in sorted(self.deltas)]
        shapes += [tuple(self.method_tensors[n].shape) for n in sorted(self.method_tensors)]
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
        method_class(self.method).check_tensors_fit(self.method_tensors, base_weights, what)
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
        prefix = method_class(self.method).tensor_prefix
        for name, t in self.method_tensors.items():
            tensors[prefix + name] = t.detach().to("cpu", torch.float32).contiguous()
        tensors[TOKEN_KEY] = self.token_vectors.detach().to("cpu", torch.float32).contiguous()
        for name, t in (self.optimizer_tensors or {}).items():
            tensors[OPTIM_PREFIX + name] = t.detach().to("cpu").contiguous()
        return tensors

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, fsync, then rename over ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        method = method_class(self.method)
        own = {method.tensor_layers_key: self.tensor_layers()} if self.method_tensors else {}
        meta = dataclasses.replace(self.meta, tokens=list(self.tokens), class_words=list(self.class_words),
                                   layers={name: list(t.shape) for name, t in self.deltas.items()}, **own)
        text = meta.to_json()
        ConceptMeta.from_json(text, path.name)  # never write what the loader would refuse
        metadata = {
            "format": FORMAT,
            "format_version": str(method.tensor_format_version) if self.method_tensors
            else "3" if self.exact else "2" if self.factors else "1",
            "classdiffusion": text,
        }
        atomic_save_file(self.to_tensors(), path, metadata)
        return path




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
    from ..model.families import FAMILIES

    widths = {int(w.shape[1]) for name, w in base_weights.items() if name.endswith("attn2.to_k.weight")}
    if len(widths) != 1:
        return None
    width = widths.pop()
    return next((f for f in FAMILIES.values() if f.context_dim == width), None)


































def compress_concept(concept: Concept, *, rank: int | None = None, energy: float | None = None
                     ) -> tuple[Concept, dict[str, dict]]:
    """A copy of ``concept`` whose 2-D deltas are truncated-SVD factors (fixed ``rank`` or an
    ``energy`` share); returns it and per-layer {"rank", "relative_error"}. The optimizer state
    is dropped: a compressed concept is not a resumable checkpoint."""
    method_class(concept.method).check_compressible(concept)
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
