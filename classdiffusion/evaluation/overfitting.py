"""Overfitting metrics of Infusion (Zeng et al., arXiv 2404.14007, §3 "concept overfitting").

Infusion splits overfitting in two and gives each a metric:

* **concept-agnostic overfitting** — the tuned model forgets what it knew about things the
  concept is not: measured by a *Latent Fisher divergence* between the base and the tuned model's
  distributions of latents for prompts that never mention the concept;
* **concept-specific overfitting** — the concept is locked to the few training modalities
  (backgrounds, layouts, styles): measured by a *2-Wasserstein distance* between the distribution
  of the tuned model's generations of the concept and the base model's generations of its class.

The Fisher divergence of densities p and q is D_F(p‖q) = E_{x∼p} ‖∇ₓlog p(x) − ∇ₓlog q(x)‖².
A diffusion model gives the score of its noised latent distribution at every noise level,
∇ log p_t(x_t | c) = −ε(x_t, t, c)/σ_t with σ_t = √(1−ᾱ_t), so in latent space

    LFD_t = E_{x_t ∼ p_t^base(·|c)} ‖ε_base(x_t, t, c) − ε_tuned(x_t, t, c)‖² / σ_t².

Choices the paper's definition leaves to the implementation, stated here:

* x_t ∼ p_t^base is drawn along the base model's own deterministic DDIM (probability-flow)
  trajectories from Gaussian noise, which have the base model's marginals; both models are
  evaluated at the same x_t.
* The conditional score is used (no classifier-free guidance): guidance is a sampling device,
  not the model's distribution.
* ``weighting="eps"`` (default) reports E‖ε_base − ε_tuned‖² (= σ_t²·LFD_t, the denoising score
  matching weighting; finite at t→0), ``weighting="score"`` the unweighted score difference. Both
  are averaged over latent elements (so resolution does not change the scale), the DDIM
  timesteps, prompts and seeds.
* The Wasserstein metric uses the closed form between Gaussians fitted to image features
  (as FID does): W₂² = ‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁^{½} Σ₂ Σ₁^{½})^{½}). Features are DINO or CLIP
  image embeddings when such a model is given, else the generated latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..model.sampling import ddim_timesteps  # noqa: F401  (used here and re-exported)
from ..errors import InvalidInputError
from ..hosts.base import TrainingHost

Score = Callable[[torch.Tensor], torch.Tensor]


def fisher_divergence(score_p: Score, score_q: Score, samples: torch.Tensor) -> float:
    """Monte-Carlo Fisher divergence E_{x∼p} ‖s_p(x) − s_q(x)‖² from samples of p ([N, ...])."""
    diff = (score_p(samples) - score_q(samples)).double().flatten(1)
    return float((diff ** 2).sum(1).mean())


@dataclass
class FisherReport:
    """Latent Fisher divergence of a tuned model from its base on prompts without the concept."""

    value: float  #: mean over prompts, seeds and timesteps
    weighting: str
    per_prompt: dict[str, float] = field(default_factory=dict)
    per_timestep: dict[int, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value, "weighting": self.weighting, "per_prompt": self.per_prompt,
                "per_timestep": {str(k): v for k, v in self.per_timestep.items()}, "settings": self.settings}


class _FixedPositions:
    """A word's positions in the one prompt being scored (known, so nothing is looked up)."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask

    def for_context(self, context: torch.Tensor) -> torch.Tensor | None:
        return self.mask


@torch.no_grad()
def _attach_method_tensors(host, concepts, prompt: str) -> list:
    """The concepts' own tensors (Infusion's residuals) hooked in at their words' positions in ``prompt``."""
    from ..methods import method_class
    from ..model.prompt_record import patch_outputs, word_positions

    detachers = []
    ids = host.token_ids([prompt]) if concepts else None

    def positions_of(word: str) -> _FixedPositions:
        mask = word_positions(ids, host.word_ids(word)).to(host.device)
        return _FixedPositions(mask if bool(mask.any()) else None)

    for concept in concepts:
        patches = method_class(concept.method).sampling_patches(concept, 1.0, positions_of)
        if patches:
            modules = host.delta_modules([f"{name}.weight" for name, _ in patches])
            detachers.append(patch_outputs(modules, patches))
    return detachers


def latent_fisher_divergence(
    host: TrainingHost,
    deltas: Mapping[str, torch.Tensor],
    prompts: Sequence[str],
    *,
    tokens: Sequence[str] = (),
    steps: int = 20,
    seeds: Sequence[int] = (0,),
    latent_size: int = 64,
    weighting: str = "eps",
    concepts: Sequence = (),
    progress: Callable[[], None] | None = None,
) -> FisherReport:
    """Infusion's concept-agnostic overfitting metric (see the module docstring for the choices).

    ``deltas`` are the concept's K/V deltas (what makes the tuned model); ``prompts`` must not
    mention the concept's ``tokens``. ``latent_size`` is the latent side (64 = 512 px for SD1.5).
    ``concepts``: the tuned model's concepts whose methods train tensors of their own (Infusion's
    residuals, attached at their class word's positions in each prompt: a prompt without the word
    gives exactly 0 for them); the others' deltas are ``deltas``.
    ``progress`` is called after each (prompt, seed, timestep), len(prompts)·len(seeds)·steps times.
    """
    if weighting not in ("eps", "score"):
        raise InvalidInputError("weighting must be 'eps' or 'score'.")
    if not prompts:
        raise InvalidInputError("Give at least one prompt that does not mention the concept.")
    for prompt in prompts:
        for token in tokens:
            if token in prompt:
                raise InvalidInputError(
                    f"The prompt {prompt!r} mentions the concept token {token}; the concept-agnostic "
                    "metric needs prompts about other things."
                )
    device = host.device
    deltas = {name: d.to(device, torch.float32) for name, d in deltas.items()}
    alphas = host.alphas_cumprod().to(device, torch.float64)
    timesteps = ddim_timesteps(host.num_train_timesteps, steps)
    per_prompt: dict[str, float] = {}
    per_t_sum = {t: 0.0 for t in timesteps}
    for prompt in prompts:
        context = host.encode_text([prompt], {}).context
        values = []
        for seed in seeds:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            x = torch.randn((1, 4, latent_size, latent_size), generator=gen).to(device, torch.float32)
            attach = lambda: [host.attach_deltas(deltas)] + _attach_method_tensors(host, concepts, prompt)  # noqa: E731
            for t, value in _base_trajectory(host, x, context, timesteps, alphas, attach, weighting, progress):
                values.append(value)
                per_t_sum[t] += value
        per_prompt[prompt] = sum(values) / len(values)
    count = len(prompts) * len(seeds)
    per_timestep = {t: s / count for t, s in per_t_sum.items()}
    return FisherReport(
        value=sum(per_prompt.values()) / len(per_prompt), weighting=weighting, per_prompt=per_prompt,
        per_timestep=per_timestep,
        settings={"steps": steps, "seeds": list(seeds), "latent_size": latent_size, "guidance": None,
                  "sampler": "DDIM eta=0 (base model)"},
    )


def _base_trajectory(host, x, context, timesteps, alphas, attach, weighting: str, progress):
    """(t, squared ε difference of the tuned and the base model) along one DDIM (η = 0) trajectory
    of the *base* model from ``x`` (so x_t stays on p_t^base); ``attach()`` attaches the tuned
    model's tensors and returns their detach functions."""
    device = x.device
    for index, t in enumerate(timesteps):
        t_batch = torch.full((1,), t, device=device, dtype=torch.long)
        eps_base = host.predict_noise(x, t_batch, context).double()
        detachers = attach()
        try:
            eps_tuned = host.predict_noise(x, t_batch, context).double()
        finally:
            for detach in detachers:
                detach()
        value = float(((eps_base - eps_tuned) ** 2).mean())
        if weighting == "score":
            value /= float(1.0 - alphas[t])
        if progress is not None:
            progress()
        yield t, value
        a_t = alphas[t]
        a_prev = alphas[timesteps[index + 1]] if index + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x.double() - (1 - a_t).sqrt() * eps_base) / a_t.sqrt()
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_base).float()


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigendecomposition, float64)."""
    sym = (matrix + matrix.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of [N, D] features; N ≥ 2."""
    x = features.double().flatten(1)
    if x.shape[0] < 2:
        raise InvalidInputError("The Wasserstein metric needs at least 2 samples per distribution.")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def wasserstein2_gaussian(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2) (closed form)."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    root1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(root1 @ cov2 @ root1)
    squared = float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * torch.trace(cross))
    return max(squared, 0.0) ** 0.5


@dataclass
class WassersteinReport:
    """Infusion's concept-specific overfitting metric plus how spread each set is."""

    value: float  #: W₂ between the tuned model's concept generations and the base model's class generations
    spread_tuned: float  #: √Tr(Σ) of the tuned generations' features (smaller = narrower)
    spread_base: float
    features: str
    samples: tuple[int, int]

    def to_dict(self) -> dict:
        return {"value": self.value, "spread_tuned": self.spread_tuned, "spread_base": self.spread_base,
                "spread_ratio": self.spread_tuned / self.spread_base if self.spread_base > 0 else None,
                "features": self.features, "samples": list(self.samples)}


def wasserstein_metric(tuned_features: torch.Tensor, base_features: torch.Tensor, features: str = "") -> WassersteinReport:
    """W₂ between Gaussians fitted to the two feature sets ([N, D] each)."""
    mu_t, cov_t = gaussian_fit(tuned_features)
    mu_b, cov_b = gaussian_fit(base_features)
    return WassersteinReport(
        value=wasserstein2_gaussian(mu_t, cov_t, mu_b, cov_b),
        spread_tuned=float(torch.trace(cov_t)) ** 0.5, spread_base=float(torch.trace(cov_b)) ** 0.5,
        features=features, samples=(tuned_features.shape[0], base_features.shape[0]),
    )
