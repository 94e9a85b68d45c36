"""TEA (test-time embedding adjustment) against an independent per-vector formulation of its
source (tuananhbui89/Embedding-Adjustment, ``adjust_norm_and_slerp``), and end to end in
``classdiffusion generate --tea``."""

from __future__ import annotations

import math

import pytest
import torch

from classdiffusion.model.embedding_adjustment import adjust_towards_class


def _one_vector(v: torch.Tensor, target: torch.Tensor, rho: float, alpha: float) -> torch.Tensor:
    """The source's recipe for one position, in float64 with plain math: both vectors rescaled to
    the blended norm, then slerp by the angle between them."""
    v, target = v.double(), target.double()
    norm = (1 - alpha) * v.norm() + alpha * target.norm()
    a, b = norm * v / v.norm(), norm * target / target.norm()
    cos = max(-1.0, min(1.0, float(torch.dot(a / a.norm(), b / b.norm()))))
    theta = math.acos(cos)
    if abs(math.sin(theta)) < 1e-6:
        return (1 - rho) * a + rho * b
    return (math.sin((1 - rho) * theta) * a + math.sin(rho * theta) * b) / math.sin(theta)


@pytest.mark.parametrize("rho,alpha", [(0.2, 0.5), (0.7, 0.0), (0.0, 1.0), (1.0, 0.3)])
def test_tea_equals_the_per_vector_formula(rho, alpha):
    torch.manual_seed(0)
    prompt, target = torch.randn(2, 5, 16), torch.randn(2, 5, 16) * 3
    target[0, 1] = prompt[0, 1] * 2.0  # a parallel position: the linear fallback
    ours = adjust_towards_class(prompt, target, rho, alpha)
    for b in range(2):
        for t in range(5):
            expected = _one_vector(prompt[b, t], target[b, t], rho, alpha)
            assert torch.allclose(ours[b, t].double(), expected, atol=1e-4), (b, t)


def test_tea_ends():
    """rho = 0, alpha = 0: the prompt as it is; rho = 1, alpha = 1: the class prompt's embedding."""
    torch.manual_seed(1)
    prompt, target = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    assert torch.allclose(adjust_towards_class(prompt, target, 0.0, 0.0), prompt, atol=1e-5)
    assert torch.allclose(adjust_towards_class(prompt, target, 1.0, 1.0), target, atol=1e-5)
    with pytest.raises(ValueError, match="rho"):
        adjust_towards_class(prompt, target, 1.5)


def test_generate_with_tea_changes_only_what_the_token_touches(tiny_base, tmp_path, capsys):
    """--tea 0 is plain sampling; --tea 0.5 changes the pictures of a prompt with the token, and
    leaves a prompt without any token exactly as it was (its class prompt is itself)."""
    from PIL import Image

    from classdiffusion.cli import main
    from classdiffusion.config import TrainConfig
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.run.train import train
    from helpers import dog, make_images

    host = load_host(tiny_base, device="cpu")
    concept = tmp_path / "c.safetensors"
    train(host, [dog()], TrainConfig(steps=2, resolution=64, batch_size=1), images=[make_images(2)], out=concept)

    def sample(prompt: str, tea: str, name: str) -> torch.Tensor:
        args = ["generate", "--base", str(tiny_base), "--concept", str(concept), "--prompt", prompt,
                "--out", str(tmp_path / name), "--steps", "2", "--size", "64", "--tea", tea, "-q"]
        assert main(args) == 0
        path = capsys.readouterr().out.split()[0]
        return torch.tensor(list(Image.open(path).getdata()), dtype=torch.float32)

    plain = sample("a photo of a <sks> dog", "0", "plain")
    adjusted = sample("a photo of a <sks> dog", "0.5", "tea")
    assert not torch.equal(plain, adjusted)
    assert torch.equal(sample("a photo of a cat", "0", "cat0"), sample("a photo of a cat", "0.5", "cat5"))
    with pytest.raises(SystemExit):
        main(["generate", "--base", str(tiny_base), "--prompt", "x", "--out", str(tmp_path / "x"), "--tea", "2"])
