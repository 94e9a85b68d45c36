"""SDXL in a real headless ComfyUI: a small SDXL-family checkpoint that ComfyUI itself detects as
SDXL (its KOALA-700M entry, a subclass of SDXL; full-size CLIP-L and bigG), trained through the
Train node, sampled with ``embedding:NAME`` in a stock prompt, loaded with Load Concept K/V,
refused on the wrong family, and cancelled. The host's trainable copies are checked against
ComfyUI's own SDXL computation by ``sdxl_host_check.py``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from comfy_server import BASE, COMFYUI_PATH, COMFYUI_PYTHON, REPO, SDXL, error_message, unavailable_reason, was_interrupted
from api_graphs import (
    assert_success, image_batch, load_concept_node, loader, pixels, sampler, strengthened_infusion_node, train_node,
)

_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


def test_host_copies_compute_what_comfyui_computes_on_sdxl(server, tmp_path):
    out = tmp_path / "sdxl_check.json"
    checkpoint = server.base_dir / "models" / "checkpoints" / SDXL
    run = subprocess.run([COMFYUI_PYTHON, str(Path(__file__).with_name("sdxl_host_check.py")), str(REPO),
                          str(checkpoint), str(out)], cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    print(json.dumps(report, indent=1))
    assert report["is_sdxl"] and report["family"] == "sdxl" and report["clip_family"] == "sdxl"
    assert report["context_shape_plain"] == [1, 77, 2048]
    for key in ("context_plain", "pooled_plain", "context_token", "pooled_token", "eps"):
        assert report[key] < 1e-4, (key, report[key])
    assert report["kv_grads_reached"] and report["attn2_layers"] == 26  # input 0+2+5, middle 5, output 0+0+2+2+5+5
    assert report["token_grad_clip_l"] > 0 and report["token_grad_clip_g"] > 0


@pytest.fixture(scope="module")
def sdxl_trained(server):
    prompt = {**loader(SDXL), **image_batch(), **train_node("sdxl_dog", steps=2, batch_size=1),
              **sampler(("train", 0), ("train", 1), "a photo of a <sks> dog", "sdxl_trained")}
    entry = server.run(prompt, timeout=1200)
    assert_success(entry)
    return entry


def test_sdxl_train_then_sample_with_the_embedding(server, sdxl_trained):
    """The concept records the SDXL family; the embedding file holds clip_l and clip_g (the token's
    two halves), and embedding:NAME on the Train node's MODEL with the base CLIP samples exactly
    like the Train node's CLIP with <sks>."""
    from classdiffusion.concept import load_concept

    concept = load_concept(server.base_dir / "models" / "classdiffusion" / "sdxl_dog.safetensors")
    assert concept.family == "sdxl" and concept.token_vectors.shape == (1, 2048)
    assert len(concept.deltas) == 2 * 26
    embedding = load_file(str(server.base_dir / "models" / "embeddings" / "sdxl_dog.safetensors"))
    assert torch.equal(embedding["clip_l"][0], concept.token_vectors[0, :768])
    assert torch.equal(embedding["clip_g"][0], concept.token_vectors[0, 768:])
    common = {**loader(SDXL), **image_batch(), **train_node("sdxl_dog", steps=2, batch_size=1)}  # cached
    with_embedding = server.run({**common, **sampler(("train", 0), ("ckpt", 1), "a photo of a embedding:sdxl_dog dog",
                                                     "sdxl_emb")})
    assert_success(with_embedding)
    assert np.array_equal(pixels(server, sdxl_trained), pixels(server, with_embedding))


def test_sdxl_load_concept_and_family_mismatch(server, sdxl_trained):
    loaded = server.run({**loader(SDXL), **load_concept_node("sdxl_dog.safetensors"),
                         **sampler(("load", 0), ("load", 1), "a photo of a <sks> dog", "sdxl_load")})
    assert_success(loaded)
    assert np.array_equal(pixels(server, loaded), pixels(server, sdxl_trained))
    wrong = server.run({**loader(BASE), **load_concept_node("sdxl_dog.safetensors"),
                        **sampler(("load", 0), ("load", 1), "a photo of a <sks> dog", "sdxl_on_sd15")})
    assert wrong["status"]["status_str"] == "error"
    message = error_message(wrong)
    assert "Stable Diffusion XL base" in message and "Stable Diffusion 1.x" in message and "Traceback" not in message


def test_sdxl_cancel_leaves_no_files(server):
    prompt_id = server.queue({**loader(SDXL), **image_batch(), **train_node("sdxl_cancelled", steps=5000,
                                                                             batch_size=1)})
    deadline = time.time() + 120
    while not server.is_running(prompt_id) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(20)  # let it load the SDXL text encoders and take a step
    server.post("/interrupt")
    entry = server.wait(prompt_id, timeout=300)
    assert was_interrupted(entry) or entry["status"]["status_str"] == "error"
    folders = [server.base_dir / "models" / "classdiffusion", server.base_dir / "models" / "embeddings"]
    leftovers = [p.name for f in folders if f.exists() for p in f.iterdir()
                 if p.name.startswith((".sdxl_cancelled", "sdxl_cancelled"))]
    assert leftovers == []


def test_sdxl_infusion_changes_only_prompts_with_its_word(server):
    """Infusion on SDXL through the Train node (a value residual on each of the 26 attn2), then Load
    Concept K/V + stock CLIPTextEncode/KSampler: a prompt without the class word samples
    bit-identically to the base model, one with it does not (the residual hooks find the word in
    ComfyUI's 2048-wide SDXL conditioning)."""
    from classdiffusion.concept import load_concept

    entry = server.run({**loader(SDXL), **image_batch(),
                        **train_node("sdxl_infusion", steps=2, method="infusion", batch_size=1)}, timeout=1200)
    assert_success(entry)
    path = server.base_dir / "models" / "classdiffusion" / "sdxl_infusion.safetensors"
    concept = load_concept(path)
    assert concept.family == "sdxl" and concept.method == "infusion" and len(concept.method_tensors) == 26
    load = strengthened_infusion_node(concept, path, "sdxl_infusion_strong.safetensors")
    runs = {}
    for label, graph in {
        "base_cat": {**loader(SDXL), **sampler(("ckpt", 0), ("ckpt", 1), "a photo of a cat", "sdxl_inf_base_cat")},
        "tuned_cat": {**loader(SDXL), **load, **sampler(("load", 0), ("load", 1), "a photo of a cat", "sdxl_inf_cat")},
        "base_dog": {**loader(SDXL), **sampler(("ckpt", 0), ("ckpt", 1), "a photo of a dog", "sdxl_inf_base_dog")},
        "tuned_dog": {**loader(SDXL), **load, **sampler(("load", 0), ("load", 1), "a photo of a dog", "sdxl_inf_dog")},
    }.items():
        result = server.run(graph)
        assert_success(result)
        runs[label] = pixels(server, result)
    assert np.array_equal(runs["tuned_cat"], runs["base_cat"])
    assert not np.array_equal(runs["tuned_dog"], runs["base_dog"])
