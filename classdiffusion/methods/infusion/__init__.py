"""Infusion (arXiv 2404.14007): value residuals at the class word, and everything that attaches
them (``residual``)."""

from .method import InfusionMethod

__all__ = ["InfusionMethod"]
