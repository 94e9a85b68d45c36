"""diffusers' Custom Diffusion format ↔ concept files.

diffusers' ``train_custom_diffusion.py`` (and the official ClassDiffusion code built on it) save

* ``pytorch_custom_diffusion_weights.{safetensors,bin}``: the *trained weights* (not deltas) of
  each cross-attention's CustomDiffusionAttnProcessor, keyed
  ``<block>.attn2.processor.to_k_custom_diffusion.weight`` (and ``to_v``; with ``--freeze_model
  crossattn`` also ``to_q`` and ``to_out_custom_diffusion.0.{weight,bias}``); the ``.bin`` also
  holds an empty dict per self-attention processor;
* ``<new1>.{safetensors,bin}``: ``{"<new1>": embedding}`` per modifier token, loaded with
  ``pipe.load_textual_inversion``.

SDXL (no diffusers example exists): the same processor layout for the 2048-wide K/V, and one
``<token>.safetensors`` per token holding ``{"clip_l": [768], "clip_g": [1280]}`` (what diffusers'
SDXL ``load_textual_inversion`` calls take one key each of, and ComfyUI's embedding loader reads).
Adobe's SDXL script (``src/diffusers_training_sdxl.py``) instead pickles one ``delta.bin``:
``{"unet": {"<block>.attn2.to_k.weight": trained weight, …}, "modifier_token": {token: [768-row,
1280-row]}}``; it is imported too (read with ``weights_only=True``).

Importing needs the base UNet (delta = trained − base) and the class word (not in those files).
Deltas are stored so that ``base + delta`` reproduces the trained weight bit-exactly in float32;
the few trained values no float32 sum can reach are kept as exact values (``Concept.exact``), so
applying reproduces the trained UNet bit for bit and import → export returns the same tensors.
Files are recognised by content; pickles are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from . import Concept, weights_family
from ..model.families import FAMILIES, SD15, family_named
from .meta import ConceptMeta
from ..errors import ConceptFileError, InvalidInputError
from ..methods import method_class
from ..model.kv import base_fingerprint, trained_names

WEIGHTS_SAFE = "pytorch_custom_diffusion_weights.safetensors"
WEIGHTS_BIN = "pytorch_custom_diffusion_weights.bin"
#: Custom Diffusion processor parameter → the attention module's own parameter.
_PARAMS = {
    "to_k_custom_diffusion.weight": "to_k.weight",
    "to_v_custom_diffusion.weight": "to_v.weight",
    "to_q_custom_diffusion.weight": "to_q.weight",
    "to_out_custom_diffusion.0.weight": "to_out.0.weight",
    "to_out_custom_diffusion.0.bias": "to_out.0.bias",
}
_CANONICAL = {v: k for k, v in _PARAMS.items()}


def is_safetensors(path: Path) -> bool:
    """True when the file *content* is safetensors (an 8-byte little-endian header length, then
    a JSON object), whatever its name: the official script's default safe serialization writes
    safetensors content into ``<new1>.bin``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:9] == b"{"


def _read(path: Path) -> dict:
    """Tensors of a weights file, by content: safetensors, else a pickle read with
    ``torch.load(weights_only=True)`` (plain tensors and containers only, never code)."""
    if not path.is_file():
        raise ConceptFileError(f"{path} is not a regular file.")
    if is_safetensors(path):
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConceptFileError(f"{path.name} is a damaged safetensors file ({exc}).") from None
    if path.suffix == ".safetensors":
        raise ConceptFileError(f"{path.name} is named .safetensors but is not a safetensors file; it is damaged.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # PyTorch's own refusal message is pages long: one sentence of ours instead
        raise ConceptFileError(
            f"{path.name} is neither a safetensors file nor a pickle of plain tensors; it was not loaded "
            "(only weights are ever read, never code)."
        ) from None


def canonical_name(key: str) -> str | None:
    """'X.attn2.processor.to_k_custom_diffusion.weight' → 'X.attn2.to_k.weight' (None if not a weight)."""
    prefix, sep, param = key.partition(".processor.")
    if not sep or param not in _PARAMS:
        return None
    return f"{prefix}.{_PARAMS[param]}"


def processor_key(name: str) -> str:
    """'X.attn2.to_k.weight' → 'X.attn2.processor.to_k_custom_diffusion.weight'."""
    for param, processor_param in _CANONICAL.items():
        if name.endswith("." + param):
            return f"{name[: -len(param) - 1]}.processor.{processor_param}"
    raise InvalidInputError(f"{name} is not a cross-attention weight Custom Diffusion trains.")


def read_custom_diffusion(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical name → trained weight, token → embedding) from a Custom Diffusion output folder."""
    folder = Path(folder)
    if folder.is_file():
        content = _read(folder)
        if isinstance(content, dict) and isinstance(content.get("unet"), dict):
            return _read_adobe_sdxl(folder, content)
        folder, weights_files = folder.parent, [folder]
    else:
        weights_files = [folder / name for name in (WEIGHTS_SAFE, WEIGHTS_BIN) if (folder / name).exists()][:1]
    if not weights_files:
        raise InvalidInputError(f"No {WEIGHTS_SAFE} or {WEIGHTS_BIN} in {folder}.")
    weights = {}
    for key, value in _read(weights_files[0]).items():
        name = canonical_name(key)
        if name is not None and isinstance(value, torch.Tensor):
            weights[name] = value
    if not weights:
        raise ConceptFileError(f"{weights_files[0].name} holds no Custom Diffusion attention weights.")
    embeddings = {}
    for path in sorted(folder.iterdir()):
        if path in weights_files or path.name in (WEIGHTS_SAFE, WEIGHTS_BIN) or path.suffix not in (".safetensors", ".bin"):
            continue
        content = _read(path)
        family = _embedding_family(content)
        if family is not None:  # e.g. an SDXL token: each encoder's row, named by the file
            embeddings[path.stem] = torch.cat([_row(content[key]) for key in family.embedding_keys])
            continue
        for token, vector in content.items():
            if isinstance(vector, torch.Tensor) and (vector.dim() == 1 or (vector.dim() == 2 and vector.shape[0] == 1)):
                embeddings[token] = vector.reshape(-1).float()
    return weights, embeddings


def _embedding_family(content: dict):
    """The several-encoder family whose embedding keys a file holds exactly ({"clip_l", "clip_g"}:
    SDXL), or None (a diffusers token file: token → vector)."""
    return next((f for f in FAMILIES.values() if len(f.embedding_keys) > 1 and set(content) == set(f.embedding_keys)),
                None)


def _row(vector) -> torch.Tensor:
    if not isinstance(vector, torch.Tensor) or vector.numel() not in vector.shape:
        raise ConceptFileError("A token embedding must be one vector per encoder.")
    return vector.reshape(-1).float()


def _read_adobe_sdxl(path: Path, content: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Adobe's SDXL ``delta.bin``: trained attn2 weights under their module names, and each
    modifier token as [CLIP-L row, bigG row]."""
    weights = {name: value for name, value in content["unet"].items()
               if isinstance(value, torch.Tensor) and ".attn2." in name and name.split(".attn2.")[1] in _CANONICAL}
    if not weights:
        raise ConceptFileError(f"{path.name} holds no cross-attention weights under 'unet'.")
    embeddings = {}
    for token, rows in (content.get("modifier_token") or {}).items():
        rows = rows if isinstance(rows, (list, tuple)) else [rows]
        embeddings[str(token)] = torch.cat([_row(row) for row in rows])
    return weights, embeddings


def exact_delta(trained: torch.Tensor, base: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta, index, values): a float32 delta with ``float32(base + delta) == trained`` wherever
    some float32 delta can reach it (the rounded difference, nudged by an ulp where it misses),
    and, for the elements none can reach, their flat indices and trained values, kept exactly.

    Unreachable elements are real: AdamW's decoupled decay multiplies the full weight, so a
    weight moving towards or across zero can land on a value (say 1e-10 over a base of 0.02) that
    no float32 sum with that base produces. Never fails on finite tensors.
    """
    trained, base = trained.float(), base.float()
    if not bool(torch.isfinite(trained).all()):
        raise InvalidInputError("The trained weights hold NaN/inf values; the checkpoint is unusable.")
    delta = trained - base
    for _ in range(4):
        miss = (base + delta) != trained
        if not bool(miss.any()):
            break
        toward = torch.where((base + delta) < trained, torch.full_like(delta, float("inf")),
                             torch.full_like(delta, -float("inf")))
        delta = torch.where(miss, torch.nextafter(delta, toward), delta)
    miss = ((base + delta) != trained).reshape(-1)
    index = miss.nonzero().reshape(-1)
    return delta, index, trained.reshape(-1)[index].clone()


def import_custom_diffusion(
    folder: str | Path,
    base_weights: Mapping[str, torch.Tensor],
    class_words: Sequence[str],
    *,
    tokens: Sequence[str] | None = None,
    prompt: str = "a photo of a {}",
) -> Concept:
    """A concept from diffusers' Custom Diffusion output. ``base_weights`` are the base UNet's
    cross-attention weights by canonical name (``hosts.diffusers_host.cross_attention_weights``)."""
    weights, embeddings = read_custom_diffusion(folder)
    tokens = list(tokens) if tokens else sorted(embeddings)
    if not tokens:
        raise InvalidInputError("No token embedding (<new1>.safetensors/.bin) was found; name the file with --embedding.")
    missing = [t for t in tokens if t not in embeddings]
    if missing:
        raise InvalidInputError(f"No embedding for {missing}; found {sorted(embeddings)}.")
    if len(class_words) != len(tokens):
        raise InvalidInputError(f"Give one class word per token {tokens} (got {list(class_words)}).")
    unknown = sorted(set(weights) - set(base_weights))
    if unknown:
        raise InvalidInputError(f"The base UNet has no layer {unknown[0]}: these weights belong to another architecture.")
    train_mode = "crossattn" if any(".to_q." in name for name in weights) else "kv"
    expected = trained_names(base_weights, train_mode)
    lacking = sorted(set(expected) - set(weights))
    if lacking:
        raise InvalidInputError(
            f"The weights lack {len(lacking)} cross-attention layers of this base (e.g. {lacking[0]}); "
            "they were trained on another architecture, or the file is incomplete."
        )
    deltas, exact = {}, {}
    for name, weight in weights.items():
        base = base_weights[name]
        if tuple(weight.shape) != tuple(base.shape):
            raise InvalidInputError(f"{name}: {tuple(weight.shape)} here, {tuple(base.shape)} in the base.")
        deltas[name], index, values = exact_delta(weight, base.detach().cpu())
        if index.numel():
            exact[name] = (index, values)
    trained_base = {name: base_weights[name] for name in expected}
    family = weights_family(base_weights) or SD15
    widths = {t: int(embeddings[t].shape[0]) for t in tokens}
    if any(width != family.context_dim for width in widths.values()):
        raise InvalidInputError(f"The token embeddings are {widths} wide, but this {family.label} base needs "
                                f"{family.context_dim} ({' + '.join(map(str, family.text_widths))}).")
    meta = ConceptMeta(
        family=family.name,
        train_mode=train_mode,
        concepts=[{"token": t, "class_word": w, "prompt": prompt} for t, w in zip(tokens, class_words)],
        initializers=["ktn"] * len(tokens), prompts=[prompt] * len(tokens),
        base_fingerprint=base_fingerprint(trained_base),
        extra={"layer_naming": "diffusers", "imported_from": "diffusers Custom Diffusion", "source": str(folder),
               "exact_values": sum(index.numel() for index, _ in exact.values())},
    )
    vectors = torch.stack([embeddings[t] for t in tokens])
    return Concept(deltas=deltas, token_vectors=vectors, tokens=tokens, class_words=list(class_words), meta=meta,
                   exact=exact or None)


def export_custom_diffusion(concept: Concept, base_weights: Mapping[str, torch.Tensor], out_dir: str | Path,
                            *, strict: bool = True) -> list[Path]:
    """Write ``pytorch_custom_diffusion_weights.safetensors`` and ``.bin`` (base + delta, float32;
    the ``.bin`` is the one diffusers' ``load_attn_procs`` accepts) and one ``<token>.safetensors``
    embedding per token, as diffusers' trainer does."""
    method_class(concept.method).check_exportable(concept, "diffusers' Custom Diffusion format")
    concept.check_against(base_weights, what="the base", strict=strict)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, delta in concept.deltas.items():
        if name not in base_weights:
            raise InvalidInputError(f"The base UNet has no layer {name}.")
        weight = base_weights[name].detach().cpu().float() + delta.float()
        if concept.exact and name in concept.exact:
            index, values = concept.exact[name]
            weight.view(-1)[index.cpu()] = values.cpu().float()
        tensors[processor_key(name)] = weight.contiguous()
    written = [out_dir / WEIGHTS_SAFE, out_dir / WEIGHTS_BIN]
    save_file(tensors, str(written[0]), metadata={"format": "pt"})
    # diffusers' load_attn_procs needs a processor for every attention layer, self-attention
    # included (an empty dict each), which safetensors cannot hold: the .bin has them.
    blocks = {name.split(".attn2.")[0] for name in concept.deltas}
    torch.save({**tensors, **{f"{block}.attn1.processor": {} for block in sorted(blocks)}}, str(written[1]))
    family = family_named(concept.family)
    for token, vector in zip(concept.tokens, concept.token_vectors):
        path = out_dir / f"{token}.safetensors"
        if len(family.text_widths) == 1:
            tensors = {token: vector.float().contiguous()}
        else:  # SDXL: one row per encoder, as diffusers' SDXL load_textual_inversion calls take them
            tensors = {key: part.float().contiguous() for key, part in zip(family.embedding_keys, family.split(vector))}
        save_file(tensors, str(path), metadata={"format": "pt", "token": token})
        written.append(path)
    return written
