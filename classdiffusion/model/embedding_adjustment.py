"""TEA, test-time embedding adjustment (Bui et al., "Mitigating Semantic Collapse in Generative
Personalization with a Surprisingly Simple Test-Time Embedding Adjustment", ICLR 2026; code:
tuananhbui89/Embedding-Adjustment): at sampling time, each position of the prompt's text
embedding is pulled back towards the same position of the class prompt's (the prompt without the
concept's token): its norm moves ``alpha`` of the way to the class embedding's, then its direction
turns ``rho`` of the angle towards it (spherical interpolation). Nothing is trained and nothing in
the concept file changes; rho = 0 is the concept as trained. The source's defaults: rho 0.2,
alpha 0.5."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The source's defaults (its ClassDiffusion script: --rho 0.2 --alpha 0.5).
DEFAULT_RHO = 0.2
DEFAULT_ALPHA = 0.5


def adjust_towards_class(embeddings: torch.Tensor, class_embeddings: torch.Tensor, rho: float,
                         alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """TEA on text embeddings [..., D] (per position, as the source applies it to the whole
    [B, 77, D] prompt embedding): norms blended by ``alpha`` (0 keeps the prompt's, 1 takes the
    class prompt's), then the direction turned ``rho`` ∈ [0, 1] of the way to the class embedding;
    near-parallel positions (|sin θ| < 1e-6) interpolate linearly, as the source does."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"TEA's rho must be in [0, 1] (got {rho})")
    if embeddings.shape != class_embeddings.shape:
        raise ValueError(f"TEA needs embeddings of one shape (got {tuple(embeddings.shape)} and "
                         f"{tuple(class_embeddings.shape)})")
    norm = embeddings.norm(dim=-1, keepdim=True)
    class_norm = class_embeddings.norm(dim=-1, keepdim=True)
    target_norm = (1 - alpha) * norm + alpha * class_norm
    start, end = target_norm * embeddings / norm, target_norm * class_embeddings / class_norm
    cos = (F.normalize(start, dim=-1) * F.normalize(end, dim=-1)).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    turned = torch.sin((1 - rho) * theta) / sin * start + torch.sin(rho * theta) / sin * end
    return torch.where(sin.abs() < 1e-6, (1 - rho) * start + rho * end, turned)
