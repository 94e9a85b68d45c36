"""Write a small SD1.5-shaped random checkpoint that ComfyUI's CheckpointLoaderSimple loads as SD15
(``--sdxl``: a small SDXL-family one it loads as SDXL).

Run with ComfyUI's Python from the ComfyUI folder:  python make_checkpoint.py OUT.safetensors
UNet: 320 channels, 768-wide context, one level (ComfyUI detects SD1.5 from 320/768); CLIP-L and
the VAE are full size (the stock loader needs them). Random weights: the images mean nothing.
The components are built with diffusers/transformers (proper random init) and written by
ComfyUI's own ``save_checkpoint``, so the file has ComfyUI's single-file layout.
"""

import json
import os
import sys

import torch


def full_sd15_unet_state_dict(comfy_sd, seed: int) -> dict:
    """A random UNet with SD1.5's full architecture (needed where other packs inject into its
    blocks, e.g. AnimateDiff), built by diffusers and converted by ComfyUI's own loader."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    patcher = comfy_sd.load_diffusion_model_state_dict({k: v.half() for k, v in unet.state_dict().items()})
    return patcher.model.diffusion_model.state_dict()


def checkpoint_state_dict(seed: int = 0, full: bool = False) -> dict:
    """The checkpoint's tensors in ComfyUI's single-file layout, fp16 (ComfyUI must be imported)."""
    import comfy.sd
    import comfy.utils
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
        channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
        transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
        use_linear_in_transformer=False, legacy=False, operations=comfy.ops.disable_weight_init,
    )
    _sane_init(unet)
    clip_config = json.load(open(os.path.join("comfy", "sd1_clip_config.json")))
    clip_config.pop("architectures", None)
    text = CLIPTextModel(CLIPTextConfig(**clip_config))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v.half()
               for k, v in text.state_dict().items()}
    clip = comfy.sd.load_text_encoder_state_dicts([text_sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae_model = comfy.sd.VAE(sd={k: v.half() for k, v in vae.state_dict().items()})

    config = comfy.supported_models.SD15({"context_dim": 768, "model_channels": 320})
    unet_sd = full_sd15_unet_state_dict(comfy.sd, seed) if full else unet.state_dict()
    sd = config.process_unet_state_dict_for_saving({k: v.half() for k, v in unet_sd.items()})
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict_for_saving()))
    sd.update(config.process_vae_state_dict_for_saving(vae_model.get_sd()))
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _sane_init(module) -> None:
    """ComfyUI's layers skip initialisation: give every weight a sane random value."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name and param.ndim == 1:
                param.fill_(1.0)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else 1
                param.normal_(0.0, fan_in ** -0.5)


def sdxl_checkpoint_state_dict(seed: int = 0) -> dict:
    """A small SDXL-family checkpoint ComfyUI detects by itself as SDXL (its KOALA-700M entry, a
    subclass of SDXL: 320 channels, 2048-wide context, 2816-wide added conditioning, transformer
    depths [0, 2, 5] and 5 in the middle, one block per level, channels ×1 at every level to stay small), with the
    full-size CLIP-L and OpenCLIP bigG ComfyUI's SDXL CLIP needs and a full-size VAE."""
    import comfy.sd
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
        channel_mult=[1, 1, 1], num_head_channels=64, use_spatial_transformer=True, transformer_depth=[0, 2, 5],
        transformer_depth_middle=5, transformer_depth_output=[0, 0, 2, 2, 5, 5], context_dim=2048,
        use_linear_in_transformer=True, legacy=False, num_classes="sequential", adm_in_channels=2816,
        operations=comfy.ops.disable_weight_init,
    )
    _sane_init(unet)
    texts = []
    for config_file, model_class in (("sd1_clip_config.json", CLIPTextModel),
                                     ("clip_config_bigg.json", CLIPTextModelWithProjection)):
        config = json.load(open(os.path.join("comfy", config_file)))
        config.pop("architectures", None)
        text = model_class(CLIPTextConfig(**config))
        texts.append({(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.half()
                      for k, v in text.state_dict().items()})
        del text
    clip = comfy.sd.load_text_encoder_state_dicts(texts, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae_model = comfy.sd.VAE(sd={k: v.half() for k, v in vae.state_dict().items()})
    config = comfy.supported_models.KOALA_700M({"context_dim": 2048, "model_channels": 320, "adm_in_channels": 2816})
    sd = config.process_unet_state_dict_for_saving({k: v.half() for k, v in unet.state_dict().items()})
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict_for_saving()))
    sd.update(config.process_vae_state_dict_for_saving(vae_model.get_sd()))
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def main(out_path: str, seed: int = 0, full: bool = False, sdxl: bool = False) -> None:
    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no GPU needed to write a file
    import comfy.utils

    state = sdxl_checkpoint_state_dict(seed) if sdxl else checkpoint_state_dict(seed, full)
    comfy.utils.save_torch_file(state, out_path)


if __name__ == "__main__":
    numbers = [a for a in sys.argv[2:] if not a.startswith("--")]
    main(sys.argv[1], int(numbers[0]) if numbers else 0, full="--full" in sys.argv, sdxl="--sdxl" in sys.argv)
