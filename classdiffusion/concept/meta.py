"""A concept file's metadata, typed and validated once, where the file is read.

Every reader (apply, inspect, the nodes, resume, eval, interop) gets a :class:`ConceptMeta`
instead of the raw JSON: wrong types and inconsistent counts are refused at load with the field's
name, so nothing later meets a ``None`` where it expects a list. Unknown keys are tolerated (a
newer pack may add some) and written back unchanged (``extra``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ClassDiffusionError, ConceptFileError
from ..model.families import FAMILIES
from ..model.kv import TRAINED_SUFFIXES
from ..methods import DEFAULT_METHOD, METHOD_CLASSES

TRAIN_MODES = tuple(TRAINED_SUFFIXES)


class MetaError(ConceptFileError):
    """A metadata field has the wrong type or value (the message names the field)."""


@dataclass
class ConceptMeta:
    """What a concept file says about itself (the JSON under the ``classdiffusion`` header key)."""

    tokens: list[str] = field(default_factory=list)
    class_words: list[str] = field(default_factory=list)
    #: layer name → shape of its delta
    layers: dict[str, list[int]] = field(default_factory=dict)
    train_mode: str = "kv"
    step: int = 0
    #: one dict per step (StepRecord.to_dict())
    history: list[dict[str, Any]] = field(default_factory=list)
    #: {"sha256": str, "norms": {layer: float}} of the base's trained weights; None: unknown base
    base_fingerprint: dict[str, Any] | None = None
    base_name: str | None = None
    #: TrainConfig.to_dict() of the run (validated by TrainConfig)
    config: dict[str, Any] = field(default_factory=dict)
    #: ConceptSpec.to_dict() per token (what a resume needs); None for imported concepts
    concepts: list[dict[str, Any]] | None = None
    initializers: list[str] | None = None
    prompts: list[str] | None = None
    eos_cosine_initial: list[float] | None = None
    eos_cosine_final: list[float] | None = None
    drift_initial: list[dict[str, Any]] | None = None
    drift_final: list[dict[str, Any]] | None = None
    compression: dict[str, Any] | None = None
    #: the training method (classdiffusion.methods); files before it existed are ClassDiffusion's
    method: str = DEFAULT_METHOD
    #: the base's model family (classdiffusion.model.families); files before SDXL are all SD1.x
    family: str = "sd15"
    #: Infusion: module name → [size] of each residual vector
    residual_layers: dict[str, list[int]] | None = None
    warnings: list[str] = field(default_factory=list)
    #: every other key, kept as read
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str, source: str = "the concept file") -> "ConceptMeta":
        """Parse the header's JSON. Deep nesting, huge integers and non-objects are refused."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are huge ints
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
            raise MetaError(f"{source} has damaged ClassDiffusion metadata ({reason}); retrain or re-export it.") from None
        return cls.from_dict(raw, source)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "the concept file") -> "ConceptMeta":
        """Validate a metadata mapping; MetaError names the first bad field."""
        if not isinstance(raw, dict):
            raise MetaError(f"{source}: its ClassDiffusion metadata is a JSON {type(raw).__name__}, not an "
                            "object; the file is damaged.")
        check = _Checker(source)
        for key in ("tokens", "class_words", "layers"):
            if key not in raw:
                raise MetaError(f"{source}: metadata lacks {key!r}; the file is damaged.")
        method, family = _read_method_and_family(raw, check, source)
        tokens = _read_tokens(raw["tokens"], check, method)
        n = len(tokens)
        class_words = check.strings(raw["class_words"], "class_words", length=n if tokens else None, min_length=1)
        m = len(class_words)  # concepts (= tokens for ClassDiffusion)
        values: dict[str, Any] = {
            "tokens": tokens,
            "class_words": class_words,
            "layers": check.layers(raw["layers"]),
            "method": method,
            "family": family,
        }
        readers: dict[str, Callable[[Any, str], Any]] = {
            "train_mode": lambda v, f: check.choice(v, f, TRAIN_MODES),
            "step": lambda v, f: check.integer(v, f, minimum=0),
            "history": check.history,
            "base_fingerprint": check.fingerprint,
            "base_name": check.optional(check.string),
            "config": check.config,
            "concepts": check.optional(lambda v, f: check.concepts(v, f, tokens, m)),
            "initializers": check.optional(lambda v, f: check.strings(v, f, length=n)),
            "prompts": check.optional(lambda v, f: check.strings(v, f, length=m, template=True)),
            **{cls.tensor_layers_key: check.optional(lambda v, f: check.layers(v, f))  # a method's own tensors
               for cls in METHOD_CLASSES.values() if cls.tensor_layers_key},
            "eos_cosine_initial": check.optional(lambda v, f: check.numbers(v, f, length=n)),
            "eos_cosine_final": check.optional(lambda v, f: check.numbers(v, f, length=n)),
            "drift_initial": check.optional(lambda v, f: check.drifts(v, f, n)),
            "drift_final": check.optional(lambda v, f: check.drifts(v, f, n)),
            "compression": check.optional(check.mapping),
            "warnings": lambda v, f: check.strings(v, f, allow_empty=True),
        }
        for key, read in readers.items():
            if key in raw:
                values[key] = read(raw[key], key)
        extra = {key: value for key, value in raw.items() if key not in values and key not in readers}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class _Checker:
    """Type checks that name the field (``history[3].loss``) and the file."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, name: str, problem: str):
        raise MetaError(f"{self.source}: metadata field {name!r} {problem}; the file is damaged or was edited.")

    def optional(self, read):
        return lambda value, name: None if value is None else read(value, name)

    def string(self, value, name: str, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            self.fail(name, f"must be a non-empty string (got {_show(value)})")
        return value

    def strings(self, value, name: str, *, length: int | None = None, min_length: int = 0,
                allow_empty: bool = False, template: bool = False) -> list[str]:
        if not isinstance(value, list):
            self.fail(name, f"must be a list of strings (got {_show(value)})")
        if length is not None and len(value) != length:
            self.fail(name, f"has {len(value)} entries for {length} token(s)")
        if len(value) < min_length:
            self.fail(name, "is empty")
        items = [self.string(item, f"{name}[{i}]", allow_empty) for i, item in enumerate(value)]
        if template:
            from ..config import check_prompt_template

            for i, item in enumerate(items):
                try:
                    check_prompt_template(item)
                except ClassDiffusionError as exc:
                    self.fail(f"{name}[{i}]", str(exc))
        return items

    def integer(self, value, name: str, minimum: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            self.fail(name, f"must be an integer{'' if minimum is None else f' ≥ {minimum}'} (got {_show(value)})")
        if abs(value) > 2 ** 53:
            self.fail(name, "is implausibly large")
        return value

    def number(self, value, name: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(name, f"must be a finite number (got {_show(value)})")
        return value

    def numbers(self, value, name: str, length: int | None = None) -> list[float]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            self.fail(name, f"must be a list of {length if length is not None else 'some'} numbers (got {_show(value)})")
        return [self.number(item, f"{name}[{i}]") for i, item in enumerate(value)]

    def choice(self, value, name: str, choices) -> str:
        if value not in choices:
            self.fail(name, f"must be one of {list(choices)} (got {_show(value)})")
        return value

    def mapping(self, value, name: str) -> dict:
        if not isinstance(value, dict):
            self.fail(name, f"must be an object (got {_show(value)})")
        return value

    def layers(self, value, name: str = "layers") -> dict[str, list[int]]:
        self.mapping(value, name)
        for layer, shape in value.items():
            if not isinstance(shape, list) or not 1 <= len(shape) <= 2:
                self.fail(f"{name}.{layer}", f"must be a shape of 1 or 2 sizes (got {_show(shape)})")
            for size in shape:
                self.integer(size, f"{name}.{layer}", minimum=1)
        return value

    def fingerprint(self, value, name: str) -> dict | None:
        if value is None or value == {}:
            return None
        self.mapping(value, name)
        self.string(value.get("sha256"), f"{name}.sha256")
        norms = self.mapping(value.get("norms"), f"{name}.norms")
        for layer, norm in norms.items():
            self.number(norm, f"{name}.norms.{layer}")
        return value

    def history(self, value, name: str) -> list[dict]:
        if not isinstance(value, list):
            self.fail(name, f"must be a list of step records (got {_show(value)})")
        for i, record in enumerate(value):
            where = f"{name}[{i}]"
            self.mapping(record, where)
            if "step" in record:
                self.integer(record["step"], f"{where}.step", minimum=0)
            for key, item in record.items():  # loss terms and diagnostics are the method's: any names
                if key in ("step", "drift_rank") or item is None:
                    continue
                if isinstance(item, list):
                    self.numbers(item, f"{where}.{key}")
                else:
                    self.number(item, f"{where}.{key}")
            if record.get("drift_rank") is not None:
                if not isinstance(record["drift_rank"], list):
                    self.fail(f"{where}.drift_rank", "must be a list of ranks")
                for k, rank in enumerate(record["drift_rank"]):
                    self.integer(rank, f"{where}.drift_rank[{k}]")
        return value

    def drifts(self, value, name: str, count: int) -> list[dict]:
        if not isinstance(value, list) or len(value) != count:
            self.fail(name, f"must be a list of {count} drift record(s) (got {_show(value)})")
        for i, record in enumerate(value):
            where = f"{name}[{i}]"
            self.mapping(record, where)
            self.string(record.get("token"), f"{where}.token")
            self.number(record.get("cosine"), f"{where}.cosine")
            self.integer(record.get("rank"), f"{where}.rank")
            self.integer(record.get("total"), f"{where}.total")
        return value

    def config(self, value, name: str) -> dict:
        from ..config import TrainConfig

        self.mapping(value, name)
        try:
            TrainConfig.from_dict(value)
        except (ClassDiffusionError, TypeError, ValueError) as exc:
            self.fail(name, f"holds an invalid setting: {exc}")
        return value

    def concepts(self, value, name: str, tokens: list[str], count: int) -> list[dict]:
        from ..config import ConceptSpec

        if not isinstance(value, list) or len(value) != count:
            self.fail(name, f"must be a list of {count} concept description(s) (got {_show(value)})")
        for i, item in enumerate(value):
            self.mapping(item, f"{name}[{i}]")
            try:
                spec = ConceptSpec.from_dict(item)
            except (ClassDiffusionError, TypeError, ValueError) as exc:
                self.fail(f"{name}[{i}]", f"is not a valid concept description: {exc}")
            if tokens and spec.token != tokens[i]:
                self.fail(f"{name}[{i}].token", f"is {spec.token!r} but the file's token {i} is {tokens[i]!r}")
        return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_method_and_family(raw: Mapping[str, Any], check: "_Checker", source: str) -> tuple[str, str]:
    """The method and model family a file names (files before them: ClassDiffusion on SD1.x); one
    this version does not know asks for an update rather than calling the file damaged."""
    method = raw.get("method", DEFAULT_METHOD)
    if isinstance(method, str) and method not in METHOD_CLASSES and method.strip():
        raise MetaError(f"{source} was trained with the {method!r} method, which this version of the pack does "
                        f"not know (it knows {list(METHOD_CLASSES)}); update the pack to use it.")
    method = check.choice(method, "method", tuple(METHOD_CLASSES))
    family = raw.get("family", "sd15")
    if isinstance(family, str) and family not in FAMILIES and family.strip():
        raise MetaError(f"{source} was trained on a {family!r} base, a model family this version of the pack "
                        f"does not know (it knows {list(FAMILIES)}); update the pack to use it.")
    return method, check.choice(family, "family", tuple(FAMILIES))


def _read_tokens(raw_tokens: Any, check: "_Checker", method: str) -> list[str]:
    """The tokens: one word each, no repeats; none for a method that adds no token."""
    has_tokens = METHOD_CLASSES[method].has_tokens
    tokens = check.strings(raw_tokens, "tokens", min_length=1 if has_tokens else 0)
    if not has_tokens and tokens:
        check.fail("tokens", f"must be empty for the {method} method, which adds no token")
    for i, token in enumerate(tokens):
        if any(ch.isspace() for ch in token):
            check.fail(f"tokens[{i}]", f"must be one word without spaces (got {token!r})")
    if len(set(tokens)) != len(tokens):
        check.fail("tokens", f"repeats a token ({tokens})")
    return tokens
