"""ClassDiffusion (arXiv 2405.17532): a new token and the cross-attention K/V deltas (Custom
Diffusion's parameters), trained with masked ε-MSE plus the semantic preservation loss on the EOS
features of "a photo of a <sks> dog" vs "a photo of a dog" (and optionally prior preservation)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...model.kv import trained_names, zero_deltas
from ...model.losses import masked_mse, prior_mse, semantic_preservation_loss
from ...model.precision import autocast
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
        official feature's own pass) go through the text encoder with gradient."""
        mode = cls.weights_mode(config)
        weights = host.cross_attention_weights(mode)
        return MemoryNeeds(trained_values=sum(weights[n].numel() for n in trained_names(weights, mode))
                           + concepts * host.text_dim, kv_mode=mode,
                           text_rows=config.batch_size + concepts * (2 if config.spl_feature == "official" else 1))

    def setup(self) -> None:
        for spec in self.concepts:
            pieces = self.host.word_token_count(spec.class_word)
            if pieces != 1:
                self.context.warn(f"The class word {spec.class_word!r} is split into {pieces} tokens; it still "
                                  "works (SPL uses the EOS feature), but a single common word is better.")
        self.new_tokens = NewTokens(self.context)
        self.deltas = zero_deltas(self.context.base_weights, self.device)
        self.lr = self.config.effective_learning_rate(self.context.with_prior)

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
        L = L_recon + λ·L_spl (+ w·L_prior with class images; the official code drops SPL then)."""
        config, n = self.config, len(batch.prompts)
        official_spl = config.spl_feature == "official"
        with autocast(self.device, config.mixed_precision):
            if official_spl:  # the official SPL encoder differs from the UNet's: its own pass
                text = self.host.encode_text(batch.prompts, self.token_dict())
                spl_text = self.host.encode_text(self.spl_prompts, self.token_dict(),
                                                 tokens_without_position=True)
                token_features = spl_text.max_id
            else:  # one text pass for the UNet contexts and the SPL phrases
                text = self.host.encode_text(batch.prompts + self.spl_prompts, self.token_dict())
                token_features = text.eos[n:]
            context = text.context[:n]
            if batch.prior_owners:
                context = torch.cat([context, self.class_context[batch.prior_owners].to(context.dtype)])
            pred = self.host.predict_noise(batch.noisy, batch.timesteps, context)
        recon = masked_mse(pred[:n], batch.noise[:n], batch.mask)
        token_features = [token_features[k:k + 1] for k in range(len(self.concepts))]
        spl, cosines = semantic_preservation_loss(token_features, self.class_features, widths=self.spl_widths,
                                                  combine=config.spl_encoders)
        total = recon + config.spl_weight * spl
        prior = None
        if batch.prior_owners:
            prior = prior_mse(pred[n:], batch.noise[n:])
            total = total + config.prior_weight * prior
        terms = {"recon": recon, "spl": spl, **({"prior": prior} if prior is not None else {})}
        return Losses(total=total, terms=terms, diagnostics={"cos": cosines})

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
