"""ClassDiffusion (arXiv 2405.17532): Custom Diffusion's K/V and token plus the semantic
preservation loss."""

from .method import ClassDiffusionMethod

__all__ = ["ClassDiffusionMethod"]
