"""What the nodes share: the pack's wire types, the category, inputs made from the settings'
declarations (the shared ones and each method's own), and small picture helpers."""

from __future__ import annotations


import inspect
import logging

import numpy as np
import torch

import comfy.samplers
import folder_paths
from comfy_api.latest import io

from ..classdiffusion.config import setting_info
from ..classdiffusion.methods import method_settings
from ..classdiffusion.model.precision import precision_dtype
from .comfy_glue import (
    CONCEPT_FOLDER,
)
from .glue import training_precision

logger = logging.getLogger("classdiffusion")


ConceptType = io.Custom("CLASSDIFFUSION_CONCEPT")

ConceptSpecType = io.Custom("CLASSDIFFUSION_CONCEPT_SPEC")

HistoryType = io.Custom("CLASSDIFFUSION_HISTORY")

CATEGORY = "ClassDiffusion"

def advanced_option() -> dict:
    """``advanced=True`` where this ComfyUI's inputs know it (it folds the input away under
    "advanced"); older hosts get a plain optional input."""
    try:
        params = inspect.signature(io.Combo.Input).parameters
    except (TypeError, ValueError):
        return {}
    if "advanced" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"advanced": True}
    return {}


def setting_input(kind, name: str, **extra):
    """A node input for a TrainConfig setting: default, range, choices and tooltip come from the
    field (config.setting), so the CLI and the node describe it with the same words."""
    info = setting_info(name)
    options = {key: info[key] for key in ("min", "max", "step") if key in info and kind is not io.Combo}
    if kind is io.Combo:
        options["options"] = list(info["choices"])
    return kind.Input(name, default=info["default"], tooltip=info["help"], **options, **extra)


def method_inputs_after(anchor: str) -> list:
    """The Train node's inputs for the methods' own settings placed after the input ``anchor``
    (their declaration's ``node``: "after:", "optional-after:" or "advanced-after:" ANCHOR), and
    after each of those the ones placed after it: the registry decides what the node offers, and
    each stays where saved workflows expect it."""
    inputs = []
    for own in method_settings():
        place = own.declared.metadata.get("node") or ""
        kind_of_place, _, after = place.partition("-after:") if "-after:" in place else ("", "", place[len("after:"):])
        if after != anchor:
            continue
        info = setting_info(own.name)
        kind = io.Combo if "choices" in info else {bool: io.Boolean, int: io.Int, float: io.Float}[type(info["default"])]
        extra = {} if not kind_of_place else {"optional": True, **(advanced_option() if kind_of_place == "advanced" else {})}
        inputs += [setting_input(kind, own.name, **extra), *method_inputs_after(own.name)]
    return inputs


def mixed_precision_for(choice: str, model) -> str:
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    unet_dtype = model.model.get_dtype()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = training_precision(choice, device.type, unet_dtype, bf16)
    if precision != "no" and precision_dtype(precision) != unet_dtype:
        logger.warning("Training a %s UNet with %s autocast keeps a converted copy of its weights for the "
                       "backward pass; 'auto' avoids that.", unet_dtype, precision)
    return precision


def note_image(text: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 64), (255, 255, 255))
    ImageDraw.Draw(image).text((6, 26), text, fill=(90, 90, 90))
    return image


def image_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def concept_file_inputs(clip_tooltip: str, file_tooltip: str, *between) -> list:
    """model, clip, ``between``, concept_name: the inputs of the nodes that apply a concept file."""
    return [io.Model.Input("model", tooltip="The SD1.x or SDXL model the concept was trained on."),
            io.Clip.Input("clip", tooltip=clip_tooltip), *between,
            io.Combo.Input("concept_name", options=folder_paths.get_filename_list(CONCEPT_FOLDER),
                           tooltip=file_tooltip)]


def sampling_inputs() -> list:
    """steps, cfg, sampler_name, scheduler, size: how the step-comparing nodes sample (paper: DDIM, 6.0)."""
    return [io.Int.Input("steps", default=30, min=1, max=200, tooltip="Sampling steps."),
            io.Float.Input("cfg", default=6.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance (paper: 6.0)."),
            io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="ddim"),
            io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="ddim_uniform"),
            io.Int.Input("size", default=512, min=64, max=1024, step=64, tooltip="Width and height.")]


def label_picture(image: torch.Tensor, text: str) -> torch.Tensor:
    """``text`` on a white strip above an IMAGE tile [1, H, W, 3]."""
    from PIL import Image, ImageDraw

    array = (image[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    tile = Image.fromarray(array)
    canvas = Image.new("RGB", (tile.width, tile.height + 18), (255, 255, 255))
    canvas.paste(tile, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), text, fill=(0, 0, 0))
    return image_tensor(canvas)
