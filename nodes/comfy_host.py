"""The TrainingHost for ComfyUI objects: MODEL (ModelPatcher), CLIP and VAE.

- UNet: the ModelPatcher's diffusion model, called with DDPM inputs (x_t, t) so it returns ε
  exactly as ComfyUI's EPS sampling wraps it; each trained Linear computes ``x·(W + ΔW)ᵀ`` in one
  matmul with the weight ComfyUI's own ``comfy.ops`` casting gives it (dtype, device, offloading,
  weight patches), canonical (diffusers) layer names mapped through ``comfy.utils.unet_to_diffusers``.
- Text: ComfyUI's CLIP-L weights (SDXL: and bigG's, with its projection) copied into transformers
  CLIP text models (ComfyUI's own text model adds residuals in place and holds inference tensors,
  so gradients cannot flow through it); the tokenizers are copies of the CLIP's own, so token ids
  are identical.
- SDXL: the pooled embedding and the size/crop ids reach the UNet as ``y``, built by ComfyUI's own
  ``SDXL.encode_adm``.
- VAE: the latent distribution's mean and std from ComfyUI's first-stage encoder.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Sequence

import torch
from torch import nn

import comfy.model_management
import comfy.model_sampling
import comfy.utils

from ..classdiffusion.errors import BaseModelError
from ..classdiffusion.model.families import FAMILIES, Family, detect_family
from ..classdiffusion.hosts.base import HostBase
from ..classdiffusion.model.kv import cross_attention_weights
from ..classdiffusion.model.text import CombinedTextEncoder, TransformersTextEncoder

logger = logging.getLogger("classdiffusion")


def diffusers_to_comfy_map(model_patcher) -> dict[str, str]:
    """Canonical diffusers UNet weight name → ComfyUI diffusion_model weight name."""
    unet_config = model_patcher.model.model_config.unet_config
    return comfy.utils.unet_to_diffusers(unet_config)


def model_family(model_patcher) -> Family:
    """The MODEL's family from ComfyUI's own reading of it (its UNet config and model class);
    BaseModelError for SD2.x, Flux, inpainting and every other model not trained here. With
    :func:`clip_family`, the one place the nodes tell families apart."""
    import comfy.model_base

    model = model_patcher.model
    config = model.model_config.unet_config
    sampling = model.model_sampling
    eps = isinstance(sampling, comfy.model_sampling.EPS) and not isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    added = "text_time" if isinstance(model, comfy.model_base.SDXL) else ("other" if config.get("adm_in_channels") else None)
    # ComfyUI's MODEL does not hold the encoders: a family with this added input has its own widths
    widths = next((f.text_widths for f in FAMILIES.values() if added and f.added_conditioning == added),
                  (config.get("context_dim"),))
    return detect_family(context_dim=config.get("context_dim"), in_channels=config.get("in_channels"),
                         added_conditioning=added, text_widths=widths,
                         prediction="epsilon" if eps else "v or another target",
                         what=f"This MODEL ({type(model).__name__})")


def clip_family(clip) -> Family:
    """The family whose text encoders a ComfyUI CLIP holds, by its encoders' names
    (``Family.embedding_keys``: clip_l for SD1.x, clip_l and clip_g for SDXL)."""
    model = clip.cond_stage_model
    for family in sorted(FAMILIES.values(), key=lambda f: -len(f.embedding_keys)):
        if all(getattr(model, key, None) is not None for key in family.embedding_keys) and (
                len(family.embedding_keys) > 1 or getattr(clip.tokenizer, family.embedding_keys[0], None) is not None):
            return family
    raise BaseModelError(f"This CLIP ({type(model).__name__}) is neither SD1.x's CLIP-L nor SDXL's CLIP-L + bigG.")



def diffusers_unet_config(config: dict) -> dict:
    """ComfyUI's UNet config (``model_config.unet_config``, LDM terms) → the diffusers
    ``UNet2DConditionModel`` config of the same architecture, for the memory planner's meta-device
    dry run (SD1.x, SDXL and their smaller relatives: SSD-1B, Vega, KOALA)."""
    channels = int(config["model_channels"])
    mults = list(config["channel_mult"])
    res_blocks = list(config["num_res_blocks"])
    if isinstance(res_blocks, int) or len(set(res_blocks)) != 1:
        raise BaseModelError(f"This UNet has {res_blocks} blocks per level; the memory planner needs the same number "
                             "at every level. Set memory to off to train without a plan.")
    per_level = res_blocks[0]
    depth = list(config["transformer_depth"])
    level_depth = [depth[level * per_level] for level in range(len(mults))]
    widths = [channels * m for m in mults]
    heads = [w // int(config["num_head_channels"]) if int(config.get("num_heads", -1)) <= 0 else int(config["num_heads"])
             for w in widths]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in level_depth]
    middle = int(config.get("transformer_depth_middle", level_depth[-1]) or 0)
    out = {
        "sample_size": 64, "in_channels": int(config["in_channels"]), "out_channels": int(config["out_channels"]),
        "block_out_channels": widths, "layers_per_block": per_level, "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "transformer_layers_per_block": [max(d, 1) for d in level_depth], "attention_head_dim": heads,
        "cross_attention_dim": int(config["context_dim"]),
        "use_linear_projection": bool(config.get("use_linear_in_transformer", False)),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if middle > 0 else None,
    }
    if middle > 0 and level_depth[-1] and middle != level_depth[-1]:  # diffusers' middle takes the last level's depth
        logger.info("Memory plan: the middle block's %d transformer layers are counted as %d.", middle, level_depth[-1])
    if config.get("adm_in_channels"):
        out.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=int(config["adm_in_channels"]))
    return out


def default_text_dtype(device: torch.device) -> torch.dtype:
    """The text model copy's dtype when no autocast dtype asks for another: fp16 on a GPU, fp32
    on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.float16


#: ComfyUI's SDXL CLIP (``comfy/sdxl_clip.py``): per encoder, (width, hidden activation, pad id).
#: bigG pads with id 0 ("!"), CLIP-L with end-of-text; both give the penultimate layer as it is.
_ENCODERS = {"clip_l": (768, "quick_gelu", None), "clip_g": (1280, "gelu", 0)}


def clip_text_model(clip, key: str, device: torch.device, dtype: torch.dtype):
    """(tokenizer copy, transformers CLIP text model with this CLIP's ``key`` weights): CLIP-L as
    ``CLIPTextModel``, bigG as ``CLIPTextModelWithProjection`` (its projection gives the pooled
    embedding). ComfyUI's own text model adds residuals in place and holds inference tensors, so
    gradients cannot flow through it; the copy computes the same features."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoder = getattr(clip.cond_stage_model, key, None)
    inner_tokenizer = getattr(clip.tokenizer, key, None)
    width, act, pad_id = _ENCODERS[key]
    if encoder is None or inner_tokenizer is None:
        raise BaseModelError(f"This CLIP has no {key} text encoder; load an SD1.x or SDXL checkpoint's CLIP.")
    prefix = f"{key}.transformer."
    state = {k[len(prefix):]: v for k, v in clip.get_sd().items() if k.startswith(prefix)}
    projection = state.pop("text_projection.weight", None)
    state = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")}
    if state["embeddings.token_embedding.weight"].shape[1] != width:
        raise BaseModelError(f"This CLIP's {key} is {state['embeddings.token_embedding.weight'].shape[1]} wide, "
                             f"not {width}.")
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    tokenizer = copy.deepcopy(inner_tokenizer.tokenizer)
    if pad_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    config = CLIPTextConfig(
        vocab_size=state["embeddings.token_embedding.weight"].shape[0], hidden_size=width,
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
        hidden_act=act, projection_dim=width if projection is None else projection.shape[0],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with_projection = key == "clip_g"
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    own = model.state_dict()
    inner = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    weights = {inner + k: v.clone() for k, v in state.items()}
    if with_projection:
        if projection is None:
            raise BaseModelError("This CLIP's bigG has no text projection; the SDXL checkpoint is incomplete.")
        weights["text_projection.weight"] = projection.clone()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    unexpected = [k for k in unexpected if "position_ids" not in k]
    if missing or unexpected:
        raise BaseModelError(
            f"The CLIP's {key} weights do not fit a CLIP text model (missing {missing[:3]}, unused {unexpected[:3]})."
        )
    return tokenizer, model.to(device, dtype).requires_grad_(False).eval()


def text_encoder_from_clip(clip, device: torch.device, dtype: torch.dtype):
    """(tokenizer copy, transformers CLIPTextModel with the CLIP's CLIP-L weights, context layer)."""
    tokenizer, model = clip_text_model(clip, "clip_l", device, dtype)
    layer_idx = getattr(clip, "layer_idx", None)
    context_layer = None if layer_idx in (None, -1) else int(layer_idx)
    return tokenizer, model, context_layer


def comfy_text_encoder(clip, family: Family, device: torch.device, dtype: torch.dtype):
    """The trainable text side of ``clip`` for ``family``: CLIP-L alone (SD1.x, with the CLIP's
    "CLIP skip"), or CLIP-L and bigG side by side from their penultimate layers, without the final
    norm, as ComfyUI's SDXL CLIP encodes them (a CLIP Set Last Layer moves both)."""
    if len(family.embedding_keys) == 1:
        tokenizer, model, context_layer = text_encoder_from_clip(clip, device, dtype)
        return TransformersTextEncoder(tokenizer, model, device, context_layer)
    layer_idx = getattr(clip, "layer_idx", None)  # CLIP Set Last Layer; -1 on SDXL = the last layer, unnormed
    layer = family.context_layer if layer_idx is None else int(layer_idx)
    encoders = []
    for key in family.embedding_keys:
        tokenizer, model = clip_text_model(clip, key, device, dtype)
        encoders.append(TransformersTextEncoder(tokenizer, model, device, context_layer=layer, context_final_norm=False))
    return CombinedTextEncoder(encoders)


class ComfyHost(HostBase):
    """TrainingHost over a ComfyUI ModelPatcher (already cloned and loaded), CLIP and VAE."""

    #: With ComfyUI's PyTorch attention (its choice on GPUs) its UNet with our fused K/V layers
    #: traces as one graph (tests/comfyui/comfy_compile_check.py), but its other attention
    #: implementations break it (the CPU's sub-quadratic one asks psutil for free memory: 71
    #: breaks on SD1.5), so the host compiles without fullgraph rather than fail.
    compile_fullgraph = False

    def __init__(self, model_patcher, clip, vae, *, device: torch.device | None = None,
                 text_dtype: torch.dtype | None = None):
        """``text_dtype``: the trained copy of the text model's dtype; best the autocast dtype
        (default: fp32 on the CPU, fp16 on a GPU)."""
        family = model_family(model_patcher)
        self.model_patcher = model_patcher
        self.vae = vae
        device = device or comfy.model_management.get_torch_device()
        self.diffusion_model = model_patcher.model.diffusion_model
        self.unet_dtype = model_patcher.model.get_dtype()
        sigmas = model_patcher.model.model_sampling.sigmas.to(device, torch.float32)
        text = comfy_text_encoder(clip, family, device, text_dtype or default_text_dtype(device))
        super().__init__(device, text, 1.0 / (1.0 + sigmas ** 2), self.diffusion_model, family)
        self._to_comfy = diffusers_to_comfy_map(model_patcher)
        self._scale = float(model_patcher.model.latent_format.scale_factor)
        self._shift = float(getattr(model_patcher.model.latent_format, "shift_factor", 0.0) or 0.0)
        self._unpatch_checkpointing: list = []
        self._was_in_training: bool | None = None  # set while configured for training

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.vae
        stage = vae.first_stage_model
        if hasattr(stage, "encoder"):
            comfy.model_management.load_models_gpu([vae.patcher])
            x = pixels.to(vae.device, vae.vae_dtype)
            moments = stage.encoder(x)
            if getattr(stage, "quant_conv", None) is not None:
                moments = stage.quant_conv(moments)
            mean, logvar = moments.float().chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        else:  # a VAE without a plain encoder: its mode, no spread
            mean = vae.encode(((pixels + 1) / 2).permute(0, 2, 3, 1).clamp(0, 1)).float()
            std = torch.zeros_like(mean)
        mean = (mean - self._shift) * self._scale
        return mean.to(self.device), (std * self._scale).to(self.device)

    def _vae_module(self):
        return getattr(self.vae, "first_stage_model", None)

    def sample_images(self, context, uncond, *, seeds, steps, guidance, size, mixed_precision="no",
                      should_stop=lambda: False) -> torch.Tensor:
        """ComfyUI's own sampler (DDIM, ddim_uniform) on the training patcher, whose modules carry
        the trained tensors' hooks; one prompt at a time with its own seed."""
        import comfy.sample

        from ..classdiffusion.errors import TrainingCancelled

        def poll(*_):
            if should_stop():
                raise TrainingCancelled("Training was cancelled during a validation; no concept file was written.")

        def conditioning(row: torch.Tensor) -> list:
            row = row[None].detach().float().cpu()
            tokens, pooled = self.family.unet_inputs(row)
            if pooled is None:
                return [[row, {}]]
            return [[tokens, {"pooled_output": pooled, "width": size, "height": size, "crop_w": 0, "crop_h": 0,
                              "target_width": size, "target_height": size}]]

        negative = conditioning(uncond[0])
        images = []
        for row, seed in zip(context, seeds):
            latent = torch.zeros(1, 4, size // 8, size // 8)
            noise = comfy.sample.prepare_noise(latent, int(seed))
            positive = conditioning(row)
            samples = comfy.sample.sample(self.model_patcher, noise, steps, guidance, "ddim", "ddim_uniform",
                                          positive, negative, latent, seed=int(seed), callback=poll,
                                          disable_pbar=True)
            images.append(self.vae.decode(samples)[..., :3].float().permute(0, 3, 1, 2).cpu())
        return torch.cat(images).clamp(0, 1)

    def predict_noise(self, noisy_latents, timesteps, context) -> torch.Tensor:
        dtype = self.unet_dtype
        context, pooled = self.family.unet_inputs(context)
        if pooled is None:
            return self._forward(noisy_latents.to(dtype), timesteps.float(), context=context.to(dtype))
        # the pooled embedding and size ids, as ComfyUI's SDXL.encode_adm makes them
        height, width = noisy_latents.shape[-2] * 8, noisy_latents.shape[-1] * 8
        y = self.model_patcher.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0,
                                                crop_h=0, target_width=width, target_height=height)
        return self._forward(noisy_latents.to(dtype), timesteps.float(), context=context.to(dtype),
                             y=y.to(noisy_latents.device, dtype))

    def cross_attention_weights(self, train_mode: str) -> dict[str, torch.Tensor]:
        return cross_attention_weights(self.diffusion_model, train_mode, self._to_comfy)

    def unet_config(self) -> dict:
        return diffusers_unet_config(self.model_patcher.model.model_config.unet_config)

    def weight_reader(self):
        return comfy_weights

    def delta_modules(self, names: Sequence[str]) -> dict[str, nn.Module]:
        modules = dict(self.diffusion_model.named_modules())
        return {name.rpartition(".")[0]: modules[self._to_comfy[name].rpartition(".")[0]] for name in names}

    def _configure_memory(self, config) -> None:
        if config.attention != "sdpa":
            logger.warning("The ComfyUI host uses ComfyUI's own attention (its --use-*-attention options); "
                           "attention=%r is ignored.", config.attention)
        # What ComfyUI's own trainer sets around its loop (other code may check it).
        self._was_in_training = bool(getattr(comfy.model_management, "in_training", False))
        comfy.model_management.in_training = True
        if not config.gradient_checkpointing:
            return
        find_modules_at_depth, patch, unpatch = _comfy_checkpointing()
        for module in find_modules_at_depth(self.diffusion_model, depth=1):
            patch(module)
            self._unpatch_checkpointing.append((module, unpatch))

    def close(self) -> None:
        for module, unpatch in self._unpatch_checkpointing:
            unpatch(module)
        self._unpatch_checkpointing.clear()
        if self._was_in_training is not None:
            comfy.model_management.in_training = self._was_in_training
            self._was_in_training = None
        super().close()


@contextlib.contextmanager
def comfy_weights(module: nn.Module, x: torch.Tensor):
    """A Linear's (weight, bias) for input ``x`` as ComfyUI's own ``Linear.forward`` gets them:
    ``comfy.ops``' casting to the input's dtype and device, its offload streams and its weight
    functions (LoRA patches in low-VRAM mode) — with the offloaded buffers released afterwards.
    A plain ``nn.Linear`` (not a comfy.ops layer) gives its own tensors."""
    import comfy.ops

    if not hasattr(module, "comfy_cast_weights"):
        yield module.weight, module.bias
        return
    every_op = getattr(comfy.ops, "run_every_op", None)
    if every_op is not None:
        every_op()  # ComfyUI's interrupt check, as in its Linear.forward
    context = getattr(comfy.ops, "CastBiasWeightContext", None)
    if context is not None:
        with context(module, x, offloadable=True) as (weight, bias):
            yield weight, bias
    else:  # older ComfyUI: cast_bias_weight returns (weight, bias)
        yield comfy.ops.cast_bias_weight(module, x)[:2]


def _comfy_checkpointing():
    """ComfyUI's own gradient-checkpointing helpers (from its LoRA trainer), with a clear error
    where this ComfyUI lacks them."""
    try:
        from comfy_extras.nodes_train import find_modules_at_depth, patch, unpatch
    except (ImportError, AttributeError) as exc:
        raise BaseModelError(
            "Gradient checkpointing on ComfyUI uses the helpers of ComfyUI's built-in trainer "
            f"(comfy_extras.nodes_train: find_modules_at_depth, patch, unpatch), which this ComfyUI lacks "
            f"({exc}). Update ComfyUI (tested: 0.33.0) or turn gradient checkpointing off."
        ) from None
    return find_modules_at_depth, patch, unpatch
