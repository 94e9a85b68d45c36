"""Errors the trainer raises. Every message says what went wrong *and* what to do about it."""


class ClassDiffusionError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(ClassDiffusionError, ValueError):
    """Bad user input: images, tokens, class words, settings."""


class BaseModelError(ClassDiffusionError, ValueError):
    """The base model is not one this trainer supports (not SD1.5-shaped)."""


class ConceptFileError(ClassDiffusionError):
    """A concept file is missing, corrupt, truncated or not a ClassDiffusion concept."""


class BaseMismatchError(ConceptFileError):
    """A concept file was trained on another base model (or has other layer shapes)."""


class TrainingDivergedError(ClassDiffusionError):
    """The loss became NaN or infinite; training stopped and kept the last good checkpoint."""


class TrainingCancelled(ClassDiffusionError):
    """The host asked to stop (Cancel in ComfyUI, Ctrl-C in the CLI); nothing partial was written."""
