"""The interface of a training method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch


@dataclass
class Losses:
    """One batch's loss terms; ``spl``/``cosines``/``prior`` are zero/empty/None where a method has none."""

    total: torch.Tensor
    recon: torch.Tensor
    spl: torch.Tensor
    cosines: list[torch.Tensor]
    prior: torch.Tensor | None = None

    def values(self) -> list[float]:
        """[total, recon, spl, cos..., (prior)] as floats, with one device sync."""
        scalars = [self.total, self.recon, self.spl, *self.cosines] + ([self.prior] if self.prior is not None else [])
        return torch.stack([s.detach().float() for s in scalars]).tolist()


class TrainingMethod:
    """What is trained, how it is attached to the frozen UNet, and which losses: the part of a run
    that differs between methods. The run (``train.TrainingRun``) calls, in order: ``setup()``
    (before the images are encoded), ``setup_constants()``, ``param_groups()`` once, then per step
    ``phrase()`` for each row, ``losses()`` per micro-batch and ``before_optimizer_step()``;
    ``attach()`` wraps the steps."""

    #: The name saved in concept files and given to ``--method``.
    name: ClassVar[str]
    #: The base weights (train mode) the run fingerprints and the method reads.
    base_mode: ClassVar[str] = "kv"

    @classmethod
    def weights_mode(cls, config) -> str:
        """The train mode whose base weights the run reads and fingerprints."""
        return cls.base_mode
    #: Whether subject masks (alpha channel / mask images) weight the loss.
    uses_subject_masks: ClassVar[bool] = False
    #: Whether class images (prior preservation) can be used.
    supports_class_images: ClassVar[bool] = True
    #: Whether the method adds each concept's token to the text encoder (its file lists them).
    has_tokens: ClassVar[bool] = True

    def __init__(self, run: Any):
        self.run = run
        self.host = run.host
        self.config = run.config
        self.concepts = run.concepts
        self.device = run.device

    # -- set up ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Create the trained tensors (and add tokens to the text encoder if the method has any)."""
        raise NotImplementedError

    def setup_constants(self) -> None:
        """Anything computed once after the images are encoded (e.g. fixed text features)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups, in the order a checkpoint stores their optimizer state
        (see ``concept._check_optimizer``)."""
        raise NotImplementedError

    @property
    def learning_rate(self) -> float:
        """The rate logged with each step."""
        raise NotImplementedError

    # -- per step --------------------------------------------------------------------------
    def phrase(self, concept: int, prefix: str, rng: torch.Generator) -> str:
        """The training prompt of one row of concept ``concept``."""
        raise NotImplementedError

    def attach(self) -> Callable[[], None]:
        """Attach the trained tensors to the host's UNet; returns the detach function."""
        raise NotImplementedError

    def losses(self, batch: Any) -> Losses:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """After the gradients are final (unscaled, clipped), before AdamW's step."""

    # -- validation previews -----------------------------------------------------------------
    def validation_contexts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(contexts [P, T, D] of the prompts with the trained text inputs, the empty prompt's [1, T, D]),
        and whatever the attached tensors need to act on them during sampling."""
        from ..precision import autocast

        with torch.no_grad(), autocast(self.device, self.config.mixed_precision):
            return (self.host.encode_text(prompts, self.text_vectors()).context,
                    self.host.encode_text([""], {}).context)

    def text_vectors(self) -> dict[str, torch.Tensor]:
        """The trained token vectors to inject into prompts (none for methods without tokens)."""
        return {}

    def end_validation(self) -> None:
        """Undo what ``validation_contexts`` set up."""

    # -- reporting and files ---------------------------------------------------------------
    def drift(self) -> list[dict]:
        """Each token's drift now (methods without tokens: none)."""
        return []

    def load_state(self, checkpoint: Any) -> None:
        """Copy a checkpoint's trained tensors into this run's (resume)."""
        raise NotImplementedError

    @staticmethod
    @torch.no_grad()
    def copy_saved(trained: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], what: str) -> None:
        """Copy each saved tensor into its trained one; a missing name is the checkpoint's fault."""
        from ..errors import InvalidInputError

        for name, tensor in trained.items():
            if name not in saved:
                raise InvalidInputError(f"The checkpoint lacks the {what} of {name}.")
            tensor.copy_(saved[name])

    def concept_fields(self) -> dict[str, Any]:
        """The trained tensors as ``Concept`` fields (deltas, token_vectors, tokens, residuals), on the CPU."""
        raise NotImplementedError

    def trained_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups() for p in group["params"]]
