"""Infusion's own settings: its residuals' learning rate and which projections carry them
(TrainConfig fields; the CLI flags are generated from these declarations)."""

from __future__ import annotations

from ...settings import MethodSetting, setting

SETTINGS = (
    MethodSetting("residual_lr", "float", setting(
        1e-2, "Infusion: AdamW learning rate of the residual vectors (its code: 0.01, not scaled by the batch).",
        min=1e-6, max=1.0, step=1e-4, cli="--residual-lr"), after="gradient_accumulation"),
    MethodSetting("residual_target", "str", setting(
        "v", "Infusion: v = a residual on the value projection only (the paper: the original attention maps are "
        "kept); kv = also on the key (what its xformers code path trains).", choices=("v", "kv"),
        cli="--residual-target"), after="residual_lr"),
)
