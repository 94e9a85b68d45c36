"""ClassDiffusion (arXiv 2405.17532): a new token and the cross-attention K/V deltas (Custom
Diffusion's parameters), trained with masked ε-MSE plus the semantic preservation loss on the EOS
features of "a photo of a <sks> dog" vs "a photo of a dog" (and optionally prior preservation)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..kv import zero_deltas
from ..losses import masked_mse, prior_mse, semantic_preservation_loss
from ..precision import autocast
from .base import Losses, TrainingMethod


class ClassDiffusionMethod(TrainingMethod):
    name = "classdiffusion"

    @classmethod
    def weights_mode(cls, config) -> str:
        return config.train_mode  # kv (the paper) or crossattn

    def setup(self) -> None:
        run = self.run
        self._init_tokens()
        self.deltas = zero_deltas(run.base_weights, self.device)
        self.lr = self.config.effective_learning_rate(run.with_prior)

    def _init_tokens(self) -> None:
        """Add the tokens; each starts from its initializer word's embedding."""
        self.host.add_tokens([spec.token for spec in self.concepts])
        vectors = []
        for spec in self.concepts:
            pieces = self.host.word_token_count(spec.class_word)
            if pieces != 1:
                self.run._warn(f"The class word {spec.class_word!r} is split into {pieces} tokens; it still "
                               "works (SPL uses the EOS feature), but a single common word is better.")
            init_word = spec.initializer_word
            init_pieces = len(self.host.initializer_ids(init_word))
            if init_pieces != 1:
                self.run._warn(f"The initializer {init_word!r} is {init_pieces} tokens; "
                               "the token starts from their mean embedding.")
            vectors.append(self.host.word_embedding(init_word).to(self.device, torch.float32))
        self.token_vectors = nn.Parameter(torch.stack(vectors))
        self.tokens = [spec.token for spec in self.concepts]

    def setup_constants(self) -> None:
        """The class phrases' SPL features and contexts, computed once."""
        config, host = self.config, self.host
        with torch.no_grad(), autocast(self.device, config.mixed_precision):
            class_text = host.encode_text([spec.class_phrase() for spec in self.concepts], {})
        class_features = class_text.eos if config.spl_feature == "eos" else class_text.max_id
        self.class_features = [class_features[k:k + 1].float() for k in range(len(self.concepts))]
        self.spl_prompts = [spec.train_phrase() for spec in self.concepts]
        self.class_context = class_text.context.detach()

    def param_groups(self) -> list[dict[str, Any]]:
        # The deltas' weight decay is applied to the full weight in before_optimizer_step(), as officially.
        return [{"params": list(self.deltas.values()), "weight_decay": 0.0, "lr": self.lr},
                {"params": [self.token_vectors], "lr": self.lr}]

    @property
    def learning_rate(self) -> float:
        return self.lr

    def token_dict(self) -> dict[str, torch.Tensor]:
        return {token: self.token_vectors[k] for k, token in enumerate(self.tokens)}

    def text_vectors(self) -> dict[str, torch.Tensor]:
        return {token: vector.detach() for token, vector in self.token_dict().items()}

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
        spl, cosines = semantic_preservation_loss(token_features, self.class_features)
        total = recon + config.spl_weight * spl
        prior = None
        if batch.prior_owners:
            prior = prior_mse(pred[n:], batch.noise[n:])
            total = total + config.prior_weight * prior
        return Losses(total=total, recon=recon, spl=spl, cosines=cosines, prior=prior)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """AdamW's decoupled weight decay where the official code applies it: on the full trained
        weight W = base + Δ, towards zero (``W ← W·(1 − lr·wd)``, before the Adam update), i.e.
        ``Δ ← Δ − lr·wd·(base + Δ)``. Decaying Δ alone would pull towards the base instead."""
        factor = self.lr * self.config.weight_decay
        if factor == 0.0:
            return
        if self.run.scaler.is_enabled():  # fp16: the scaler skips steps with inf/NaN gradients; so do we
            grads = [p.grad for p in self.deltas.values() if p.grad is not None]
            if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
                return
        base = self.run.base_weights
        for name, delta in self.deltas.items():
            delta.sub_(base[name].to(delta.device, delta.dtype) + delta, alpha=factor)

    def _encode_no_grad(self, prompts, vectors, **options):
        with torch.no_grad(), autocast(self.device, self.config.mixed_precision):
            return self.host.encode_text(prompts, vectors, **options)

    def drift(self) -> list[dict]:
        """Each token's semantic drift now (cosine to its class phrase, rank among the paper's
        adjective phrases); the phrases without tokens are encoded once."""
        from ..evaluation.drift import DriftProbe

        if not hasattr(self, "_probes"):
            self._probes = [DriftProbe(self._encode_no_grad, spec.class_word, prompt=spec.prompt)
                            for spec in self.concepts]
        return [probe.measure(token, self.token_vectors[k].detach()).to_dict()
                for k, (probe, token) in enumerate(zip(self._probes, self.tokens))]

    def load_state(self, checkpoint) -> None:
        self.copy_saved(self.deltas, checkpoint.deltas, "delta")
        with torch.no_grad():
            self.token_vectors.copy_(checkpoint.token_vectors)

    def concept_fields(self) -> dict[str, Any]:
        return {"deltas": {name: p.detach().clone().cpu() for name, p in self.deltas.items()},
                "token_vectors": self.token_vectors.detach().clone().cpu(), "tokens": list(self.tokens)}
