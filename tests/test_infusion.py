"""Infusion's method on the tiny base: what it trains, its file, that it leaves every prompt without
the class word bit-identical, resume, masks, the dual-stream equivalence, and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from classdiffusion.concept.apply import apply_concept
from classdiffusion.cli import main
from classdiffusion.concept import load_concept
from classdiffusion.config import ConceptSpec, TrainConfig
from classdiffusion.errors import InvalidInputError
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.model.losses import subject_masked_mse
from classdiffusion.methods.infusion.method import INFUSION_TEMPLATES
from classdiffusion.methods.infusion.residual import ResidualPositions, attach_residuals_with_hooks, residual_modules
from classdiffusion.model.prompt_record import ConditionRegistry, word_positions
from classdiffusion.run.train import TrainingRun, checkpoint_path, train
from helpers import make_images


def infusion_config(**overrides) -> TrainConfig:
    settings = dict(steps=4, resolution=64, batch_size=2, gradient_accumulation=2)
    settings.update(overrides)
    return TrainConfig.for_method("infusion", **settings)


def cat() -> ConceptSpec:
    return ConceptSpec(token="<unused>", class_word="dog")


def test_recipe_defaults_are_infusions():
    config = TrainConfig.for_method("infusion")
    assert (config.batch_size, config.gradient_accumulation, config.residual_lr) == (4, 4, 0.01)
    assert config.augment is False and config.hflip is True and config.max_grad_norm == 0.0
    assert config.residual_target == "v" and config.steps == 500
    assert TrainConfig().method == "classdiffusion"


def test_word_positions_find_every_piece_of_every_occurrence():
    ids = torch.tensor([[49406, 5, 7, 8, 3, 7, 8, 49407]])
    mask = word_positions(ids, [7, 8])
    assert mask.tolist() == [[False, False, True, True, False, True, True, False]]
    assert not word_positions(ids, [9]).any()


def test_registry_finds_rows_after_cast_and_repeat():
    registry = ConditionRegistry()
    features = torch.randn(1, 6, 16)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    registry.register(features, ids)
    context = torch.cat([torch.zeros(1, 12, 16), features.repeat(1, 2, 1)]).to(torch.float16)
    found = registry.token_ids(context)
    assert found[0] is None and found[1].tolist() == [1, 2, 3, 4, 5, 6] * 2
    mask = registry.positions(context, [3])
    assert mask[1].nonzero().flatten().tolist() == [2, 8] and not mask[0].any()


def test_trains_only_the_value_residuals(tiny_base):
    host = load_host(tiny_base, device="cpu")
    run = TrainingRun(host, [cat()], infusion_config(), images=[make_images(4)])
    detach = run.method.attach()
    try:
        unet_params = [p for p in host.unet.parameters()]
        text_params = [p for p in host.text_encoder.parameters()]
        losses = run.losses(run.sample_batch(0))
        losses.total.backward()
    finally:
        detach()
    residuals = run.method.residuals
    assert set(residuals) == set(residual_modules(list(run.base_weights), "v"))
    assert all(name.endswith("attn2.to_v") for name in residuals)
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in residuals.values())
    assert all(p.grad is None for p in unet_params + text_params)
    assert not hasattr(run.method, "new_tokens") and not hasattr(run.method, "deltas")
    assert all(INFUSION_TEMPLATES.count(t) == 1 for t in INFUSION_TEMPLATES)


def test_kv_target_adds_key_residuals(tiny_base):
    host = load_host(tiny_base, device="cpu")
    run = TrainingRun(host, [cat()], infusion_config(residual_target="kv"), images=[make_images(2)])
    kinds = {name.rsplit(".", 1)[1] for name in run.method.residuals}
    assert kinds == {"to_k", "to_v"}


def test_refuses_what_it_cannot_train(tiny_base):
    host = load_host(tiny_base, device="cpu")
    two = [cat(), ConceptSpec(token="<b>", class_word="cat")]
    with pytest.raises(InvalidInputError, match="one concept per run"):
        TrainingRun(host, two, infusion_config(), images=[make_images(2), make_images(2, seed=1)])


def test_saves_small_reloads_exactly_and_resumes_exactly(tiny_base, tmp_path):
    images = [make_images(4)]
    out = tmp_path / "inf.safetensors"
    full = train(load_host(tiny_base, device="cpu"), [cat()], infusion_config(steps=4, save_every=2),
                 images=images, out=out)
    loaded = load_concept(out)
    assert loaded.method == "infusion" and loaded.tokens == [] and loaded.class_words == ["dog"]
    assert loaded.deltas == {}
    for name, residual in full.concept.method_tensors.items():
        assert torch.equal(loaded.method_tensors[name], residual)
        assert residual.abs().sum() > 0
    values = sum(r.numel() for r in loaded.method_tensors.values())
    assert out.stat().st_size < values * 4 + 16_384  # the vectors plus the JSON header

    middle = checkpoint_path(out, 2)
    resumed = train(load_host(tiny_base, device="cpu"), [cat()], infusion_config(steps=4, save_every=2),
                    images=images, out=tmp_path / "resumed.safetensors", resume=middle)
    for name, residual in full.concept.method_tensors.items():
        assert torch.equal(resumed.concept.method_tensors[name], residual), name
    assert [h["loss"] for h in resumed.concept.history] == [h["loss"] for h in full.concept.history]


def test_infusion_checkpoint_cannot_resume_a_classdiffusion_run(tiny_base, tmp_path):
    out = tmp_path / "inf.safetensors"
    train(load_host(tiny_base, device="cpu"), [cat()], infusion_config(steps=2, save_every=1), images=[make_images(2)],
          out=out)
    with pytest.raises(InvalidInputError, match="infusion method"):
        train(load_host(tiny_base, device="cpu"), [cat()], TrainConfig(steps=3, resolution=64),
              images=[make_images(2)], resume=checkpoint_path(out, 1))


def _pipeline(tiny_base):
    from classdiffusion.concept.generate import build_pipeline

    return build_pipeline(tiny_base, device="cpu")


def _latents(pipe, prompt, negative=None):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=6.0, height=64, width=64,
                generator=generator, output_type="latent").images


def test_applied_concept_changes_only_prompts_with_the_word(tiny_base, tmp_path):
    out = tmp_path / "inf.safetensors"
    train(load_host(tiny_base, device="cpu"), [cat()], infusion_config(steps=3), images=[make_images(2)], out=out)
    concept = load_concept(out)
    with torch.no_grad():
        for residual in concept.method_tensors.values():  # make the effect unmistakable on a 3-step run
            residual.mul_(50)
    pipe = _pipeline(tiny_base)
    without, with_word = "a photo of a cat", "a photo of a dog"
    base_without, base_with = _latents(pipe, without), _latents(pipe, with_word)
    handle = apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    try:
        tuned_without, tuned_with = _latents(pipe, without), _latents(pipe, with_word)
    finally:
        handle.remove()
    assert torch.equal(tuned_without, base_without)  # bit-identical
    assert not torch.allclose(tuned_with, base_with, atol=1e-4)
    assert torch.equal(_latents(pipe, with_word), base_with)  # removed exactly


class _DualStreamProcessor:
    """Infusion's cross-attention as its code computes it (roe_attention.MemoryEfficientCrossAttention
    with ROELinear): the batch holds two copies; the first gets the residuals at the concept position;
    out1 = attn(q1, k1, v1), out2 = attn(q1, k2, v2)."""

    def __init__(self, residual_k, residual_v, mask):
        self.residual_k, self.residual_v, self.mask = residual_k, residual_v, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states).clone()
        value = attn.to_v(encoder_hidden_states).clone()
        half = hidden_states.shape[0] // 2
        for residual, h in ((self.residual_k, key), (self.residual_v, value)):
            if residual is not None:
                h[:half] = torch.where(self.mask[..., None], h[:half] + residual, h[:half])
        q1 = attn.head_to_batch_dim(query[:half])
        k1, k2 = attn.head_to_batch_dim(key[:half]), attn.head_to_batch_dim(key[half:])
        v1, v2 = attn.head_to_batch_dim(value[:half]), attn.head_to_batch_dim(value[half:])
        out1 = torch.bmm(attn.get_attention_scores(q1, k1), v1)
        out2 = torch.bmm(attn.get_attention_scores(q1, k2), v2)
        out = attn.batch_to_head_dim(torch.cat([out1, out2]))
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("target", ["v", "kv"])
def test_single_pass_equals_infusions_dual_stream(tiny_base, target):
    """Their UNet doubles the batch and returns the first half; nothing mixes rows, so it equals one
    pass with the residuals (what we compute), to float rounding."""
    from diffusers.models.attention_processor import AttnProcessor

    host = load_host(tiny_base, device="cpu")
    unet = host.unet
    unet.set_attn_processor(AttnProcessor())
    gen = torch.Generator().manual_seed(0)
    names = residual_modules([n for n, _ in unet.named_parameters()], target)
    residuals = {n: torch.randn(dict(unet.named_modules())[n].out_features, generator=gen) * 0.5 for n in names}
    prompts = ["a photo of a dog", "a dog"]
    ids = host.token_ids(prompts)
    mask = word_positions(ids, host.word_ids("dog"))
    context = host.encode_text(prompts, {}).context.detach()
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500])
    positions = ResidualPositions()
    positions.mask = mask
    detach = attach_residuals_with_hooks(host.delta_modules([f"{n}.weight" for n in residuals]), residuals, positions)
    try:
        ours = unet(x, t, encoder_hidden_states=context).sample
    finally:
        detach()
    processors = {}
    for name in unet.attn_processors:
        module = name.rsplit(".processor", 1)[0]
        if ".attn2" in module:
            processors[name] = _DualStreamProcessor(residuals.get(f"{module}.to_k"), residuals[f"{module}.to_v"], mask)
        else:
            processors[name] = AttnProcessor()
    unet.set_attn_processor(processors)
    theirs = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([context, context])).sample[:2]
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), float((ours - theirs).abs().max())
    assert not torch.allclose(ours, unet_plain(unet, x, t, context), atol=1e-4)


def unet_plain(unet, x, t, context):
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    return unet(x, t, encoder_hidden_states=context).sample


def test_infusion_loss_is_its_masked_mean():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mask = torch.rand(2, 1, 3, 3)
    expected = ((pred * mask - target * mask) ** 2).mean()
    assert torch.allclose(subject_masked_mse(pred, target, mask), expected)
    assert torch.allclose(subject_masked_mse(pred, target, torch.ones(2, 1, 3, 3)), F.mse_loss(pred, target))


def test_subject_masks_weight_the_loss(tiny_base, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "mask").mkdir(parents=True)
    for i, image in enumerate(make_images(2, size=(64, 64))):
        image.save(folder / f"im{i}.png")
        half = Image.new("L", (64, 64), 0)
        half.paste(255, (0, 0, 32, 64))
        half.save(folder / "mask" / f"im{i}.png")
    host = load_host(tiny_base, device="cpu")
    spec = ConceptSpec(token="<unused>", class_word="dog", images=[str(folder)])
    run = TrainingRun(host, [spec], infusion_config(hflip=False))
    batch = run.sample_batch(0)
    assert torch.allclose(batch.mask[:, :, :, :3], torch.ones(1)) and float(batch.mask[:, :, :, 5:].max()) == 0.0
    assert not run.warnings


def test_cli_trains_inspects_and_explains_compress_and_export(tiny_base, image_dir, tmp_path, capsys):
    out = tmp_path / "inf.safetensors"
    assert main(["train", "--base", str(tiny_base), "--images", str(image_dir), "--class-word", "dog",
                 "--method", "infusion", "--steps", "2", "--resolution", "64", "--batch-size", "1",
                 "--gradient-accumulation", "2", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "KB, Infusion)" in printed
    assert main(["inspect", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["method"] == "infusion" and meta["config"]["gradient_accumulation"] == 2
    assert meta["config"]["residual_lr"] == 0.01 and meta["tokens"] == []
    assert main(["compress", str(out), str(tmp_path / "c.safetensors"), "--energy", "0.9"]) == 0
    assert "Infusion concept" in capsys.readouterr().out and not (tmp_path / "c.safetensors").exists()
    assert main(["export-diffusers", "--concept", str(out), "--base", str(tiny_base), "--out", str(tmp_path / "exp")]) == 2
    assert "Infusion concept" in capsys.readouterr().err


@pytest.mark.slow  # two full evals (~40 s)
def test_eval_separately_reports_both_methods_side_by_side(tiny_base, image_dir, tmp_path, capsys):
    """Infusion's own metrics for a ClassDiffusion and an Infusion concept of the same images: the
    Fisher divergence on prompts without the concept is exactly 0 for Infusion (they never reach it)."""
    paths = []
    for method, extra in (("classdiffusion", ["--token", "<sks>"]), ("infusion", [])):
        out = tmp_path / f"{method}.safetensors"
        assert main(["train", "--base", str(tiny_base), "--images", str(image_dir), "--class-word", "dog",
                     "--method", method, "--steps", "2", "--resolution", "64", "--batch-size", "1",
                     "--out", str(out), "-q", *extra]) == 0
        paths.append(str(out))
    capsys.readouterr()
    report = tmp_path / "side"
    assert main(["eval", "--base", str(tiny_base), "--concept", *paths, "--out", str(report), "--separately",
                 "--num-images", "2", "--steps", "2", "--size", "64", "--fisher-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| classdiffusion.safetensors | classdiffusion |" in printed
    assert "| infusion.safetensors | infusion |" in printed
    rows = json.loads((report / "comparison.json").read_text())
    by_method = {row["method"]: row for row in rows}
    assert by_method["infusion"]["latent_fisher_divergence"] == 0.0
    assert by_method["classdiffusion"]["latent_fisher_divergence"] > 0
    assert by_method["infusion"]["drift_rank"] is None and by_method["classdiffusion"]["drift_rank"]
    for row in rows:
        assert row["wasserstein"] is not None and row["wasserstein"] >= 0
        assert (tmp_path / "side" / Path(row["report"]).parent.name / "summary.png").exists()
    infusion_report = json.loads(Path(by_method["infusion"]["report"]).read_text())
    assert all("dog" in p and "<" not in p for p in infusion_report["prompts"])


def test_cli_generate_with_an_infusion_concept(tiny_base, tmp_path):
    out = tmp_path / "inf.safetensors"
    train(load_host(tiny_base, device="cpu"), [cat()], infusion_config(steps=2), images=[make_images(2)], out=out)
    assert main(["generate", "--base", str(tiny_base), "--concept", str(out), "--prompt", "a photo of a dog",
                 "--out", str(tmp_path / "gen"), "--steps", "2", "--size", "64"]) == 0
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_node_masks_and_alpha_channels_become_subject_masks():
    from classdiffusion.config import ConceptSpec
    from classdiffusion.run.data import ConceptData

    spec = ConceptSpec(token="<unused>", class_word="dog")
    images = torch.rand(2, 40, 40, 3)
    masks = torch.zeros(2, 40, 40)
    masks[:, :, :20] = 1.0
    loaded = ConceptData(spec, images, masks=masks).load_masks(ConceptData(spec, images).load_images())
    assert len(loaded) == 2 and loaded[0].mode == "L" and loaded[0].getpixel((5, 5)) == 255
    assert loaded[0].getpixel((30, 5)) == 0
    assert ConceptData(spec, images).load_masks([None, None]) == [None, None]  # IMAGE tensors have no alpha
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    rgba.paste((10, 20, 30, 255), (0, 0, 8, 16))
    alpha = ConceptData(spec, [rgba]).load_masks([rgba])[0]
    assert alpha.getpixel((2, 2)) == 255 and alpha.getpixel((12, 2)) == 0
    with pytest.raises(InvalidInputError, match="one mask per image"):
        ConceptData(spec, images, masks=masks[:1].repeat(3, 1, 1)).load_masks([None, None])
