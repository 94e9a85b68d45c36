"""Training methods: what a run trains, how it is attached to the UNet, and which losses.

A method is one small class (:class:`base.TrainingMethod`); the loop (``train.TrainingRun``)
owns everything they share: the host, cached latents, the per-step random draw, accumulation,
the optimizer step, checkpoints, resume, cancel and progress.
"""

from __future__ import annotations

from .base import TrainingMethod
from .classdiffusion import ClassDiffusionMethod
from .infusion import InfusionMethod

METHOD_CLASSES: dict[str, type[TrainingMethod]] = {
    ClassDiffusionMethod.name: ClassDiffusionMethod,
    InfusionMethod.name: InfusionMethod,
}


def method_class(name: str) -> type[TrainingMethod]:
    from ..errors import InvalidInputError

    if name not in METHOD_CLASSES:
        raise InvalidInputError(f"Unknown training method {name!r}; choose one of {sorted(METHOD_CLASSES)}.")
    return METHOD_CLASSES[name]


__all__ = ["TrainingMethod", "ClassDiffusionMethod", "InfusionMethod", "METHOD_CLASSES", "method_class"]
