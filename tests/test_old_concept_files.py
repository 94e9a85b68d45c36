"""Concept files written before the method plug-in change (tests/fixtures/old_concepts, written
by the code at 19ffd1a on the toy base v1) load and plot with today's code; on today's toy base
(v2, retrained) they are refused cleanly by its fingerprint — applying and resuming name the base
they need — and apply on request (``strict=False``), since the shapes are v1's."""

from __future__ import annotations

from pathlib import Path

import torch

from classdiffusion.concept import load_concept
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.run.plot import plot_history
from classdiffusion.run.resume import resume_settings
from classdiffusion.run.summary import loss_terms, summary_line
from classdiffusion.toyworld.base import base_path
from classdiffusion.toyworld.evaluate import instance_pictures
from classdiffusion.run.train import train

OLD = Path(__file__).resolve().parent / "fixtures" / "old_concepts"


def test_old_files_load_with_their_history():
    classdiffusion = load_concept(OLD / "classdiffusion.safetensors")
    assert classdiffusion.method == "classdiffusion" and classdiffusion.method_label == "ClassDiffusion"
    assert classdiffusion.tokens == ["<sks>"] and classdiffusion.deltas and classdiffusion.step == 4
    assert set(classdiffusion.history[-1]) >= {"loss", "recon", "spl", "cos", "lr"}
    assert loss_terms(classdiffusion.history) == ["recon", "spl"]
    assert "SPL" in summary_line(classdiffusion.history) and "EOS cos" in summary_line(classdiffusion.history)
    assert plot_history(classdiffusion.history, tokens=classdiffusion.tokens).size == (768, 512)  # loss + cosine

    infusion = load_concept(OLD / "infusion.safetensors")
    assert infusion.method_label == "Infusion" and infusion.tokens == [] and infusion.method_tensors
    assert infusion.history[-1]["spl"] == 0.0 and infusion.history[-1]["cos"] == []  # the old layout
    assert loss_terms(infusion.history) == ["recon"]  # the always-zero SPL of old Infusion files is not shown
    assert plot_history(infusion.history).size == (768, 256)


def test_old_classdiffusion_concept_is_refused_by_the_new_toy_base_and_applies_on_request():
    import pytest

    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.errors import BaseMismatchError
    from classdiffusion.concept.generate import build_pipeline

    concept = load_concept(OLD / "classdiffusion.safetensors")
    pipe = build_pipeline(base_path(), device="cpu")
    name = next(iter(concept.deltas))
    module = dict(pipe.unet.named_modules())[name.rsplit(".", 1)[0]]
    before = module.weight.detach().clone()
    with pytest.raises(BaseMismatchError, match="does not fit this UNet.*Load the base it was trained on"):
        apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    assert torch.equal(module.weight, before) and "<sks>" not in pipe.tokenizer.get_vocab()  # nothing half-applied
    handle = apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, strict=False)
    try:
        assert torch.allclose(module.weight.float(), (before.float() + concept.deltas[name]).to(module.weight.dtype).float())
        assert "<sks>" in pipe.tokenizer.get_vocab()
    finally:
        handle.remove()
    assert torch.equal(module.weight, before)


def test_old_infusion_checkpoint_is_refused_for_resuming_on_the_new_toy_base(tmp_path):
    import pytest

    from classdiffusion.errors import BaseMismatchError

    checkpoint = load_concept(OLD / "infusion-step00002.safetensors")
    config, specs = resume_settings(checkpoint, {"steps": 4})
    images = instance_pictures("red_blue_star", count=2)
    with pytest.raises(BaseMismatchError, match="base model given for resuming"):
        train(load_host(base_path(), device="cpu"), specs, config, images=[images], resume=checkpoint,
              out=tmp_path / "resumed.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_method_this_version_does_not_know_says_update_the_pack(tmp_path):
    """The other direction: a file from a newer pack, with a method added after this one."""
    import json

    import pytest
    from safetensors import safe_open
    from safetensors.torch import save_file

    from classdiffusion.errors import ConceptFileError

    source = OLD / "classdiffusion.safetensors"
    with safe_open(str(source), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["classdiffusion"])
    header["classdiffusion"] = json.dumps({**meta, "method": "some-later-method"})
    save_file(tensors, str(tmp_path / "newer.safetensors"), header)
    with pytest.raises(ConceptFileError, match="'some-later-method' method.*update the pack"):
        load_concept(tmp_path / "newer.safetensors")
