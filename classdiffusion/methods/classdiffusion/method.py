"""ClassDiffusion (arXiv 2405.17532): a new token and the cross-attention K/V deltas (Custom
Diffusion's parameters), trained with masked ε-MSE plus the semantic preservation loss on the EOS
features of "a photo of a <sks> dog" vs "a photo of a dog" (and optionally prior preservation)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...model.kv import trained_names, zero_deltas
from ...model.losses import masked_mse, output_preservation_mse, prior_mse, semantic_preservation_loss
from ...model.precision import autocast
from ...model.text import replace_token
from .settings import SETTINGS
from ..base import Losses, MemoryNeeds, NewTokens, TrainingMethod


class ClassDiffusionMethod(TrainingMethod):
    name = "classdiffusion"
    label = "ClassDiffusion"
    settings = SETTINGS
    description = ("a new token + cross-attention K/V deltas with the semantic preservation loss (the default; "
                   "spl_weight 0 = Custom Diffusion)")

    @classmethod
    def weights_mode(cls, config) -> str:
        return config.train_mode  # kv (the paper) or crossattn

    @classmethod
    def memory_needs(cls, host, config, concepts: int) -> MemoryNeeds:
        """The deltas and token rows; the batch's prompts and the SPL phrases (twice with the
        official feature's own pass) go through the text encoder with gradient, and with output
        preservation the class prompts too, whose rows also join the UNet batch."""
        mode = cls.weights_mode(config)
        weights = host.cross_attention_weights(mode)
        output = config.preservation == "output"  # the class-prompt rows join the batch's UNet pass
        return MemoryNeeds(trained_values=sum(weights[n].numel() for n in trained_names(weights, mode))
                           + concepts * host.text_dim, kv_mode=mode,
                           text_rows=config.batch_size * (2 if output else 1)
                           + concepts * (2 if config.spl_feature == "official" else 1),
                           unet_rows=config.batch_size if output else 0)

    def setup(self) -> None:
        for spec in self.concepts:
            pieces = self.host.word_token_count(spec.class_word)
            if pieces != 1:
                self.context.warn(f"The class word {spec.class_word!r} is split into {pieces} tokens; it still "
                                  "works (SPL uses the EOS feature), but a single common word is better.")
        self.new_tokens = NewTokens(self.context)
        self.deltas = zero_deltas(self.context.base_weights, self.device)
        self.lr = self.config.effective_learning_rate(self.context.with_prior)
        #: output preservation's teacher: the base, computed by attaching zero deltas over the trained
        #: ones (0-dim: ``W + 0`` is W itself, and no memory the size of the deltas)
        self.base_deltas = ({name: torch.zeros((), device=self.device) for name in self.deltas}
                            if self.config.preservation == "output" else None)

    def setup_constants(self) -> None:
        """The class phrases' SPL features and contexts, computed once."""
        config, host = self.config, self.host
        with torch.no_grad(), autocast(self.device, config.mixed_precision):
            class_text = host.encode_text([spec.class_phrase() for spec in self.concepts], {})
        class_features = class_text.eos if config.spl_feature == "eos" else class_text.max_id
        self.class_features = [class_features[k:k + 1].float() for k in range(len(self.concepts))]
        self.spl_prompts = [spec.train_phrase() for spec in self.concepts]
        self.class_context = class_text.context.detach()
        self.spl_widths = class_text.widths  # two encoders (SDXL): where each one's features lie

    def param_groups(self) -> list[dict[str, Any]]:
        # The deltas' weight decay is applied to the full weight in before_optimizer_step(), as officially.
        return [{"params": list(self.deltas.values()), "weight_decay": 0.0, "lr": self.lr},
                {"params": [self.token_vectors], "lr": self.lr}]

    @property
    def learning_rate(self) -> float:
        return self.lr

    @property
    def tokens(self) -> list[str]:
        return self.new_tokens.tokens

    @property
    def token_vectors(self) -> torch.Tensor:
        """The trained token rows [N, D] (the official code's embedding rows)."""
        return self.new_tokens.vectors

    def token_dict(self) -> dict[str, torch.Tensor]:
        return self.new_tokens.trainable()

    def text_vectors(self) -> dict[str, torch.Tensor]:
        return self.new_tokens.detached()

    def phrase(self, concept: int, prefix: str, rng: torch.Generator) -> str:
        return self.concepts[concept].train_phrase(prefix)

    def attach(self) -> Callable[[], None]:
        return self.host.attach_deltas(self.deltas)

    def losses(self, batch) -> Losses:
        """ClassDiffusion's loss on one batch, as the official code reduces it:
        L = L_recon + λ·L_spl (+ w·L_prior with class images; the official code drops SPL then).
        ``preservation`` = output replaces λ·L_spl by w_out·L_out (output preservation); none drops it.
        SPL and the EOS cosine are reported either way."""
        config, n = self.config, len(batch.prompts)
        output = config.preservation == "output"
        class_prompts = [self._without_token(p) for p in batch.prompts] if output else []
        with autocast(self.device, config.mixed_precision):
            text, token_features = self._encode(batch.prompts, class_prompts)
            context = text.context[:n]
            if batch.prior_owners:
                context = torch.cat([context, self.class_context[batch.prior_owners].to(context.dtype)])
            if output:  # the class-prompt rows on the same noisy latents, in the same UNet pass
                context = torch.cat([context, text.context[len(text.context) - n:].to(context.dtype)])
                pred = self.host.predict_noise(torch.cat([batch.noisy, batch.noisy[:n]]),
                                               torch.cat([batch.timesteps, batch.timesteps[:n]]), context)
            else:
                pred = self.host.predict_noise(batch.noisy, batch.timesteps, context)
        recon = masked_mse(pred[:n], batch.noise[:n], batch.mask)
        token_features = [token_features[k:k + 1] for k in range(len(self.concepts))]
        spl, cosines = semantic_preservation_loss(token_features, self.class_features, widths=self.spl_widths,
                                                  combine=config.spl_encoders)
        total = recon + (config.spl_weight * spl if config.preservation == "spl" else 0.0)
        terms = {"recon": recon, "spl": spl}
        if batch.prior_owners:
            terms["prior"] = prior_mse(pred[n:n + len(batch.prior_owners)], batch.noise[n:n + len(batch.prior_owners)])
            total = total + config.prior_weight * terms["prior"]
        if output:
            teacher = self._base_prediction(batch, context[len(context) - n:])
            terms["output"] = output_preservation_mse(pred[len(pred) - n:], teacher)
            total = total + config.output_weight * terms["output"]
        return Losses(total=total, terms=terms, diagnostics={"cos": cosines})

    def _encode(self, prompts: list[str], class_prompts: list[str]):
        """(the text features whose contexts are the batch's prompts then ``class_prompts``, the SPL
        token features): one text pass, or the official SPL encoder's own pass beside it."""
        if self.config.spl_feature == "official":  # the official SPL encoder differs from the UNet's
            text = self.host.encode_text(prompts + class_prompts, self.token_dict())
            spl_text = self.host.encode_text(self.spl_prompts, self.token_dict(), tokens_without_position=True)
            return text, spl_text.max_id
        n = len(prompts)  # one text pass for the UNet contexts and the SPL phrases
        text = self.host.encode_text(prompts + self.spl_prompts + class_prompts, self.token_dict())
        token_features = text.eos[n:n + len(self.spl_prompts)]
        if class_prompts:
            keep = list(range(n)) + list(range(n + len(self.spl_prompts), len(text.context)))
            text.context = text.context[keep]
        else:
            text.context = text.context[:n]
        return text, token_features

    def _without_token(self, prompt: str) -> str:
        """The class prompt of a training row: its prompt with the concept's token taken out
        ("close up a photo of a <sks> dog" → "close up a photo of a dog")."""
        return replace_token(prompt, self.tokens)

    @torch.no_grad()
    def _base_prediction(self, batch, class_context: torch.Tensor) -> torch.Tensor:
        """The frozen base's ε on the class prompts and the batch's noisy latents: zero deltas
        attached over the trained ones for one forward (no gradient, no copy of the UNet)."""
        n = len(batch.prompts)
        detach = self.host.attach_deltas(self.base_deltas)
        try:
            with autocast(self.device, self.config.mixed_precision):
                return self.host.predict_noise(batch.noisy[:n], batch.timesteps[:n], class_context.detach())
        finally:
            detach()

    @torch.no_grad()
    def before_optimizer_step(self, keep: torch.Tensor) -> None:
        """AdamW's decoupled weight decay where the official code applies it: on the full trained
        weight W = base + Δ, towards zero (``W ← W·(1 − lr·wd)``, before the Adam update), i.e.
        ``Δ ← Δ − lr·wd·(base + Δ)``. Decaying Δ alone would pull towards the base instead.
        Skipped steps (``keep`` = 0) decay nothing, as AdamW skips them."""
        factor = self.lr * self.config.weight_decay
        if factor == 0.0:
            return
        rate = keep * -factor
        base = self.context.base_weights
        for name, delta in self.deltas.items():
            delta.addcmul_(base[name].to(delta.device, delta.dtype) + delta, rate)

    def drift(self) -> list[dict]:
        return self.new_tokens.drift()

    def load_state(self, checkpoint) -> None:
        self.copy_saved(self.deltas, checkpoint.deltas, "delta")
        self.new_tokens.load(checkpoint)

    def concept_fields(self) -> dict[str, Any]:
        return {"deltas": {name: p.detach().clone().cpu() for name, p in self.deltas.items()},
                **self.new_tokens.fields()}
