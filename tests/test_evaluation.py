"""Drift, overfitting and image metrics against values computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from classdiffusion.errors import InvalidInputError
from classdiffusion.evaluation.drift import ADJECTIVES, DriftProbe, concept_drift, project_2d, summary
from classdiffusion.evaluation.image_metrics import (
    ClipScorer, DinoScorer, clip_t, dreambooth_prompts, image_similarity, replace_token,
)
from classdiffusion.evaluation.overfitting import (
    ddim_timesteps, fisher_divergence, latent_fisher_divergence, wasserstein2_gaussian, wasserstein_metric,
)
from classdiffusion.run.plot import plot_drift_map
from classdiffusion.model.tiny import build_tiny_clip, build_tiny_dino


def test_paper_adjectives():
    assert len(ADJECTIVES) == len(set(ADJECTIVES)) == 71  # appendix D's list
    assert ADJECTIVES[0] == "beautiful" and ADJECTIVES[-1] == "energetic" and "old-fashioned" in ADJECTIVES


def _independent_rank(host, token, vector, class_word="dog"):
    phrases = [f"a {a} {class_word}" for a in ADJECTIVES]
    with torch.no_grad():
        eos = host.encode_text(phrases + [f"a {class_word}", f"a {token} {class_word}"], {token: vector}).eos.double()
    distances = 1 - F.cosine_similarity(eos, eos[-2:-1], dim=-1)
    adjective_d, token_d = distances[:-2], distances[-1]
    return 1 + sum(float(d) < float(token_d) for d in adjective_d), float(token_d)


def test_drift_rank_matches_an_independent_computation(host):
    host.add_tokens(["<sks>"])
    probe = DriftProbe(host.encode_text, "dog")
    for word in ("ktn", "cat", "toy"):
        vector = host.word_embedding(word)
        measure = probe.measure("<sks>", vector)
        rank, distance = _independent_rank(host, "<sks>", vector)
        assert (measure.rank, measure.total) == (rank, 72)
        assert measure.distance == pytest.approx(distance, abs=1e-6)
        with torch.no_grad():
            text = host.encode_text(["a photo of a <sks> dog", "a photo of a dog"], {"<sks>": vector}).eos
        assert measure.cosine == pytest.approx(float(F.cosine_similarity(text[0], text[1], dim=0)), abs=1e-6)


def test_a_token_equal_to_an_adjective_ranks_with_it(host):
    """'a <tok> dog' with <tok> = 'happy' is 'a happy dog': it ties with that phrase (ties favour the token)."""
    host.add_tokens(["<sks>"])
    probe = DriftProbe(host.encode_text, "dog")
    happy = probe.adjective_distances[ADJECTIVES.index("happy")]
    expected = 1 + int((probe.adjective_distances < happy).sum())
    assert probe.measure("<sks>", host.word_embedding("happy")).rank == expected


def test_pca_map_keeps_planar_geometry():
    torch.manual_seed(0)
    plane = torch.randn(20, 2, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(16, 2, dtype=torch.float64))[0]
    features = plane @ basis.T  # a 2-D linear subspace: normalised, the rows stay in it
    normalised = F.normalize(features, dim=-1)
    points = project_2d(features, "pca").double()
    assert torch.allclose(torch.cdist(points, points), torch.cdist(normalised, normalised), atol=1e-3)
    assert torch.equal(project_2d(features, "pca"), project_2d(features, "pca"))


def test_concept_drift_report_and_map(host):
    host.add_tokens(["<sks>"])
    initial = host.word_embedding("ktn")
    trained = initial + 0.5 * torch.randn(initial.shape, generator=torch.Generator().manual_seed(0))
    drift = concept_drift(host.encode_text, "<sks>", "dog", initial, trained)
    assert drift["before"]["rank"] == DriftProbe(host.encode_text, "dog").measure("<sks>", initial).rank
    assert set(drift["map_ranks"]) == {"before", "after"}
    for rank in drift["map_ranks"].values():
        assert 1 <= rank <= 72
    drift_map = drift["map"]
    # The 2-D rank is Algorithm 1 of appendix E: distance to the class point in the map.
    d = (drift_map.points - drift_map.class_point).norm(dim=-1)
    after = float((drift_map.token_points["after"] - drift_map.class_point).norm())
    assert drift["map_ranks"]["after"] == 1 + int((d < after).sum())
    assert "rank" in summary(drift)
    image = plot_drift_map(drift_map)
    assert image.size == (640, 560) and len(set(image.getdata())) > 3
    with pytest.raises(InvalidInputError, match="pca"):
        project_2d(torch.randn(5, 4), "umap")


# -- Infusion's metrics --------------------------------------------------------------------

def test_fisher_divergence_of_gaussians():
    samples = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = 0.7  # N(0,1) vs N(m,1): scores −x and −(x−m) → D_F = m² for any sample
    assert fisher_divergence(lambda x: -x, lambda x: -(x - m), samples) == pytest.approx(m * m, rel=1e-12)
    s2 = 4.0  # N(0,1) vs N(0,s²): E[(x − x/s²)²] = (1 − 1/s²)²
    assert fisher_divergence(lambda x: -x, lambda x: -x / s2, samples) == pytest.approx((1 - 1 / s2) ** 2, rel=0.02)
    assert fisher_divergence(lambda x: -x, lambda x: -x, samples) == 0.0


def test_latent_fisher_divergence_on_a_tiny_unet(host):
    base = host.cross_attention_weights("kv")
    zero = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in base.items()}
    report = latent_fisher_divergence(host, zero, ["a photo of a cat"], steps=3, latent_size=8)
    assert report.value == 0.0 and len(report.per_timestep) == 3
    gen = torch.Generator().manual_seed(0)
    deltas = {name: 0.05 * torch.randn(w.shape, generator=gen) for name, w in base.items()}
    report = latent_fisher_divergence(host, deltas, ["a photo of a cat", "a red car"], steps=3, latent_size=8,
                                      seeds=(0, 1))
    assert report.value > 0
    # The first timestep, recomputed independently: both models at the same initial noise.
    t = ddim_timesteps(1000, 3)[0]
    with torch.no_grad():
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        ctx = host.encode_text(["a photo of a cat"], {}).context
        tt = torch.tensor([t])
        e_base = host.predict_noise(x, tt, ctx)
        detach = host.attach_deltas(deltas)
        e_tuned = host.predict_noise(x, tt, ctx)
        detach()
    first = float(((e_base.double() - e_tuned.double()) ** 2).mean())
    assert report.per_timestep[t] * 4 == pytest.approx(  # mean over 2 prompts × 2 seeds includes this term
        first + _others(host, deltas, t), rel=1e-6)
    score = latent_fisher_divergence(host, deltas, ["a red car"], steps=3, latent_size=8, weighting="score")
    eps = latent_fisher_divergence(host, deltas, ["a red car"], steps=3, latent_size=8)
    alphas = host.alphas_cumprod().double()
    for t, value in eps.per_timestep.items():
        assert score.per_timestep[t] == pytest.approx(value / float(1 - alphas[t]), rel=1e-9)
    with pytest.raises(InvalidInputError, match="mentions"):
        latent_fisher_divergence(host, deltas, ["a <sks> dog"], tokens=["<sks>"], steps=2, latent_size=8)


def _others(host, deltas, t):
    total = 0.0
    with torch.no_grad():
        for prompt, seed in (("a photo of a cat", 1), ("a red car", 0), ("a red car", 1)):
            x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
            ctx = host.encode_text([prompt], {}).context
            tt = torch.tensor([t])
            e_base = host.predict_noise(x, tt, ctx)
            detach = host.attach_deltas(deltas)
            e_tuned = host.predict_noise(x, tt, ctx)
            detach()
            total += float(((e_base.double() - e_tuned.double()) ** 2).mean())
    return total


def test_wasserstein_closed_form_and_samples():
    d = 3
    eye = torch.eye(d, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert wasserstein2_gaussian(torch.zeros(d), eye, shift, eye) == pytest.approx(float(shift.norm()), rel=1e-9)
    # N(0, a²I) vs N(0, b²I): W₂ = √d·|a − b|
    assert wasserstein2_gaussian(torch.zeros(d), 4 * eye, torch.zeros(d), 9 * eye) == pytest.approx(math.sqrt(d), rel=1e-9)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20_000, d, generator=gen, dtype=torch.float64)
    b = torch.randn(20_000, d, generator=gen, dtype=torch.float64) + shift
    report = wasserstein_metric(a, b, "test")
    assert report.value == pytest.approx(float(shift.norm()), rel=0.02)
    assert wasserstein_metric(a, a).value == pytest.approx(0.0, abs=1e-6)
    narrow = wasserstein_metric(0.2 * a, a)
    assert narrow.to_dict()["spread_ratio"] == pytest.approx(0.2, rel=1e-9)
    with pytest.raises(InvalidInputError):
        wasserstein_metric(a[:1], a)


# -- image metrics -------------------------------------------------------------------------

def test_dreambooth_prompts_and_token_replacement():
    live, obj = dreambooth_prompts("<sks>", "dog"), dreambooth_prompts("<sks>", "backpack")
    assert len(live) == len(obj) == 25
    assert "a <sks> dog wearing a santa hat" in live and "a <sks> backpack floating in an ocean of milk" in obj
    assert dreambooth_prompts("<sks>", "dog", "object") == [p.replace("backpack", "dog") for p in obj]
    assert replace_token("a <sks> dog wearing a red hat", ["<sks>"]) == "a dog wearing a red hat"
    assert replace_token("a red <sks> dog", ["<sks>"]) == "a red dog"


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return ClipScorer(build_tiny_clip(root / "clip")), DinoScorer(build_tiny_dino(root / "dino"))


def _pictures(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_t_and_image_similarity_match_the_definitions(scorers):
    clip, dino = scorers
    images, refs = _pictures(3, 0), _pictures(2, 1)
    prompts = ["a <sks> dog in the snow", "a red <sks> dog", "a <sks> dog on the beach"]
    img = clip.image_features(images)
    txt = clip.text_features(["a dog in the snow", "a red dog", "a dog on the beach"])
    expected = float(np.mean([F.cosine_similarity(img[i], txt[i], dim=0) for i in range(3)]))
    assert clip_t(clip, images, prompts, ["<sks>"]) == pytest.approx(expected, abs=1e-6)
    for scorer in (clip, dino):
        g, r = scorer.image_features(images), scorer.image_features(refs)
        pairs = [float(F.cosine_similarity(g[i], r[j], dim=0)) for i in range(3) for j in range(2)]
        assert image_similarity(scorer, images, refs) == pytest.approx(float(np.mean(pairs)), abs=1e-6)
    assert image_similarity(dino, images, images) < 1.0 + 1e-9
    with pytest.raises(InvalidInputError, match="does not exist"):
        ClipScorer("/nonexistent/clip")
