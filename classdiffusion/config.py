"""The settings of a training run, in one object that is saved with every concept file."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from .errors import InvalidInputError
from .methods import DEFAULT_METHOD, METHOD_CLASSES, method_class, method_settings, methods_help
from .settings import setting

logger = logging.getLogger("classdiffusion")

TrainMode = Literal["kv", "crossattn"]
MixedPrecision = Literal["no", "fp16", "bf16"]
#: Custom Diffusion's (and the official ClassDiffusion scripts') initializer: a rare token.
DEFAULT_INITIALIZER = "ktn"
#: The official ClassDiffusion prompt: "a photo of a <new1> dog".
DEFAULT_PROMPT = "a photo of a {}"


def check_prompt_template(template: Any) -> str:
    """A prompt template holds exactly one ``{}`` and no other braces (``str.format`` would fail
    on ``{x}`` or a lone ``{``)."""
    import string

    problem = None
    if not isinstance(template, str):
        problem = f"is not text (got {template!r})"
    else:
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
        except ValueError:
            fields = None
        if fields is None or len(fields) != 1 or fields[0] != ("", "", None):
            problem = "must contain exactly one '{}' (and no other braces)"
    if problem:
        raise InvalidInputError(
            f"The prompt template {template!r} {problem}; '{{}}' is where '<token> <class word>' goes, "
            "e.g. 'a photo of a {}'."
        )
    return template


def _check_field_types(obj) -> None:
    """Each setting has its default's type (bool for flags, int for counts, a finite number for
    rates, text for choices): JSON and node inputs cannot slip a "500" or a null through."""
    import math

    for f in dataclasses.fields(obj):
        if f.default is dataclasses.MISSING:
            continue
        value, kind = getattr(obj, f.name), type(f.default)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise InvalidInputError(f"{f.name} must be {'a finite number' if kind is float else kind.__name__} "
                                    f"(got {value!r}).")


def _check_declared_ranges(obj) -> None:
    """Each setting within what its ``setting()`` declares: one of its choices, at least its min,
    at most its max, and for whole numbers with a step (resolution) a multiple of it. The CLI and
    the node reach the same check, so both enforce one range."""
    for f in dataclasses.fields(obj):
        info, value = f.metadata, getattr(obj, f.name)
        hint = f" {info['help']}" if info.get("help") else ""
        if "choices" in info and value not in info["choices"]:
            raise InvalidInputError(f"{f.name} must be one of {list(info['choices'])} (got {value!r}).")
        if "min" in info and value < info["min"]:
            raise InvalidInputError(f"{f.name} must be at least {info['min']} (got {value!r}).{hint}")
        if "max" in info and value > info["max"]:
            raise InvalidInputError(f"{f.name} must be at most {info['max']} (got {value!r}).{hint}")
        if isinstance(f.default, int) and not isinstance(f.default, bool) and info.get("step", 1) > 1 \
                and value % info["step"]:
            raise InvalidInputError(f"{f.name} must be a multiple of {info['step']} (got {value!r}).{hint}")


@dataclass
class ConceptSpec:
    """One concept to learn: its new token, its class word and its images.

    ``prompt`` is a template with one ``{}`` that receives "<token> <class>" for training and
    "<class>" alone for the class phrase of the semantic preservation loss.
    ``initializer`` is the word whose embedding starts the token: a word, or "class" to start from
    the class word (Custom Diffusion uses the rare token "ktn", which is the default).
    """

    token: str
    class_word: str
    images: list[str] = field(default_factory=list)
    initializer: str = DEFAULT_INITIALIZER
    prompt: str = DEFAULT_PROMPT
    class_images: list[str] = field(default_factory=list)
    #: Subject masks for Infusion's loss (files/folders matched to the images by file name).
    masks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip():
            raise InvalidInputError("The concept token is empty or not text: give a new word such as '<sks>'.")
        if any(ch.isspace() for ch in self.token):
            raise InvalidInputError(
                f"The token {self.token!r} contains spaces: a token must be one word such as '<sks>'."
            )
        if not isinstance(self.class_word, str) or not self.class_word.strip():
            raise InvalidInputError(
                "The class word is empty: give the concept's class, e.g. 'dog', 'backpack', 'person'."
            )
        self.class_word = self.class_word.strip()
        check_prompt_template(self.prompt)
        if self.initializer is None or (isinstance(self.initializer, str) and not self.initializer.strip()):
            self.initializer = DEFAULT_INITIALIZER
        if not isinstance(self.initializer, str):
            raise InvalidInputError(f"The initializer must be a word (got {self.initializer!r}).")
        for key in ("images", "class_images", "masks"):
            paths = getattr(self, key)
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise InvalidInputError(f"{key} must be a list of file or folder paths (got {paths!r}).")

    @property
    def has_default_prompt(self) -> bool:
        """The user kept the default template (methods with a template list of their own draw from it)."""
        return self.prompt == DEFAULT_PROMPT

    @property
    def initializer_word(self) -> str:
        return self.class_word if self.initializer == "class" else self.initializer

    def train_phrase(self, prefix: str = "") -> str:
        """"a photo of a <sks> dog" (with an optional augmentation prefix such as "close up ")."""
        return prefix + self.prompt.format(f"{self.token} {self.class_word}")

    def class_phrase(self, prefix: str = "") -> str:
        """"a photo of a dog": the phrase SPL keeps the concept close to."""
        return prefix + self.prompt.format(self.class_word)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> "ConceptSpec":
        """Accepts our keys and the official code's concepts_list keys (instance_prompt, ...)."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"A concept description must be an object with token, class_word and "
                                    f"images (got {data!r:.60}).")
        data = dict(data)
        if "token" not in data and "modifier_token" in data:
            data["token"] = data.pop("modifier_token")
        if "class_word" not in data and "cls_token" in data:
            data["class_word"] = data.pop("cls_token")
        if "images" not in data and "instance_data_dir" in data:
            data["images"] = data.pop("instance_data_dir")
        if "class_images" not in data and "class_data_dir" in data:
            data["class_images"] = data.pop("class_data_dir")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"instance_prompt", "class_prompt"}
        if unknown:
            raise InvalidInputError(
                f"Unknown keys in the concept description: {sorted(unknown)}; "
                f"use {sorted(known)}."
            )
        missing = {"token", "class_word"} - set(data)
        if missing:
            raise InvalidInputError(f"The concept description lacks {sorted(missing)}.")
        for key in ("images", "class_images", "masks"):
            value = data.get(key, [])
            if isinstance(value, (str, Path)):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, (str, Path)) for v in value):
                raise InvalidInputError(f"{key} must be a path or a list of paths (got {value!r}).")
            if base_dir is not None:
                value = [str(base_dir / v) if not Path(v).is_absolute() else str(v) for v in value]
            data[key] = [str(v) for v in value]
        return cls(**{k: v for k, v in data.items() if k in known})


def setting_info(name: str) -> dict[str, Any]:
    """help, cli, min, max, step, choices and default of a TrainConfig field."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return {**f.metadata, "default": f.default}
    raise KeyError(name)


def with_method_settings(cls):
    """Each registered method's own settings (``TrainingMethod.settings``, declared in its folder)
    added to the class after their anchor fields, before ``dataclass`` reads it: TrainConfig stays
    one flat object (what concept files hold), and a method's settings live with the method."""
    annotations: dict[str, Any] = {}

    def add(name: str, annotation: Any) -> None:
        annotations[name] = annotation
        for own in method_settings():
            if own.after == name:  # a method's setting may follow another of its own
                setattr(cls, own.name, own.declared)
                add(own.name, own.annotation)

    for name, annotation in cls.__annotations__.items():
        add(name, annotation)
    missing = [own.name for own in method_settings() if own.name not in annotations]
    if missing:
        raise TypeError(f"method settings {missing} follow no TrainConfig field")
    cls.__annotations__ = annotations
    return cls


@dataclass
@with_method_settings
class TrainConfig:
    """Training settings. Defaults are the paper's / official code's (SD1.5, single concept).

    ``learning_rate`` is the *base* rate; with ``scale_lr`` (the official scripts' ``--scale_lr``)
    the rate used is ``learning_rate × batch_size`` (× 2 more with prior preservation), i.e.
    2e-5 at batch 2.
    """

    method: str = setting(DEFAULT_METHOD, methods_help(), choices=tuple(METHOD_CLASSES), cli="--method")
    steps: int = setting(500, "Training steps. Paper: 500 (800 for several concepts).", min=1, max=20000,
                         cli="--steps")
    batch_size: int = setting(2, "Images per step (paper: 2).", min=1, max=16, cli="--batch-size")
    learning_rate: float = setting(1e-5, "Base learning rate, multiplied by the batch size unless scale_lr is off "
                                   "(paper: 1e-5 → 2e-5 at batch 2).", min=1e-7, max=1e-2, step=1e-6, cli="--lr")
    scale_lr: bool = setting(True, "Multiply the learning rate by the batch size (× 2 more with class images), "
                             "as the official --scale_lr does.", cli="--no-scale-lr")
    prior_weight: float = setting(1.0, "Weight of the prior-preservation loss on class images.", min=0.0,
                                  cli="--prior-weight")
    resolution: int = setting(512, "Training resolution, a multiple of 64 (SD1.5: 512; SDXL: 1024).", min=64, max=1024, step=64,
                              cli="--resolution")
    train_mode: TrainMode = setting("kv", "kv: attn2's to_k and to_v (the paper); crossattn: all of attn2.",
                                    choices=("kv", "crossattn"), cli="--train-mode")
    hflip: bool = setting(True, "Random horizontal flips.", cli="--no-hflip")
    augment: bool = setting(True, "Random rescaling of the images, as the official code does.", cli="--no-augment")
    shrink_scales: int = setting(6, "Size bins an image is shrunk into (augmentation).", min=1)
    zoom_scales: int = setting(2, "Size bins an image is zoomed into (augmentation).", min=0)
    adam_beta1: float = setting(0.9, "AdamW β1.", min=0.0, max=0.99999)
    adam_beta2: float = setting(0.999, "AdamW β2.", min=0.0, max=0.99999)
    weight_decay: float = setting(1e-2, "AdamW weight decay, on the full trained weight as officially.", min=0.0)
    adam_epsilon: float = setting(1e-8, "AdamW ε.", min=0.0)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = off).", min=0.0)
    gradient_accumulation: int = setting(1, "Micro-batches of batch_size per optimizer step (Infusion's recipe: "
                                         "4 × batch 4).", min=1, max=64, cli="--gradient-accumulation")
    mixed_precision: MixedPrecision = setting("no", "Autocast dtype; frozen models are stored in it, trained tensors "
                                              "stay fp32.", choices=("no", "fp16", "bf16"), cli="--mixed-precision")
    gradient_checkpointing: bool = setting(False, "Less memory, slower steps.", cli="--gradient-checkpointing")
    memory: str = setting("check", "Memory planner: before the run, estimate its peak from the model's shapes and "
                          "compare with the free memory. check: report (and refuse what cannot fit); auto: also switch "
                          "on gradient checkpointing, then trade batch for gradient accumulation, to fit; off: skip.",
                          choices=("auto", "check", "off"), cli="--memory")
    memory_limit_mib: int = setting(0, "Plan for at most this much memory in MiB (0 = the device's free memory); "
                                    "e.g. to leave room for other work.", min=0, max=1 << 24, cli="--memory-limit-mib")
    attention: Literal["sdpa", "eager"] = setting("sdpa", "UNet attention implementation.", choices=("sdpa", "eager"),
                                                  cli="--attention")
    channels_last: bool = setting(False, "UNet activations in channels-last layout (faster convolutions on recent "
                                  "GPUs).", cli="--channels-last")
    compile: bool = setting(False, "torch.compile the UNet (slow first step; pays off over hundreds of steps on a "
                            "GPU).", cli="--compile")
    compile_mode: str = setting("default", "With compile: torch.compile's mode. reduce-overhead also captures the "
                                "step in CUDA graphs (fewer launches; more memory); max-autotune-no-cudagraphs "
                                "searches faster kernels (a longer first compile).",
                                choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                                cli="--compile-mode")
    log_every: int = setting(10, "Read the loss values back from the device every N steps (or every second, whichever "
                             "comes first); each read waits for the GPU to finish its queued work. The history keeps "
                             "every step either way; 1 = read after every step.", min=1, max=10000, cli="--log-every")
    seed: int = setting(0, "Seed: same inputs and seed give the same concept.", min=0, max=0xFFFFFFFF, cli="--seed")
    save_every: int = setting(0, "Also save NAME-stepNNNNN.safetensors every N steps beside the concept (0 = off), to "
                              "pick the best step (Load Concept K/V and Compare Concept Steps list them; `classdiffusion "
                              "inspect` shows their losses) or to resume.", min=0, max=20000, cli="--save-every")
    checkpoint_optimizer: bool = setting(True, "Checkpoints hold the optimizer state, so training can resume from "
                                         "them exactly; off: concept-only files, a third of the size.",
                                         cli="--no-checkpoint-optimizer")
    validation_every: int = setting(0, "Sample the validation prompts every N steps (and before the first) into a "
                                    "grid of previews (0 = off).", min=0, max=20000, cli="--validation-every")
    validation_steps: int = setting(25, "Sampling steps of each validation preview.", min=1, max=200,
                                    cli="--validation-steps")
    validation_seed: int = setting(0, "Seed of the first validation prompt (prompt k: seed + k); the same at every "
                                   "validation, so the columns are comparable.", min=0, max=0xFFFFFFFF,
                                   cli="--validation-seed")
    validation_guidance: float = setting(6.0, "Classifier-free guidance of the validation previews (paper: 6.0).",
                                         min=0.0, max=30.0, step=0.1, cli="--validation-guidance")
    validation_prompts: list = field(default_factory=list, metadata={
        "help": "Validation prompts, one per line (CLI: --validation-prompt, repeatable); empty: each concept's "
                "training phrase and the same '... wearing headphones'. Sampled at fixed seeds every validation_every "
                "steps into a grid."})
    drift_every: int = setting(0, "Log each token's drift rank every N steps (0 = only before and after).", min=0,
                               cli="--drift-every")

    def __post_init__(self) -> None:
        _check_field_types(self)
        _check_declared_ranges(self)
        if not isinstance(self.validation_prompts, list) or not all(
                isinstance(p, str) and p.strip() for p in self.validation_prompts):
            raise InvalidInputError("validation_prompts must be a list of non-empty prompts.")

    def with_family_defaults(self, family, explicit: Mapping[str, Any] = ()) -> "TrainConfig":
        """These settings with the model family's own defaults (``families.Family.defaults``: SDXL
        trains at 1024 px) for every setting not in ``explicit`` (what the user set)."""
        changes = {name: value for name, value in family.defaults.items() if name not in explicit}
        if changes:
            logger.info("%s defaults: %s", family.label, ", ".join(f"{k}={v}" for k, v in changes.items()))
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def for_method(cls, method: str, **settings: Any) -> "TrainConfig":
        """A config with ``method``'s recipe (its class's ``recipe``) under the given settings."""
        return cls(**{**method_class(method).recipe, **settings, "method": method})

    def effective_learning_rate(self, with_prior: bool) -> float:
        lr = self.learning_rate
        if self.scale_lr:
            lr *= self.batch_size * (2.0 if with_prior else 1.0)
        return lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        if not isinstance(data, dict):
            raise InvalidInputError(f"The training settings must be an object (got {type(data).__name__}).")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def load_concepts_json(path: str | Path) -> list[ConceptSpec]:
    """Reads a concepts.json: a list of concept objects (paths relative to the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise InvalidInputError(f"The concepts file {path} does not exist.") from None
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInputError(f"The concepts file {path} is not valid JSON: {str(exc)[:120]}.") from None
    if isinstance(data, dict):
        data = data.get("concepts", [data])
    if not isinstance(data, list) or not data:
        raise InvalidInputError(f"The concepts file {path} must hold a non-empty list of concepts.")
    return [ConceptSpec.from_dict(item, base_dir=path.parent) for item in data]


def check_concepts(concepts: Sequence[ConceptSpec]) -> None:
    """Several concepts must have distinct tokens."""
    if not concepts:
        raise InvalidInputError("No concept given: pass at least one token, class word and images.")
    tokens = [c.token for c in concepts]
    if len(set(tokens)) != len(tokens):
        raise InvalidInputError(f"Each concept needs its own token; got {tokens}.")
