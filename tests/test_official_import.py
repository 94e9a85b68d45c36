"""Importing what the official ClassDiffusion script really writes.

Its weights come out of AdamW with decoupled weight decay on the *full* weight, so some trained
values (weights moving towards or across zero) are not reachable as float32(base + delta) for any
float32 delta. Here such weights are produced the way the official optimizer produces them, at
SD1.5's cross-attention shapes, written in both of the official script's serialization settings,
imported, and required to apply and export bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from classdiffusion.concept import load_concept
from classdiffusion.concept.interop import (
    WEIGHTS_BIN, WEIGHTS_SAFE, exact_delta, export_custom_diffusion, import_custom_diffusion, is_safetensors,
    processor_key,
)
from classdiffusion.model.kv import bake_deltas


def sd15_kv_shapes() -> dict[str, tuple[int, int]]:
    """The 32 attn2 K/V weights of SD1.5 by diffusers name (16 cross-attentions, context 768)."""
    blocks = [(f"down_blocks.{b}.attentions.{a}", c) for b, c in ((0, 320), (1, 640), (2, 1280)) for a in range(2)]
    blocks += [("mid_block.attentions.0", 1280)]
    blocks += [(f"up_blocks.{b}.attentions.{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in range(3)]
    return {f"{block}.transformer_blocks.0.attn2.to_{kind}.weight": (c, 768)
            for block, c in blocks for kind in ("k", "v")}


class Weights(nn.Module):
    """A module whose parameters carry the given dotted names (what bake_deltas patches)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))


@pytest.fixture(scope="module")
def official_weights():
    """Base weights and what the official optimizer makes of them: AdamW (lr 2e-5, weight decay
    1e-2 on the full weight, as --scale_lr at batch 2 gives), 100 steps of random gradients."""
    gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=gen) * 0.03 for name, shape in sd15_kv_shapes().items()}
    trained = {name: nn.Parameter(w.clone()) for name, w in base.items()}
    optimizer = torch.optim.AdamW(list(trained.values()), lr=2e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    for _ in range(100):
        for param in trained.values():
            param.grad = torch.randn(param.shape, generator=gen)
        optimizer.step()
    return base, {name: p.detach().clone() for name, p in trained.items()}


def test_an_unreachable_weight_is_kept_exactly():
    base, trained = torch.tensor([1.0, 0.5]), torch.tensor([1e-10, 0.25])
    delta, index, values = exact_delta(trained, base)
    assert index.tolist() == [0] and values.tolist() == [pytest.approx(1e-10, rel=1e-6)]
    assert (base + delta)[1] == trained[1]
    module = Weights({"w": base})
    bake_deltas(module, {"w": delta}, exact={"w": (index, values)})
    assert torch.equal(module.w, trained)


def test_exact_delta_on_official_optimizer_weights(official_weights):
    base, trained = official_weights
    unreachable = total = 0
    for name in base:
        delta, index, values = exact_delta(trained[name], base[name])
        reached = base[name] + delta
        reached.view(-1)[index] = values
        assert torch.equal(reached, trained[name]), name
        unreachable += index.numel()
        total += delta.numel()
    assert total == 19_169_280  # SD1.5: 19.17 M K/V parameters
    assert unreachable > 0, "the simulation must produce weights that base + delta cannot reach"


def _official_folder(folder, trained, vector, safe: bool):
    """What train_class_diffusion.py saves: processor-keyed K/V weights and the <new1> embedding;
    with safe serialization (its default) the embedding's .bin holds safetensors content."""
    folder.mkdir()
    state = {processor_key(name): w for name, w in trained.items()}
    if safe:
        save_file(state, str(folder / WEIGHTS_SAFE))
        save_file({"<new1>": vector}, str(folder / "<new1>.bin"))
    else:
        torch.save(state, folder / WEIGHTS_BIN)
        torch.save({"<new1>": vector}, folder / "<new1>.bin")
    return folder


@pytest.mark.parametrize("safe", [True, False], ids=["safe_serialization", "no_safe_serialization"])
def test_official_output_imports_applies_and_exports_bit_exactly(official_weights, tmp_path, safe):
    base, trained = official_weights
    vector = torch.randn(768, generator=torch.Generator().manual_seed(3))
    folder = _official_folder(tmp_path / "official", trained, vector, safe)
    assert is_safetensors(folder / "<new1>.bin") == safe

    concept = import_custom_diffusion(folder, base, ["dog"])
    assert concept.meta.extra["exact_values"] > 0
    path = concept.save(tmp_path / "imported.safetensors")
    loaded = load_concept(path)
    size_mib = path.stat().st_size / 2**20
    assert size_mib < 77 * 1.2, f"{size_mib:.1f} MiB"  # dense deltas (73 MiB) + a few exact values

    unet = Weights(base)
    patch = bake_deltas(unet, loaded.deltas, exact=loaded.exact)
    params = dict(unet.named_parameters())
    for name, weight in trained.items():
        assert torch.equal(params[name], weight), name
    patch.remove()
    for name, weight in base.items():
        assert torch.equal(params[name], weight), name  # the base comes back bit for bit
    assert torch.equal(loaded.token_vectors[0], vector)

    out = tmp_path / "exported"
    export_custom_diffusion(loaded, base, out)
    exported = load_file(str(out / WEIGHTS_SAFE))
    for name, weight in trained.items():
        assert torch.equal(exported[processor_key(name)], weight), name


def test_half_strength_moves_exact_values_halfway(official_weights):
    base, trained = official_weights
    name = next(n for n in base if exact_delta(trained[n], base[n])[1].numel())
    delta, index, values = exact_delta(trained[name], base[name])
    unet = Weights({name: base[name]})
    bake_deltas(unet, {name: delta}, 0.5, exact={name: (index, values)})
    got = dict(unet.named_parameters())[name].reshape(-1)[index].double()
    expected = (base[name].reshape(-1)[index].double() + values.double()) / 2
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)


def test_a_base_whose_keys_do_not_fit_is_refused(tiny_base, tmp_path):
    """A text encoder saved without the key prefix the installed transformers expects (or with
    any other foreign layout) would load as a random encoder with only a warning: refuse it."""
    import shutil

    from safetensors import safe_open

    from classdiffusion.errors import BaseModelError
    from classdiffusion.hosts.diffusers_host import load_components

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    path = broken / "text_encoder" / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert all(key.startswith("text_model.") for key in tensors)  # written in the portable layout
    save_file({"encoder_v2." + key.removeprefix("text_model."): t for key, t in tensors.items()}, str(path))
    with pytest.raises(BaseModelError, match=r"text_encoder: the weights do not fit the CLIPTextModel.*missing"):
        load_components(broken)
    load_components(tiny_base)  # the untouched folder loads
