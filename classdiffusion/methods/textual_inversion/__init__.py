"""Textual Inversion (arXiv 2208.01618): one new token's embedding, nothing else."""

from .method import TextualInversionMethod

__all__ = ["TextualInversionMethod"]
