"""Textual Inversion (Gal et al., arXiv 2208.01618), as diffusers' ``examples/textual_inversion``
trains it (the version both papers' tables ran): one new token row per concept, nothing else —
the UNet and the text encoder stay frozen and no hook is attached. Loss: ε-MSE. The concept is a
token only, so ComfyUI's ``embedding:NAME`` applies it with no K/V loader.

Where it follows diffusers' script: the prompt is a random ImageNet template around the token
*alone* ("a photo of a <sks>", no class word) when the spec keeps the default template (a custom
template gets the token alone in its ``{}``); AdamW's own decoupled decay on the row; no gradient
clipping; batch 1 × 4 accumulated micro-batches at its rate 5e-4 × 4 (its ``--scale_lr``
multiplies by the accumulation; ours by the batch only, hence 2e-3 unscaled); 3,000 steps; flips,
no rescaling. The token starts from the initializer word (diffusers: ``--initializer_token``,
e.g. the class word: ``--initializer class``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...model.losses import masked_mse
from ...model.precision import autocast
from ..base import Losses, MemoryNeeds, NewTokens, TrainingMethod

#: diffusers' ``imagenet_templates_small`` (examples/textual_inversion/textual_inversion.py).
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


class TextualInversionMethod(TrainingMethod):
    name = "textual-inversion"
    label = "Textual Inversion"
    prompt_templates = TEMPLATES
    description = ("only a new token's embedding (the papers' baseline); the concept is a ComfyUI embedding, "
                   "the UNet is untouched")
    recipe = {"steps": 3000, "batch_size": 1, "gradient_accumulation": 4, "learning_rate": 2e-3,
              "scale_lr": False, "augment": False, "max_grad_norm": 0.0}
    supports_class_images = False

    @classmethod
    def memory_needs(cls, host, config, concepts: int) -> MemoryNeeds:
        """The token rows; the batch's prompts go through the text encoder with gradient."""
        return MemoryNeeds(trained_values=concepts * host.text_dim, text_rows=config.batch_size)

    def setup(self) -> None:
        self.new_tokens = NewTokens(self.context)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.new_tokens.vectors], "lr": self.learning_rate,
                 "weight_decay": self.config.weight_decay}]

    @property
    def learning_rate(self) -> float:
        return self.config.effective_learning_rate(with_prior=False)

    def phrase(self, concept: int, prefix: str, rng: torch.Generator) -> str:
        spec = self.concepts[concept]
        template = spec.prompt
        if spec.has_default_prompt:
            template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=rng))]
        return prefix + template.format(spec.token)

    def attach(self) -> Callable[[], None]:
        return lambda: None  # nothing in the UNet changes

    def losses(self, batch) -> Losses:
        with autocast(self.device, self.config.mixed_precision):
            context = self.host.encode_text(batch.prompts, self.new_tokens.trainable()).context
            pred = self.host.predict_noise(batch.noisy, batch.timesteps, context)
        recon = masked_mse(pred, batch.noise, batch.mask)
        return Losses(total=recon, terms={"recon": recon})

    def text_vectors(self) -> dict[str, torch.Tensor]:
        return self.new_tokens.detached()

    def drift(self) -> list[dict]:
        return self.new_tokens.drift()

    def load_state(self, checkpoint) -> None:
        self.new_tokens.load(checkpoint)

    def concept_fields(self) -> dict[str, Any]:
        return {"deltas": {}, **self.new_tokens.fields()}
