"""The toy base: SD1.5's architecture classes at toy sizes, pretrained on the toy world.

CLIPTextModel (768 wide, as the trainer's SD1.5 checks want) with a CLIP-format tokenizer of the
world's words, AutoencoderKL with SD1.5's ×8 reduction (64 px pictures → 8×8×4 latents),
UNet2DConditionModel with cross-attention on the text tower's last hidden states, SD1.5's noise
schedule. :func:`component_configs` fixes the shapes; tools/pretrain_toyworld.py trains them.
"""

from __future__ import annotations

from pathlib import Path

#: Picture size of the toy base (the ×8 VAE gives 8×8 latents: cheap enough to pretrain on 2 CPU cores).
RESOLUTION = 64


def world_words() -> list[str]:
    """Every word a toy-world caption or prompt uses, the methods' templates included (the
    tokenizer keeps each one whole; CLIP's pre-tokenizer splits "close-up" at its hyphen)."""
    import re

    from .world import ADDON_WORDS, CAPTION_FORMS, CLASSES, COLOURS, PATTERNS, SCENES, SIZES

    words = {"a", "photo", "of", "the", "ktn", "sks"} | set(CLASSES) | set(COLOURS) | set(PATTERNS) | set(SIZES)
    for phrase in [s[3] for s in SCENES.values()] + list(ADDON_WORDS.values()) + list(CAPTION_FORMS):
        words |= set(re.findall(r"[a-z]+|[^\sa-z{}]", phrase.lower()))
    return sorted(words)


def build_world_tokenizer(out_dir: str | Path) -> Path:
    from ..model.tiny import build_tokenizer

    return build_tokenizer(out_dir, world_words())


#: The VAE's channels per level (four levels: SD1.5's ×8 reduction).
VAE_CHANNELS = (16, 32, 64, 64)


def make_components(tokenizer_dir: str | Path, seed: int = 0, *, vae_channels=VAE_CHANNELS):
    """(tokenizer, text_encoder, unet, vae, scheduler), freshly initialised at the toy sizes
    (``vae_channels``: another VAE width, for calibration runs)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=tuple(vae_channels), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1)
    return tokenizer, text_encoder, unet, vae, scheduler


def make_clip(tokenizer, text_encoder=None, seed: int = 0):
    """The toy CLIP: ``text_encoder``'s tower (or a fresh one of the same shape) and a small ViT
    on 64 px pictures, projected to one space (a transformers CLIPModel, so the evaluation code
    loads it like a real CLIP)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = text_encoder.config.to_dict() if text_encoder is not None else text_config(tokenizer)
    config = CLIPConfig(text_config=text, vision_config=dict(
        image_size=64, patch_size=8, hidden_size=192, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, projection_dim=256, hidden_act="quick_gelu"), projection_dim=256)
    clip = CLIPModel(config)
    if text_encoder is not None:
        text_tower(clip).load_state_dict(text_tower(text_encoder).state_dict())
    return clip


def text_config(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=512, num_attention_heads=8,
                num_hidden_layers=2, max_position_embeddings=77, projection_dim=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu")


def text_tower(model):
    """The text transformer inside a CLIPModel or a CLIPTextModel (transformers 4 nests it as
    ``text_model``; 5 makes CLIPTextModel the tower itself)."""
    return getattr(model, "text_model", model)


#: Where the committed weights live (package data: a wheel install has them too).
WEIGHTS = Path(__file__).resolve().parent / "weights"
#: The toy CLIP's parts other than its text tower (which is the base's text encoder, not stored twice).
CLIP_EXTRA_FILE = "clip_image_tower.safetensors"
CLIP_CONFIG_FILE = "clip_config.json"


def base_path(weights: str | Path = WEIGHTS) -> Path:
    """The committed toy base: a diffusers Stable Diffusion folder (fp16) that every host loads."""
    path = Path(weights) / "base"
    if not (path / "model_index.json").is_file():
        from ..errors import BaseModelError

        raise BaseModelError(f"The toy base is not at {path}: reinstall the package, or build it with "
                             "`python tools/pretrain_toyworld.py vae|clip|unet` from a clone.")
    return path


def split_clip(clip, out_dir: str | Path) -> None:
    """Store the toy CLIP without its text tower: the tower is the base's frozen text encoder."""
    import json

    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in clip.state_dict().items()
               if not k.startswith("text_model.")}
    save_file(tensors, str(out_dir / CLIP_EXTRA_FILE))
    (out_dir / CLIP_CONFIG_FILE).write_text(json.dumps(clip.config.to_dict(), indent=2, sort_keys=True) + "\n")


class ToyClip:
    """The toy CLIP as an evaluation scorer (CLIP-I, CLIP-T on the toy world), with the input
    handling its pretraining used: 64 px pictures in [-1, 1], captions in the world tokenizer."""

    def __init__(self, weights: str | Path = WEIGHTS, device: str = "cpu"):
        import json

        import torch
        from safetensors.torch import load_file
        from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

        weights = Path(weights)
        base = base_path(weights)
        config = CLIPConfig.from_dict(json.loads((weights / CLIP_CONFIG_FILE).read_text()))
        self.model = CLIPModel(config)
        missing, unexpected = self.model.load_state_dict(load_file(str(weights / CLIP_EXTRA_FILE)), strict=False)
        assert not unexpected and all(k.startswith("text_model.") for k in missing), (missing, unexpected)
        text = CLIPTextModel.from_pretrained(str(base / "text_encoder"), torch_dtype=torch.float32)
        text_tower(self.model).load_state_dict(text_tower(text).state_dict())
        self.model = self.model.float().to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
        self.device = device

    def image_features(self, images):
        import torch

        from ..evaluation.image_metrics import _as_tensor
        from .checker import to_tensor

        pixels = to_tensor(images, 64).to(self.device)  # [-1, 1], as the toy CLIP was trained
        with torch.no_grad():
            return _as_tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    def text_features(self, prompts):
        import torch

        from ..evaluation.image_metrics import _as_tensor

        ids = self.tokenizer(list(prompts), padding="max_length", max_length=24, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return _as_tensor(self.model.get_text_features(input_ids=ids)).float().cpu()
