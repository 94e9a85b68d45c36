"""Checkpoints, resume, cancel, divergence and every documented bad input."""

from __future__ import annotations

import math

import pytest
import torch

from classdiffusion.config import ConceptSpec, TrainConfig
from classdiffusion.concept import load_concept
from classdiffusion.errors import (
    BaseModelError,
    InvalidInputError,
    TrainingCancelled,
    TrainingDivergedError,
)
from classdiffusion.hosts.diffusers_host import DiffusersHost, load_host
from classdiffusion.run.train import TrainCallbacks, TrainingRun, train

from helpers import dog, make_images, small_config


def test_resume_equals_an_uninterrupted_run(tiny_base, tmp_path):
    full = train(load_host(tiny_base, device="cpu"), [dog()], small_config(steps=6, save_every=3),
                 images=[make_images()], out=tmp_path / "full.safetensors")
    checkpoint = full.checkpoints[0]
    assert checkpoint.name == "full-step00003.safetensors"

    resumed = train(load_host(tiny_base, device="cpu"), [dog()], small_config(steps=6, save_every=3),
                    images=[make_images()], out=tmp_path / "resumed.safetensors", resume=checkpoint)
    assert resumed.concept.history == full.concept.history
    assert torch.equal(resumed.concept.token_vectors, full.concept.token_vectors)
    for name, delta in full.concept.deltas.items():
        assert torch.equal(resumed.concept.deltas[name], delta), name


def test_resume_refuses_changed_settings_and_final_files(tiny_base, tmp_path):
    result = train(load_host(tiny_base, device="cpu"), [dog()], small_config(steps=4, save_every=2),
                   images=[make_images()], out=tmp_path / "c.safetensors")
    host = load_host(tiny_base, device="cpu")
    with pytest.raises(InvalidInputError, match="spl_weight"):
        train(host, [dog()], small_config(steps=4, spl_weight=0.5), images=[make_images()],
              resume=result.checkpoints[0])
    with pytest.raises(InvalidInputError, match="no optimizer state"):
        train(host, [dog()], small_config(steps=8), images=[make_images()], resume=result.path)


class _StopAt(TrainCallbacks):
    """Stops after ``step`` steps, counted at the check before each step."""

    def __init__(self, step):
        self.step, self.seen = step, -1

    def should_stop(self):
        self.seen += 1
        return self.seen >= self.step


def test_cancel_writes_nothing_and_keeps_the_previous_file(host, tmp_path):
    out = tmp_path / "concept.safetensors"
    out.write_bytes(b"previous concept")
    with pytest.raises(TrainingCancelled, match="cancelled at step 2"):
        train(host, [dog()], small_config(steps=5), images=[make_images()], out=out, callbacks=_StopAt(2))
    assert out.read_bytes() == b"previous concept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept.safetensors"]
    # the host is usable again: deltas were detached
    assert not any(m._forward_hooks or "forward" in m.__dict__ for m in host.unet.modules())


class _NanAfter:
    """Wraps a host so that the UNet returns NaN from a given call on."""

    def __init__(self, host, good_calls):
        self._host, self._left = host, good_calls

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict_noise(self, *args):
        out = self._host.predict_noise(*args)
        self._left -= 1
        return out if self._left >= 0 else out * float("nan")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(host, tmp_path):
    out = tmp_path / "c.safetensors"
    with pytest.raises(TrainingDivergedError, match=r"step 5.*c-step00004"):
        train(_NanAfter(host, 4), [dog()], small_config(steps=8, save_every=2), images=[make_images()], out=out)
    assert not out.exists()
    last = load_concept(tmp_path / "c-step00004.safetensors")
    assert last.step == 4 and all(torch.isfinite(d).all() for d in last.deltas.values())


def test_no_images(host, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="No training images found"):
        train(host, [dog(images=[str(empty)])], small_config())
    with pytest.raises(InvalidInputError, match="batch is empty"):
        train(host, [dog()], small_config(), images=[[]])
    with pytest.raises(InvalidInputError, match="batch is empty"):
        train(host, [dog()], small_config(), images=[torch.zeros(0, 64, 64, 3)])


def test_unreadable_image(host, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    make_images(1)[0].save(folder / "ok.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InvalidInputError, match="broken.jpg cannot be read"):
        train(host, [dog(images=[str(folder)])], small_config())


def test_comfyui_style_image_tensors_are_accepted(host):
    batch = torch.rand(3, 64, 80, 3)  # ComfyUI IMAGE: [B, H, W, C] in 0..1
    result = train(host, [dog()], small_config(steps=1), images=[batch])
    assert result.concept.step == 1


def test_token_already_in_vocabulary(host):
    with pytest.raises(InvalidInputError, match="already a word"):
        train(host, [dog(token="dog")], small_config(), images=[make_images()])


def test_token_with_spaces_and_empty_words():
    with pytest.raises(InvalidInputError, match="contains spaces"):
        ConceptSpec(token="my dog", class_word="dog")
    with pytest.raises(InvalidInputError, match="token is empty"):
        ConceptSpec(token=" ", class_word="dog")
    with pytest.raises(InvalidInputError, match="class word is empty"):
        ConceptSpec(token="<sks>", class_word="")
    with pytest.raises(InvalidInputError, match="exactly one"):
        ConceptSpec(token="<sks>", class_word="dog", prompt="a photo")


def test_multi_token_class_word_warns_but_trains(host):
    result = train(host, [dog(class_word="xyzzyq")], small_config(steps=1), images=[make_images()])
    assert any("split into" in w for w in result.warnings)
    assert result.concept.meta.warnings == result.warnings


def test_duplicate_tokens(host):
    with pytest.raises(InvalidInputError, match="own token"):
        train(host, [dog(), dog()], small_config(), images=[make_images(), make_images()])


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps must be at least 1"),
    ("steps", -5, "steps must be at least 1"),
    ("batch_size", 0, "batch_size"),
    ("resolution", 100, "multiple of 64"),
    ("learning_rate", 0.0, "learning_rate"),
    ("spl_weight", -1.0, "spl_weight must be at least 0"),
])
def test_bad_settings(field, value, match):
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig(**{field: value})


def test_base_that_is_not_sd15_shaped(tiny_base):
    from diffusers import UNet2DConditionModel

    from classdiffusion.model.tiny import tiny_components

    tokenizer, text_encoder, _, vae, scheduler = tiny_components(tiny_base / "tokenizer")
    sd2_like = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=8, norm_num_groups=8,
    )
    with pytest.raises(BaseModelError, match="not supported yet.*1024.*SD2"):
        DiffusersHost(tokenizer, text_encoder, sd2_like, vae, scheduler, device="cpu")


def test_missing_or_wrong_base_paths(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_host(tmp_path / "nope")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BaseModelError, match="not a diffusers"):
        load_host(tmp_path / "folder")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="pickled"):
        load_host(ckpt)
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="--base-config"):
        load_host(single)


def test_a_step_with_non_finite_gradients_changes_no_weight_and_is_reported(host):
    """A finite loss with a non-finite gradient (what fp16 overflow or a bad batch gives): AdamW skips
    the step on the device (no sync), the official weight decay too, the next step trains again,
    and the run says how many steps were skipped."""
    run = TrainingRun(host, [dog()], small_config(steps=3), [make_images()])
    detach = run.method.attach()
    try:
        run.read_steps([run.step(0)])
        deltas = run.method.deltas
        before = {name: d.detach().clone() for name, d in deltas.items()}
        token_before = run.method.token_vectors.detach().clone()
        handle = next(iter(deltas.values())).register_hook(lambda grad: grad * float("inf"))
        skipped = run.read_steps([run.step(1)])
        handle.remove()
        assert math.isfinite(skipped[0].loss)
        assert all(torch.equal(d, before[name]) for name, d in deltas.items())
        assert torch.equal(run.method.token_vectors, token_before)
        run.read_steps([run.step(2)])
        assert all(not torch.equal(d, before[name]) for name, d in deltas.items())
        assert all(torch.isfinite(d).all() for d in deltas.values())
    finally:
        detach()
    run.warn_skipped_steps()
    assert run.warnings[-1].startswith("1 of 3 steps had non-finite gradients and changed no weight")
