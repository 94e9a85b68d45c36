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
#: What keeps the concept composable: spl = the semantic preservation loss (the paper); output =
#: output preservation, the base model as teacher on the class prompt (kohya-ss/sd-scripts #1710's
#: Differential Output Preservation, OneTrainer #505's prior model preservation, without class
#: images); none = neither (Custom Diffusion).
PRESERVATIONS = ("spl", "output", "none")

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
    MethodSetting("preservation", "str", setting(
        "spl", "What keeps the concept composable. spl: the semantic preservation loss, λ = spl_weight (the paper). "
        "output: output preservation — on the class prompt (the training prompt without the token) the tuned model "
        "is pulled towards the frozen base's prediction on the same noisy latents, weight output_weight; no class "
        "images, one extra frozen UNet forward per step (kohya-ss's Differential Output Preservation). none: "
        "neither (Custom Diffusion).", choices=PRESERVATIONS, cli="--preservation",
        node="advanced-after:spl_encoders"), after="spl_encoders"),
    MethodSetting("output_weight", "float", setting(
        10.0, "Weight of output preservation (preservation = output): kohya-ss recommends 10–1000 for its per-"
        "element MSE; 10 is the low end.", min=0.0, max=10000.0, step=0.1, cli="--output-weight",
        node="advanced-after:preservation"), after="preservation"),
)
