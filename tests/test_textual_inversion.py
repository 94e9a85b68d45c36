"""Textual Inversion, the method that proves the plug-in: one file, token only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from classdiffusion.concept.apply import apply_concept
from classdiffusion.cli import main
from classdiffusion.concept import load_concept
from classdiffusion.config import ConceptSpec, TrainConfig
from classdiffusion.errors import InvalidInputError
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.methods import TextualInversionMethod
from classdiffusion.methods.textual_inversion.method import TEMPLATES
from classdiffusion.run.train import TrainingRun, checkpoint_path, train
from helpers import dog, make_images

METHOD_FILE = Path(__file__).resolve().parents[1] / "classdiffusion" / "methods" / "textual_inversion" / "method.py"


def ti_config(**overrides) -> TrainConfig:
    return TrainConfig.for_method("textual-inversion", **{"steps": 4, "resolution": 64, "gradient_accumulation": 1,
                                                           "memory": "off", **overrides})


def test_recipe_is_diffusers_example_and_the_file_is_small():
    config = TrainConfig.for_method("textual-inversion")
    assert (config.steps, config.batch_size, config.gradient_accumulation) == (3000, 1, 4)
    assert config.effective_learning_rate(False) == pytest.approx(5e-4 * 4)  # its --scale_lr over 4 micro-batches
    assert config.max_grad_norm == 0.0 and not config.augment
    assert len(METHOD_FILE.read_text().splitlines()) <= 120
    assert len(TEMPLATES) == 27 and len(set(TEMPLATES)) == 27


def test_gradients_reach_only_the_token_row(tiny_base):
    host = load_host(tiny_base, device="cpu")
    run = TrainingRun(host, [dog(initializer="class")], ti_config(), images=[make_images(2)])
    detach = run.method.attach()
    try:
        batch = run.sample_batch(0)
        losses = run.losses(batch)
        losses.total.backward()
    finally:
        detach()
    assert set(losses.terms) == {"recon"} and torch.equal(losses.total, losses.terms["recon"])
    vectors = run.method.new_tokens.vectors
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(host.unet.parameters()) + list(host.text_encoder.parameters()))
    assert run.optimizer.param_groups[0]["params"] == [vectors]
    assert not hasattr(run.method, "deltas")
    # diffusers' templates around the token alone: no class word
    assert all(p in {t.format("<sks>") for t in TEMPLATES} for p in batch.prompts)
    custom = TrainingRun(load_host(tiny_base, device="cpu"), [dog(prompt="a drawing of {}")], ti_config(),
                         images=[make_images(2)])
    assert custom.sample_batch(0).prompts == ["a drawing of <sks>"]  # its recipe: batch 1


def test_token_only_concept_reloads_exactly_and_resumes_exactly(tiny_base, tmp_path):
    images = [make_images(4)]
    out = tmp_path / "ti.safetensors"
    full = train(load_host(tiny_base, device="cpu"), [dog()], ti_config(save_every=2), images=images, out=out)
    loaded = load_concept(out)
    assert loaded.method == "textual-inversion" and loaded.method_label == "Textual Inversion"
    assert loaded.deltas == {} and loaded.method_tensors == {} and loaded.tokens == ["<sks>"]
    assert torch.equal(loaded.token_vectors, full.concept.token_vectors)
    start = load_host(tiny_base, device="cpu").word_embedding("ktn")
    assert not torch.allclose(loaded.token_vectors[0], start.float())  # it learned
    assert out.stat().st_size < 768 * 4 + 16_384  # one row plus the JSON header

    resumed = train(load_host(tiny_base, device="cpu"), [dog()], ti_config(save_every=2), images=images,
                    out=tmp_path / "resumed.safetensors", resume=checkpoint_path(out, 2))
    assert torch.equal(resumed.concept.token_vectors, full.concept.token_vectors)
    assert [h["loss"] for h in resumed.concept.history] == [h["loss"] for h in full.concept.history]


def test_refuses_class_images(tiny_base):
    with pytest.raises(InvalidInputError, match="Textual Inversion uses no class images"):
        TrainingRun(load_host(tiny_base, device="cpu"), [dog()], ti_config(), images=[make_images(2)],
                    class_images=[make_images(2, seed=3)])


def test_applied_token_changes_only_prompts_with_it(tiny_base, tmp_path):
    from classdiffusion.concept.generate import build_pipeline

    out = tmp_path / "ti.safetensors"
    train(load_host(tiny_base, device="cpu"), [dog()], ti_config(steps=2), images=[make_images(2)], out=out)
    concept = load_concept(out)
    pipe = build_pipeline(tiny_base, device="cpu")

    def latents(prompt):
        return pipe(prompt, num_inference_steps=2, guidance_scale=6.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    before = latents("a photo of a dog")
    handle = apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    try:
        assert torch.equal(latents("a photo of a dog"), before)  # no UNet weight changed
        ids = pipe.tokenizer("a photo of <sks>").input_ids
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sks>")]
        assert pipe.tokenizer.convert_tokens_to_ids("<sks>") in ids
        assert torch.equal(row, concept.token_vectors[0].to(row.dtype))
    finally:
        handle.remove()


def test_cli_trains_inspects_and_the_demo_base_takes_it(tmp_path, capsys):
    from classdiffusion.toyworld.base import base_path
    from classdiffusion.toyworld.evaluate import instance_pictures

    folder = tmp_path / "images"
    folder.mkdir()
    for k, picture in enumerate(instance_pictures("red_blue_star", count=2)):
        picture.save(folder / f"{k}.png")
    out = tmp_path / "star.safetensors"
    assert main(["train", "--method", "textual-inversion", "--base", str(base_path()), "--images", str(folder),
                 "--token", "<sks>", "--class-word", "star", "--initializer", "class", "--out", str(out),
                 "--steps", "3", "--resolution", "64", "--gradient-accumulation", "1", "--quiet"]) == 0
    assert "KB, Textual Inversion)" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["method"] == "textual-inversion" and meta["method_label"] == "Textual Inversion"
    assert meta["layers"] == {} and meta["tokens"] == ["<sks>"]


def test_the_token_placeholder_is_the_registrys():
    assert TextualInversionMethod.concept_token(" <x> ") == "<x>"
    with pytest.raises(InvalidInputError, match="token is empty"):
        ConceptSpec(token=TextualInversionMethod.concept_token(""), class_word="dog")


def test_validation_previews_and_the_memory_plan_need_no_method_code(tiny_base, tmp_path):
    result = train(load_host(tiny_base, device="cpu"), [dog()],
                   ti_config(steps=2, validation_every=1, validation_steps=2, memory="check"),
                   images=[make_images(2)], out=tmp_path / "ti.safetensors")
    assert result.validation_grid is not None
    assert result.concept.meta.extra["validation"]["steps"] == [0, 1, 2]
    run = TrainingRun(load_host(tiny_base, device="cpu"), [dog()], ti_config(memory="check"), images=[make_images(2)])
    assert run.memory_plan is not None and run.memory_plan.estimate.trained > 0
