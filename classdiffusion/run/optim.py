"""The optimizer's side of a step that the loop shares with checkpoints: the gradient norm (clipped
in place) and AdamW's state as flat tensors a concept file can hold, and back."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import InvalidInputError


def gradient_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The gradients' total L2 norm as a 0-d device tensor (non-finite when any gradient is);
    clipped to ``max_norm`` first when it is positive."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            flat[f"{index}.{key}"] = tensor.detach().clone()
    return flat


def restore_optimizer(optimizer: torch.optim.Optimizer, flat: Mapping[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = tensor
    saved = optimizer.state_dict()
    if len(state) != sum(len(group["params"]) for group in saved["param_groups"]):
        raise InvalidInputError("The checkpoint's optimizer state does not match this run's parameters.")
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
