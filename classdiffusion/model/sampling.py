"""DDIM timesteps shared by the Fisher divergence and the validation previews."""

from __future__ import annotations

from ..errors import InvalidInputError


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps with diffusers' default "leading" spacing and steps_offset 1 (SD1.5)."""
    if steps < 1:
        raise InvalidInputError("DDIM sampling needs at least one timestep.")
    ratio = num_train_timesteps // steps
    return [min(num_train_timesteps - 1, i * ratio + 1) for i in reversed(range(steps))]
