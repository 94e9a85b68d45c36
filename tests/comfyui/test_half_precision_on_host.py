"""Training on a UNet that ComfyUI loaded in half precision, as it does on GPUs.

ComfyUI runs here with ``--fp16-unet`` (its choice on most GPUs) on the CPU: the Train node must
train the fp16 UNet in fp16 autocast with the text model copied in fp16, in bf16 autocast over the
same UNet (mixed dtypes, when the user asks for it), and with "auto", which on the CPU means no
autocast over the fp16 weights. Each run must reach every K/V delta and give finite values.
"""

from __future__ import annotations

import math

import pytest

from comfy_server import error_message, start_server, unavailable_reason
from api_graphs import image_batch, loader, sampler, train_node

_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


@pytest.fixture(scope="module")
def fp16_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("comfy_fp16"), extra_args=("--fp16-unet",))
    yield server
    server.stop()


@pytest.mark.parametrize("precision", ["fp16", "bf16", "auto"])
def test_training_a_half_precision_unet(fp16_server, precision):
    from classdiffusion.concept import load_concept

    name = f"half_{precision}"
    prompt = {**loader(), **image_batch(), **train_node(name, steps=2, mixed_precision=precision),
              **sampler(("train", 0), ("train", 1), "a photo of a <sks> dog", name)}
    entry = fp16_server.run(prompt)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    assert "model weight dtype torch.float16" in fp16_server.log()
    concept = load_concept(fp16_server.base_dir / "models" / "classdiffusion" / f"{name}.safetensors")
    assert concept.meta.config["mixed_precision"] == ("no" if precision == "auto" else precision)
    assert len(concept.history) == 2  # a step after an update, too (fp16/bf16 on the CPU are slow)
    assert all(math.isfinite(record["loss"]) and math.isfinite(record["spl"]) for record in concept.history)
    assert concept.deltas and all(delta.isfinite().all() and delta.abs().sum() > 0 for delta in concept.deltas.values())
    assert concept.token_vectors.isfinite().all()
