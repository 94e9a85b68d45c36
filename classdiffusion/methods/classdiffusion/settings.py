"""ClassDiffusion's own settings: the semantic preservation loss (TrainConfig fields; the CLI flags
and the Train node's inputs are generated from these declarations)."""

from __future__ import annotations

from ...settings import MethodSetting, setting

#: Which text feature SPL compares: "eos" = the end-of-text token (the paper's definition);
#: "official" = transformers' pooler_output as the official code gets it under SD1.5's legacy
#: config, i.e. the position of the highest token id — the new token itself in "a photo of a <sks> dog".
SPL_FEATURES = ("eos", "official")
#: How SPL joins two text encoders' features (SDXL).
SPL_ENCODERS = ("mean", "concat")

SETTINGS = (
    MethodSetting("spl_weight", "float", setting(
        1.0, "λ of the semantic preservation loss. Higher keeps composition, lower keeps identity; 0 = Custom "
        "Diffusion.", min=0.0, max=100.0, step=0.01, cli="--spl-weight", node="after:learning_rate"),
        after="scale_lr"),
    MethodSetting("spl_feature", "str", setting(
        "eos", "Which text feature SPL compares. eos: the end-of-text token (the paper). official: what the official "
        "code computes (pooler_output under SD1.5's legacy config = the new token's own position, entered without "
        "its position embedding); only to reproduce its numbers.", choices=SPL_FEATURES, cli="--spl-feature",
        node="advanced-after:concept_3"), after="spl_weight"),
    MethodSetting("spl_encoders", "str", setting(
        "concat", "How SPL joins the text encoders of a two-encoder base (SDXL: CLIP-L and bigG). concat: 1 − cos of "
        "their EOS features side by side (bigG's wider features weigh more; measured to keep both encoders' drift "
        "lowest, docs/sdxl.md); mean: the mean of each encoder's 1 − cos. One-encoder bases (SD1.x): the same "
        "either way.", choices=SPL_ENCODERS, cli="--spl-encoders", node="advanced-after:memory"),
        after="spl_feature"),
)
