"""Concept files: bit-exact round trip, exact apply/remove, base checks, damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from classdiffusion.concept.apply import apply_concept
from classdiffusion.concept import Concept, load_concept, read_metadata
from classdiffusion.errors import BaseMismatchError, ConceptFileError
from classdiffusion.run.train import train

from helpers import dog, make_images, small_config


@pytest.fixture
def trained(host, tmp_path):
    result = train(host, [dog()], small_config(steps=3, learning_rate=1e-3, scale_lr=False),
                   images=[make_images()], out=tmp_path / "c.safetensors")
    return host, result


def _fresh(base):
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    return unet, encoder, tokenizer


def test_saved_concept_reloads_bit_exactly(trained):
    _, result = trained
    loaded = load_concept(result.path)
    assert loaded.tokens == ["<sks>"] and loaded.class_words == ["dog"]
    assert torch.equal(loaded.token_vectors, result.concept.token_vectors)
    assert loaded.deltas.keys() == result.concept.deltas.keys()
    for name, delta in result.concept.deltas.items():
        assert loaded.deltas[name].dtype == torch.float32
        assert torch.equal(loaded.deltas[name], delta)
    meta = loaded.meta
    assert meta.step == 3 and len(meta.history) == 3
    assert {"loss", "recon", "spl", "cos", "step"} <= set(meta.history[0])
    assert meta.base_fingerprint["sha256"] and meta.initializers == ["ktn"]
    assert meta.config["steps"] == 3 and not loaded.resumable


def test_apply_gives_the_trained_weights_and_text_features_and_remove_restores(trained, tiny_base):
    host, result = trained
    unet, encoder, tokenizer = _fresh(tiny_base)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    base_embedding = encoder.get_input_embeddings().weight.clone()

    handle = apply_concept(unet, load_concept(result.path), text_encoder=encoder, tokenizer=tokenizer)
    params = dict(unet.named_parameters())
    for name, delta in result.concept.deltas.items():
        assert torch.equal(params[name], base_state[name] + delta), name
    untouched = [k for k in base_state if k not in result.concept.deltas]
    assert all(torch.equal(unet.state_dict()[k], base_state[k]) for k in untouched)

    # the text features of the applied encoder equal the trainer's own (trained token injected)
    prompt = "a photo of a <sks> dog wearing headphones"
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        applied = encoder(ids).last_hidden_state
        trainer_view = host.encode_text([prompt], result.concept.token_dict()).context
    assert torch.equal(applied, trainer_view)

    handle.remove()
    for key, value in unet.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    assert torch.equal(encoder.get_input_embeddings().weight, base_embedding)


def test_apply_at_strength_scales_the_delta(trained, tiny_base):
    _, result = trained
    unet, _, _ = _fresh(tiny_base)
    base = {k: v.clone() for k, v in unet.named_parameters()}
    apply_concept(unet, result.concept, strength=0.5)
    name, delta = next(iter(result.concept.deltas.items()))
    assert torch.equal(dict(unet.named_parameters())[name], base[name] + 0.5 * delta)


def test_concept_from_another_base_is_refused(trained, other_base):
    _, result = trained
    unet, _, _ = _fresh(other_base)
    with pytest.raises(BaseMismatchError, match="another checkpoint"):
        apply_concept(unet, result.concept)
    apply_concept(unet, result.concept, strict=False)  # explicitly forced: allowed


def test_fingerprint_accepts_the_same_base_in_half_precision(trained, tiny_base):
    _, result = trained
    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet", torch_dtype=torch.float16)
    apply_concept(unet, result.concept)  # no BaseMismatchError


def test_truncated_file_is_a_clear_error(trained, tmp_path):
    _, result = trained
    data = result.path.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptFileError, match="truncated"):
        load_concept(broken)


def test_garbage_and_foreign_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ConceptFileError, match="not a readable safetensors"):
        load_concept(garbage)
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(lora))
    with pytest.raises(ConceptFileError, match="not a ClassDiffusion concept"):
        read_metadata(lora)
    pickle = tmp_path / "concept.bin"
    pickle.write_bytes(b"whatever")
    with pytest.raises(ConceptFileError, match="not loaded"):
        load_concept(pickle)
    with pytest.raises(ConceptFileError, match="does not exist"):
        load_concept(tmp_path / "missing.safetensors")


def test_tampered_shapes_are_detected(trained, tmp_path):
    _, result = trained
    concept = load_concept(result.path)
    name = next(iter(concept.deltas))
    concept.deltas[name] = concept.deltas[name][:, :10].contiguous()
    path = concept.save(tmp_path / "tampered.safetensors")
    # save() recomputes the layer list, so patch the metadata back to the original shape
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    info = json.loads(meta["classdiffusion"])
    info["layers"][name] = list(result.concept.deltas[name].shape)
    meta["classdiffusion"] = json.dumps(info)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ConceptFileError, match="shape"):
        load_concept(path)


def test_save_is_atomic_and_keeps_the_old_file_on_failure(trained, tmp_path, monkeypatch):
    _, result = trained
    path = tmp_path / "keep.safetensors"
    result.concept.save(path)
    before = path.read_bytes()
    import classdiffusion.concept.storage as concept_module

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(concept_module, "save_file", failing_save)
    with pytest.raises(OSError):
        result.concept.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")] == []


def test_optimizer_state_round_trips(host, tmp_path):
    result = train(host, [dog()], small_config(steps=4, save_every=2), images=[make_images()],
                   out=tmp_path / "c.safetensors")
    checkpoint = load_concept(result.checkpoints[0])
    assert checkpoint.resumable and checkpoint.step == 2
    assert isinstance(checkpoint, Concept)


def test_base_fingerprint_is_remembered_only_for_unchanged_tensors():
    from classdiffusion.model.kv import base_fingerprint

    weights = {"a.attn2.to_k.weight": torch.nn.Parameter(torch.randn(8, 4)),
               "a.attn2.to_v.weight": torch.nn.Parameter(torch.randn(8, 4))}
    first = base_fingerprint(weights)
    assert base_fingerprint(weights) == first  # remembered
    weights["a.attn2.to_k.weight"].data.add_(0.01)  # a change no version counter sees
    changed = base_fingerprint(weights)
    assert changed["sha256"] != first["sha256"]
    with torch.no_grad():
        weights["a.attn2.to_v.weight"].mul_(2)  # an in-place change
    assert base_fingerprint(weights)["sha256"] != changed["sha256"]
    copy = {name: torch.nn.Parameter(w.detach().clone()) for name, w in weights.items()}  # other objects
    assert base_fingerprint(copy) == base_fingerprint(weights)


def test_base_fingerprint_of_inference_tensors():
    """ComfyUI's weights are inference tensors (no version counter): the value sample decides."""
    from classdiffusion.model.kv import base_fingerprint

    with torch.inference_mode():
        weights = {"a.attn2.to_k.weight": torch.randn(8, 4), "a.attn2.to_v.weight": torch.randn(8, 4)}
    first = base_fingerprint(weights)
    assert base_fingerprint(weights) == first
    with torch.inference_mode():
        weights["a.attn2.to_k.weight"].add_(0.5)
    assert base_fingerprint(weights)["sha256"] != first["sha256"]
