"""API-format graph pieces and checks the host tests share (``from api_graphs import …``; not
``node_helpers``, which is a module of ComfyUI itself)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from comfy_server import BASE, error_message


def loader(ckpt=BASE, node="ckpt"):
    return {node: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}


def image_batch(first=0, second=1):
    return {
        "img_a": {"class_type": "LoadImage", "inputs": {"image": f"concept_{first}.png"}},
        "img_b": {"class_type": "LoadImage", "inputs": {"image": f"concept_{second}.png"}},
        "images": {"class_type": "ImageBatch", "inputs": {"image1": ["img_a", 0], "image2": ["img_b", 0]}},
    }


def train_node(save_name, token="<sks>", class_word="dog", steps=3, node="train", **extra):
    inputs = {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["images", 0],
        "token": token, "class_word": class_word, "prompt_template": "a photo of a {}", "steps": steps,
        "learning_rate": 1e-5, "spl_weight": 1.0, "batch_size": 2, "seed": 0, "resolution": 64,
        "mixed_precision": "auto", "initializer": "ktn", "gradient_checkpointing": False, "save_name": save_name,
    }
    inputs.update(extra)
    return {node: {"class_type": "ClassDiffusionTrainConcept", "inputs": inputs}}


def sampler(model, clip, text, prefix, vae=("ckpt", 2)):
    return {
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": list(clip), "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": list(clip), "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": list(model), "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 0, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": list(vae)}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def assert_success(entry):
    assert entry["status"]["status_str"] == "success", error_message(entry)


def saved_images(entry, node="save"):
    return entry["outputs"][node]["images"]


def pixels(server, entry):
    image = saved_images(entry)[0]
    return np.asarray(Image.open(server.base_dir / "output" / image["subfolder"] / image["filename"]))


def strengthened_infusion_node(concept, path, name: str) -> dict:
    """A Load Concept K/V node for ``concept`` with its residuals × 300, saved as ``name`` beside
    ``path``: a few training steps move them too little for 2 sampling steps and 8-bit pixels to
    show, so scaled up, "differs" tests the mechanism rather than rounding."""
    with torch.no_grad():
        for residual in concept.method_tensors.values():
            residual.mul_(300)
    concept.save(path.with_name(name))
    return load_concept_node(name)


def load_concept_node(name, model=("ckpt", 0), clip=("ckpt", 1), node="load", strength=1.0, **extra):
    return {node: {"class_type": "ClassDiffusionLoadConcept", "inputs": {
        "model": list(model), "clip": list(clip), "concept_name": name, "strength_model": strength,
        "strength_clip": 1.0, "allow_other_base": False, **extra}}}
