"""Training methods: what a run trains, how it is attached to the UNet, and which losses.

A method is one file with one class (:class:`base.TrainingMethod`) that carries its name, label,
recipe and capabilities; the loop (``train.TrainingRun``) owns everything they share: the host,
cached latents, the per-step random draw, accumulation, the optimizer step, checkpoints, resume,
cancel and progress. This registry is the one list of methods: the settings' choices, the CLI,
the Train node and the concept-file reader all read it.
"""

from __future__ import annotations

from .base import PLACEHOLDER_TOKEN, Losses, MethodContext, NewTokens, TrainingMethod
from .classdiffusion.method import ClassDiffusionMethod
from .infusion.method import InfusionMethod
from .textual_inversion.method import TextualInversionMethod

#: name → method class; the first is the default.
METHOD_CLASSES: dict[str, type[TrainingMethod]] = {
    method.name: method for method in (ClassDiffusionMethod, InfusionMethod, TextualInversionMethod)
}
DEFAULT_METHOD = next(iter(METHOD_CLASSES))


def method_class(name: str) -> type[TrainingMethod]:
    from ..errors import InvalidInputError

    if name not in METHOD_CLASSES:
        raise InvalidInputError(f"Unknown training method {name!r}; choose one of {list(METHOD_CLASSES)}.")
    return METHOD_CLASSES[name]


def tensor_owner(tensors) -> type[TrainingMethod]:
    """The method whose own tensors a concept holds (the default method when it holds none): for a
    concept built without a method name, from its tensors alone."""
    if not tensors:
        return METHOD_CLASSES[DEFAULT_METHOD]
    owners = [cls for cls in METHOD_CLASSES.values() if cls.tensor_prefix]
    if len(owners) != 1:
        from ..errors import InvalidInputError

        raise InvalidInputError("Name the concept's method: more than one method trains tensors of its own.")
    return owners[0]


def method_settings() -> list:
    """Every registered method's own settings (``settings.MethodSetting``), in registry order."""
    return [own for cls in METHOD_CLASSES.values() for own in cls.settings]


def methods_help() -> str:
    """Each method's name and description (the ``method`` setting's help)."""
    return " ".join(f"{cls.name}: {cls.description}." for cls in METHOD_CLASSES.values())


__all__ = ["TrainingMethod", "MethodContext", "Losses", "NewTokens", "PLACEHOLDER_TOKEN", "ClassDiffusionMethod",
           "InfusionMethod", "TextualInversionMethod", "METHOD_CLASSES", "DEFAULT_METHOD", "method_class",
           "methods_help", "method_settings", "tensor_owner"]
