"""Infusion (arXiv 2404.14007, github zwl666666/infusion): one zero-initialised residual vector per
cross-attention value projection (optionally also the key), added to the projection's output only
at the class word's token positions; the text encoder and every weight stay frozen, no token is
added ("a photo of a cat" is the training prompt). Loss: ε-MSE weighted by a soft subject mask.

What its code computes, and how this differs: its UNet doubles the batch ("dual stream"); the
first half gets the residuals, the second half's cross-attention uses the *first* half's queries
with the original keys and values, and only the first half's output is returned. No operation
mixes rows of a batch (GroupNorm, attention and convolutions are per sample), so the returned
half equals a single UNet pass with the residuals — the discarded stream costs compute but
cannot change the loss or the gradient. We run the single pass; ``tests/test_infusion.py``
checks the equality on a tiny UNet by running their dual-stream computation next to ours.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...errors import InvalidInputError
from ...model.losses import subject_masked_mse
from ...model.prompt_record import word_positions
from .residual import (ResidualPositions, attach_residuals_with_hooks, residual_modules, residual_patch,
                       zero_residuals)
from ...model.precision import autocast
from .settings import SETTINGS
from ..base import Losses, MemoryNeeds, TrainingMethod

#: The prompt templates of Infusion's dataset (infusion/dataset.py), the class word in the {}.
INFUSION_TEMPLATES = (
    "a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}", "image of a {}",
    "image of the {}", "A photograph of {}", "A {} shown in a photo ", "A photo of {}", "A {}", "{}",
)


class InfusionMethod(TrainingMethod):
    name = "infusion"
    label = "Infusion"
    prompt_templates = INFUSION_TEMPLATES
    settings = SETTINGS
    description = ("one residual vector per attn2 value projection, added only where the class word stands; a ~50 KB "
                   "concept that leaves every other prompt bit-identical")
    #: Its recipe (arXiv 2404.14007 and configs/infusion_cat.yaml) where it differs from the fields': batch 4
    #: with 4-step accumulation, no rescaling augmentation (flips only), no gradient clipping (Lightning's
    #: default). Its residual learning rate is ``residual_lr``.
    recipe = {"batch_size": 4, "gradient_accumulation": 4, "augment": False, "max_grad_norm": 0.0}
    uses_subject_masks = True
    supports_class_images = False
    has_tokens = False
    #: ``residual.<diffusers module>`` float32 [out] in the file, listed in ``residual_layers``; format 4.
    tensor_prefix = "residual."
    tensor_layers_key = "residual_layers"
    tensor_format_version = 4
    records_prompts = True

    @classmethod
    def check_tensors(cls, file_name, tensors, listed, check_values) -> None:
        from ...errors import ConceptFileError

        if set(listed) != set(tensors):
            raise ConceptFileError(f"{file_name}: its residual vectors do not match its residual layer list "
                                   f"({len(tensors)} tensors, {len(listed)} listed); the file is damaged.")
        for name, tensor in tensors.items():
            if list(tensor.shape) != list(listed[name]) or tensor.ndim != 1:
                raise ConceptFileError(f"{file_name}: the residual of {name} has shape {list(tensor.shape)}, "
                                       f"listed {listed[name]}.")
            check_values(f"the residual of {name}", tensor)

    @classmethod
    def check_tensors_fit(cls, tensors, base_weights, what) -> None:
        from ...errors import BaseMismatchError

        for name, residual in tensors.items():
            weight = base_weights.get(f"{name}.weight")
            if weight is None or weight.shape[0] != residual.shape[0]:
                raise BaseMismatchError(
                    f"{name}: the concept's residual has {residual.shape[0]} values, {what} "
                    f"{'lacks the layer' if weight is None else f'outputs {weight.shape[0]}'}; the concept "
                    "belongs to another architecture."
                )

    @classmethod
    def sampling_patches(cls, concept, strength, positions_of) -> list:
        """Each residual added where each of the concept's class words stands (prompts without it,
        and the empty negative prompt, stay the base's)."""
        return [(name, residual_patch(residual.float(), positions_of(word), strength))
                for word in concept.class_words for name, residual in concept.method_tensors.items()]

    @classmethod
    def check_compressible(cls, concept) -> None:
        values = sum(r.numel() for r in concept.method_tensors.values())
        raise InvalidInputError(
            f"This is an Infusion concept: {values} residual values ({values * 4 / 1024:.0f} KB), one vector per "
            "layer, nothing a low-rank factorisation could shrink; it is already as small as it gets.")

    @classmethod
    def check_exportable(cls, concept, format_name: str) -> None:
        raise InvalidInputError(
            f"This is an Infusion concept (value residuals at the class word's positions): {format_name} holds "
            "whole-weight changes, which cannot express a change at some token positions only. Use the concept file "
            "directly (`classdiffusion generate`, or Load Concept K/V in ComfyUI).")

    @classmethod
    def memory_attach(cls, config, modules, weight_names, rows, device):
        """Zero residuals on the projections ``residual_target`` trains, at every position of a
        77-token context (what a step backpropagates through)."""
        names = residual_modules(weight_names, config.residual_target)
        positions = ResidualPositions()
        positions.mask = torch.zeros(rows, 77, dtype=torch.bool, device=device)
        return attach_residuals_with_hooks(
            {m: modules[m] for m in names},
            {m: torch.zeros(modules[m].out_features, device=device, requires_grad=True) for m in names}, positions)

    @classmethod
    def memory_needs(cls, host, config, concepts: int) -> MemoryNeeds:
        """One vector per changed projection; the text encoder runs without gradient."""
        weights = host.cross_attention_weights(cls.weights_mode(config))
        return MemoryNeeds(trained_values=sum(int(weights[f"{m}.weight"].shape[0])
                                              for m in residual_modules(list(weights), config.residual_target)))

    def setup(self) -> None:
        if len(self.concepts) != 1:
            raise InvalidInputError(
                "Infusion trains one concept per run (its concept word is the class word itself); train "
                "each concept separately and load the files together."
            )
        spec = self.concepts[0]
        self.word_ids = self.host.word_ids(spec.class_word)
        if not self.word_ids:
            raise InvalidInputError(f"The class word {spec.class_word!r} gives no tokens; use a real word.")
        if len(self.word_ids) > 1:
            self.context.warn(f"The class word {spec.class_word!r} is {len(self.word_ids)} tokens; the residuals go "
                           "on all of them. A single common word is better.")
        self.residuals = zero_residuals(self.context.base_weights, self.config.residual_target, self.device)
        self.positions = ResidualPositions()
        self._contexts: dict[str, torch.Tensor] = {}

    def param_groups(self) -> list[dict[str, Any]]:
        # AdamW's own decoupled decay on the vectors (their optimizer: torch's AdamW defaults).
        return [{"params": list(self.residuals.values()), "lr": self.config.residual_lr,
                 "weight_decay": self.config.weight_decay}]

    @property
    def learning_rate(self) -> float:
        return self.config.residual_lr

    def phrase(self, concept: int, prefix: str, rng: torch.Generator) -> str:
        spec = self.concepts[concept]
        if not spec.has_default_prompt:  # the user's own template
            return prefix + spec.class_phrase()
        template = INFUSION_TEMPLATES[int(torch.randint(len(INFUSION_TEMPLATES), (1,), generator=rng))]
        return prefix + template.format(spec.class_word)

    def attach(self) -> Callable[[], None]:
        modules = self.host.delta_modules([f"{name}.weight" for name in self.residuals])
        return attach_residuals_with_hooks(modules, self.residuals, self.positions)

    def _context(self, prompts: list[str]) -> torch.Tensor:
        """The frozen text encoder's features, computed once per distinct prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._contexts]
        if missing:
            with torch.no_grad(), autocast(self.device, self.config.mixed_precision):
                context = self.host.encode_text(missing, {}).context
            for prompt, row in zip(missing, context):
                self._contexts[prompt] = row
        return torch.stack([self._contexts[p] for p in prompts])

    def losses(self, batch) -> Losses:
        mask = word_positions(self.host.token_ids(batch.prompts), self.word_ids).to(self.device)
        if not bool(mask.any(dim=1).all()):
            raise InvalidInputError(f"A training prompt lacks the class word {self.concepts[0].class_word!r}: "
                                    "the prompt template must contain {}.")
        self.positions.mask = mask
        with autocast(self.device, self.config.mixed_precision):
            pred = self.host.predict_noise(batch.noisy, batch.timesteps, self._context(batch.prompts))
        recon = subject_masked_mse(pred, batch.noise, batch.mask)
        return Losses(total=recon, terms={"recon": recon})

    def validation_contexts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler batches rows its own way, so during validation the residual hooks find the
        class word by content (as at inference), not from a training batch's positions."""
        from ...model.prompt_record import ConditionRegistry, RegistryPositions

        context, uncond = super().validation_contexts(prompts)
        registry = ConditionRegistry()
        ids = self.host.token_ids(prompts)
        registry.register(context[:, :ids.shape[1]], ids)  # SDXL's context has the pooled row after the tokens
        self.positions.mask = None
        self.positions.lookup = RegistryPositions(registry, self.word_ids)
        return context, uncond

    def end_validation(self) -> None:
        self.positions.lookup = None

    def load_state(self, checkpoint) -> None:
        self.copy_saved(self.residuals, checkpoint.method_tensors, "residual")

    def concept_fields(self) -> dict[str, Any]:
        return {"deltas": {}, "token_vectors": torch.zeros(0, self.host.text_dim), "tokens": [],
                "method_tensors": {name: p.detach().clone().cpu() for name, p in self.residuals.items()}}
