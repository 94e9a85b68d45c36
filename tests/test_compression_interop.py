"""Compact concepts (truncated SVD) and diffusers' Custom Diffusion format, on the tiny base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from classdiffusion.concept.apply import apply_concept
from classdiffusion.cli import main
from classdiffusion.concept import Concept, compress_concept, load_concept
from classdiffusion.errors import ConceptFileError, InvalidInputError
from classdiffusion.hosts.diffusers_host import cross_attention_weights, load_components
from classdiffusion.concept.interop import (
    WEIGHTS_BIN, WEIGHTS_SAFE, canonical_name, exact_delta, export_custom_diffusion, import_custom_diffusion,
)
from classdiffusion.model.kv import base_fingerprint, low_rank_factors


def test_low_rank_factors_rank_and_energy():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(40, 3, generator=gen) @ torch.randn(3, 24, generator=gen)
    up, down = low_rank_factors(exact, rank=3)
    assert up.shape == (40, 3) and down.shape == (3, 24)
    assert torch.allclose(up @ down, exact, atol=1e-5)
    # singular values 3, 2, 1: energies 9/14, 13/14, 1 → 0.9 needs two of them
    u = torch.linalg.qr(torch.randn(10, 3, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0]
    known = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v.T
    assert low_rank_factors(known, energy=0.9)[0].shape[1] == 2
    assert low_rank_factors(known, energy=0.6)[0].shape[1] == 1
    assert low_rank_factors(known, energy=1.0)[0].shape[1] == 3
    with pytest.raises(ValueError):
        low_rank_factors(known, rank=2, energy=0.5)


def _concept(base_weights, rank=2, noise=1e-3, seed=0) -> Concept:
    """Deltas of low rank plus a little noise, like trained Custom Diffusion updates."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, w in base_weights.items():
        out_dim, in_dim = w.shape
        low = torch.randn(out_dim, rank, generator=gen) @ torch.randn(rank, in_dim, generator=gen) * 0.02
        deltas[name] = low + noise * torch.randn(out_dim, in_dim, generator=gen)
    return Concept(deltas=deltas, token_vectors=torch.randn(1, 768, generator=gen), tokens=["<sks>"],
                   class_words=["dog"], meta={"train_mode": "kv", "base_fingerprint": base_fingerprint(base_weights)})


def test_compressed_concept_is_smaller_reloads_exactly_and_keeps_outputs(tiny_base, tmp_path):
    *_, unet, _, _ = load_components(tiny_base)
    base = cross_attention_weights(unet, "kv")
    concept = _concept(base)
    full = concept.save(tmp_path / "full.safetensors")
    compressed, stats = compress_concept(concept, energy=0.99)
    assert max(s["relative_error"] for s in stats.values()) < 0.1
    small = compressed.save(tmp_path / "small.safetensors")
    assert small.stat().st_size < 0.5 * full.stat().st_size
    assert set(load_file(str(small))) >= {"kv_up." + next(iter(base)), "kv_down." + next(iter(base))}
    loaded = load_concept(small)
    for name, (up, down) in compressed.factors.items():  # factors bit-exact, deltas = up @ down
        assert torch.equal(loaded.factors[name][0], up) and torch.equal(loaded.factors[name][1], down)
        assert torch.equal(loaded.deltas[name], up @ down)
        err = (loaded.deltas[name] - concept.deltas[name]).norm() / concept.deltas[name].norm()
        assert float(err) == pytest.approx(stats[name]["relative_error"], rel=1e-3, abs=1e-6)
    # The effect on the UNet's output for a fixed input: far smaller than the concept's own effect.
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 768, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        out_base = unet(x, t, encoder_hidden_states=ctx).sample
        handle = apply_concept(unet, concept)
        out_full = unet(x, t, encoder_hidden_states=ctx).sample
        handle.remove()
        handle = apply_concept(unet, loaded)
        out_small = unet(x, t, encoder_hidden_states=ctx).sample
        handle.remove()
    assert float((out_small - out_full).norm()) < 0.1 * float((out_full - out_base).norm())


def test_compress_cli_and_damaged_factors(tiny_base, tmp_path, capsys):
    *_, unet, _, _ = load_components(tiny_base)
    path = _concept(cross_attention_weights(unet, "kv")).save(tmp_path / "c.safetensors")
    assert main(["compress", str(path), str(tmp_path / "r2.safetensors"), "--rank", "2"]) == 0
    assert "MiB" in capsys.readouterr().out
    assert all(s["rank"] == 2 for s in load_concept(tmp_path / "r2.safetensors").meta.compression["layers"].values())
    # Rank 64 factors of a [32, 768] delta would be larger than the delta: it stays dense.
    assert main(["compress", str(path), str(tmp_path / "r64.safetensors"), "--rank", "64"]) == 0
    assert not any(k.startswith("kv_up.") for k in load_file(str(tmp_path / "r64.safetensors")))
    assert torch.equal(load_concept(tmp_path / "r64.safetensors").deltas[next(iter(load_concept(path).deltas))],
                       load_concept(path).deltas[next(iter(load_concept(path).deltas))])
    # A factor pair that does not fit is refused with a clear message.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "r2.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    key = next(k for k in tensors if k.startswith("kv_down."))
    tensors[key] = tensors[key][:1]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata)
    with pytest.raises(ConceptFileError, match="do not fit"):
        load_concept(tmp_path / "bad.safetensors")


# -- diffusers' Custom Diffusion format ----------------------------------------------------

@pytest.fixture
def custom_diffusion_output(tiny_base, tmp_path):
    """A Custom Diffusion output folder written by diffusers itself (save_attn_procs + embedding)."""
    from safetensors.torch import save_file

    *_, unet, _, _ = load_components(tiny_base)
    base = cross_attention_weights(unet, "kv")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name in unet.attn_processors:
        if ".attn2." in name:
            prefix = name[: -len(".processor")]
            for kind in ("to_k", "to_v"):
                w = base[f"{prefix}.{kind}.weight"]
                state[f"{name}.{kind}_custom_diffusion.weight"] = w + 0.01 * torch.randn(w.shape, generator=gen)
        else:
            state[name] = {}
    unet.set_attn_processor(unet._process_custom_diffusion(state))  # diffusers' own loader code
    folder = tmp_path / "cd"
    unet.save_attn_procs(folder, safe_serialization=True)
    unet.save_attn_procs(folder, safe_serialization=False)
    vector = torch.randn(768, generator=gen)
    save_file({"<new1>": vector}, str(folder / "<new1>.safetensors"))
    return folder, state, vector


def test_import_export_round_trip_is_exact(tiny_base, custom_diffusion_output, tmp_path):
    folder, state, vector = custom_diffusion_output
    *_, unet, _, _ = load_components(tiny_base)
    base = cross_attention_weights(unet, "crossattn")
    for weights in (folder / WEIGHTS_SAFE, folder / WEIGHTS_BIN):  # .bin via torch.load(weights_only=True)
        concept = import_custom_diffusion(weights, base, ["dog"])
        assert concept.tokens == ["<new1>"] and torch.equal(concept.token_vectors[0], vector)
        assert concept.meta.train_mode == "kv" and len(concept.deltas) == len([k for k in state if state[k] != {}])
        saved = load_concept(concept.save(tmp_path / "imported.safetensors"))
        out = tmp_path / "exported"
        export_custom_diffusion(saved, base, out)
        exported = load_file(str(out / WEIGHTS_SAFE))
        original = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        assert set(exported) == set(original)
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), key
        assert torch.equal(load_file(str(out / "<new1>.safetensors"))["<new1>"], vector)


def test_exact_delta_reproduces_the_weight():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=gen) * torch.logspace(-8, 2, 1000)
    trained = base + torch.randn(1000, generator=gen) * 1e-3
    delta, index, _ = exact_delta(trained, base)
    assert index.numel() == 0 and torch.equal(base + delta, trained)


def test_imported_concept_equals_diffusers_own_processors(tiny_base, custom_diffusion_output):
    """The same trained weights through diffusers' CustomDiffusionAttnProcessor vs our baked K/V."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    folder, state, _ = custom_diffusion_output
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([321])
    with torch.no_grad():
        pipe.unet.set_attn_processor(pipe.unet._process_custom_diffusion(torch.load(folder / WEIGHTS_BIN, weights_only=True)))
        pipe.load_textual_inversion(str(folder), weight_name="<new1>.safetensors")
        ids = pipe.tokenizer(["a photo of a <new1> dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ctx_theirs = pipe.text_encoder(ids)[0]
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx_theirs).sample

    ours_pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False)
    ours_pipe.unet.set_attn_processor(AttnProcessor())
    concept = import_custom_diffusion(folder, cross_attention_weights(ours_pipe.unet, "crossattn"), ["dog"])
    apply_concept(ours_pipe.unet, concept, text_encoder=ours_pipe.text_encoder, tokenizer=ours_pipe.tokenizer)
    with torch.no_grad():
        ids = ours_pipe.tokenizer(["a photo of a <new1> dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ctx_ours = ours_pipe.text_encoder(ids)[0]
        ours = ours_pipe.unet(x, t, encoder_hidden_states=ctx_ours).sample
    assert torch.equal(ctx_ours, ctx_theirs)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, ours_pipe.unet(x, t, encoder_hidden_states=torch.zeros_like(ctx_ours)).sample)


class NotAWeight:
    pass


def test_import_refuses_pickles_and_missing_embeddings(tiny_base, custom_diffusion_output, tmp_path):
    folder, state, _ = custom_diffusion_output
    *_, unet, _, _ = load_components(tiny_base)
    base = cross_attention_weights(unet, "crossattn")
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"x.attn2.processor.to_k_custom_diffusion.weight": NotAWeight()}, evil / WEIGHTS_BIN)
    with pytest.raises(ConceptFileError, match="only weights are ever read"):
        import_custom_diffusion(evil, base, ["dog"])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / WEIGHTS_SAFE).write_bytes((folder / WEIGHTS_SAFE).read_bytes())
    with pytest.raises(InvalidInputError, match="embedding"):
        import_custom_diffusion(bare, base, ["dog"])
    with pytest.raises(InvalidInputError, match="one class word per token"):
        import_custom_diffusion(folder, base, ["dog", "cat"])
    assert canonical_name("a.attn2.processor.to_k_custom_diffusion.weight") == "a.attn2.to_k.weight"


def test_cli_import_export(tiny_base, custom_diffusion_output, tmp_path, capsys):
    folder, state, _ = custom_diffusion_output
    out = tmp_path / "imported.safetensors"
    assert main(["import-diffusers", "--base", str(tiny_base), "--weights", str(folder), "--class-word", "dog",
                 "--out", str(out)]) == 0
    assert load_concept(out).tokens == ["<new1>"]
    assert main(["export-diffusers", "--base", str(tiny_base), "--concept", str(out), "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / WEIGHTS_SAFE).exists()
    # diffusers loads the export with its own loader and processors.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False)
    pipe.unet.load_attn_procs(str(tmp_path / "x"), weight_name=WEIGHTS_BIN, _pipeline=pipe)
    processors = pipe.unet.attn_processors
    assert all(type(p).__name__.startswith("CustomDiffusion") for p in processors.values())
    pipe.load_textual_inversion(str(tmp_path / "x"), weight_name="<new1>.safetensors")
    assert "<new1>" in pipe.tokenizer.get_vocab()
    # The imported concept generates with our pipeline code too.
    assert main(["generate", "--base", str(tiny_base), "--concept", str(out), "--prompt", "a <new1> dog",
                 "--out", str(tmp_path / "gen"), "--steps", "2", "--size", "64"]) == 0
