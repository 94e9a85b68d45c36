"""Resuming a run from a step checkpoint, in one place: which settings may change, how a
checkpoint plus the user's overrides become the run's settings and concepts, and the one check
that the checkpoint fits a run (``train()`` makes it once, before any image is encoded)."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from ..concept import Concept
from ..config import ConceptSpec, TrainConfig
from ..errors import InvalidInputError
from ..methods import method_class

logger = logging.getLogger("classdiffusion")

#: Settings that may change when resuming without changing the result.
RESUME_MAY_CHANGE = {"steps", "save_every", "drift_every", "checkpoint_optimizer", "memory", "memory_limit_mib",
                     "validation_every", "validation_steps", "validation_seed", "validation_guidance",
                     "validation_prompts"}


def _require_record(checkpoint: Concept) -> None:
    if not checkpoint.meta.concepts:
        raise InvalidInputError(
            "That concept file does not record how it was trained (an imported or older concept), so it "
            "cannot be resumed; start a new run instead."
        )
    if not checkpoint.resumable:
        raise InvalidInputError(
            "That concept file holds no optimizer state, so training cannot resume from it exactly. "
            "Resume from a checkpoint written with --save-every (NAME-stepNNNNN.safetensors)."
        )


def resume_settings(checkpoint: Concept, overrides: Mapping[str, Any]) -> tuple[TrainConfig, list[ConceptSpec]]:
    """The run that continues ``checkpoint``: its saved settings with the overrides that may change
    (the others are ignored with a warning) and its saved concepts."""
    _require_record(checkpoint)
    ignored = sorted(set(overrides) - RESUME_MAY_CHANGE)
    if ignored:
        logger.warning("Resuming uses the checkpoint's settings; ignoring %s.", ignored)
    settings = {**checkpoint.meta.config, **{k: v for k, v in overrides.items() if k in RESUME_MAY_CHANGE}}
    return TrainConfig.from_dict(settings), [ConceptSpec.from_dict(c) for c in checkpoint.meta.concepts]


def check_resume(checkpoint: Concept, concepts: Sequence[ConceptSpec], config: TrainConfig) -> None:
    """The checkpoint continues exactly this run: same method, concepts and settings (but those of
    RESUME_MAY_CHANGE), and more steps than it has."""
    _require_record(checkpoint)
    if checkpoint.method != config.method:
        raise InvalidInputError(f"The checkpoint was trained with the {checkpoint.method} method, not {config.method}.")
    tokens = [c.token for c in concepts] if method_class(config.method).has_tokens else []
    if checkpoint.tokens != tokens or checkpoint.class_words != [c.class_word for c in concepts]:
        raise InvalidInputError(
            f"The checkpoint trains {checkpoint.tokens} / {checkpoint.class_words}, not "
            f"{tokens} / {[c.class_word for c in concepts]}."
        )
    saved = TrainConfig.from_dict(checkpoint.meta.config).to_dict()
    changed = [k for k, v in config.to_dict().items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if changed:
        raise InvalidInputError(
            f"Resuming needs the checkpoint's settings; these differ: {changed}. "
            f"Only {', '.join(sorted(RESUME_MAY_CHANGE))} may change."
        )
    if config.steps <= checkpoint.step:
        raise InvalidInputError(
            f"The checkpoint is at step {checkpoint.step}; ask for more steps than that (got {config.steps})."
        )
