"""Tiny random-weight SD1.5-shaped models and an offline CLIP-style tokenizer.

For tests, the ``demo`` command and benchmarks on machines without real weights: the shapes that
matter (768-wide text context, 4-channel latents, ×8 VAE, ε-prediction, SD1.5's noise schedule)
are SD1.5's, everything else is small. The weights are random: nothing generated with them means
anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch

#: Words the tiny tokenizer knows as single tokens (prompt words, class words, initializers).
TINY_WORDS = """
a an the of in on at with and or is are to for by from photo picture image painting drawing render
far away very small zoomed close up wearing headphones hat sunglasses scarf swimming pool beach
sitting front barn grass snow city street forest mountain table floor sofa bed water river sky
dog cat puppy toy teddy bear backpack bag cup mug vase shoe sneaker robot car bike person man woman
face boy girl bird horse flower tree house castle clock lamp chair book can bottle candle glasses
red blue green yellow black white brown orange purple pink gray
beautiful happy sad tall short bright dark big young old fast slow warm cold soft hard heavy light
strong weak good bad rich poor thick thin expensive cheap quiet loud clean dirty smart stupid
interesting boring new safe dangerous healthy sick easy difficult right wrong high low near early
late wet dry busy free careful careless friendly unfriendly important unimportant famous unknown
excited calm serious funny tired energetic style art oil watercolor sketch ktn pll ucd sks
""".split()


def learn_merges(words: Iterable[str], suffix: str = "</w>") -> list[tuple[str, str]]:
    """BPE merges that make every word one token, learned deterministically.

    The rule is the Hugging Face ``BpeTrainer``'s (most frequent adjacent pair first, a word's last
    symbol carries ``suffix``), with its ties broken by symbol order rather than by hash-map
    iteration: the trainer numbered the end-of-word symbols in a per-process random order, so about
    two builds in five ordered two tied merges differently and a rebuilt tokenizer's ids differed from
    the committed toy base's. Symbols are numbered characters first (sorted), then end-of-word
    symbols in the order the sorted words meet them, then merges as they are made; a tie goes to
    the pair with the smaller numbers. The committed toy tokenizer is this rule's output.
    """
    words = sorted({w.lower() for w in words})
    symbols = sorted({c for w in words for c in w})
    number = {s: i for i, s in enumerate(symbols)}
    pieces = []
    for word in words:
        pieces.append([c + suffix if i == len(word) - 1 else c for i, c in enumerate(word)])
        number.setdefault(pieces[-1][-1], len(number))
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for piece in pieces:
            for pair in zip(piece, piece[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        left, right = min(counts, key=lambda p: (-counts[p], number[p[0]], number[p[1]]))
        merges.append((left, right))
        number.setdefault(left + right, len(number))
        for piece in pieces:
            i = 0
            while i < len(piece) - 1:
                if piece[i] == left and piece[i + 1] == right:
                    piece[i:i + 2] = [left + right]
                i += 1


def build_tokenizer(out_dir: str | Path, words: Iterable[str] = TINY_WORDS) -> Path:
    """A CLIP-format BPE tokenizer (vocab.json + merges.txt) whose vocabulary covers every byte
    and has each of ``words`` as one token. Loadable with ``CLIPTokenizer.from_pretrained``."""
    from tokenizers import pre_tokenizers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # CLIP's 256 byte symbols
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(vocab_list)
    for left, right in merges:
        merged = left + right
        if merged not in seen:
            seen.add(merged)
            vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return out_dir


def tiny_components(tokenizer_dir: str | Path, seed: int = 0, *, unet_channels: Sequence[int] = (32, 64),
                    text_layers: int = 2):
    """(tokenizer, text_encoder, unet, vae, scheduler) with random weights, SD1.5-shaped where it counts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=256, num_attention_heads=4,
        num_hidden_layers=text_layers, max_position_embeddings=77, projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu",
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("UpBlock2D",) * (len(unet_channels) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    return tokenizer, text_encoder, unet, vae, scheduler


def portable_text_encoder_keys(folder: str | Path) -> None:
    """Give a saved CLIP text encoder the ``text_model.`` key prefix of real SD1.5 folders.

    transformers 5 saves ``CLIPTextModel`` without it, and transformers 4 then finds none of its
    weights (it would load a random encoder); with the prefix, both read the file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        outside = ("text_model.", "text_projection.")  # the projection sits beside text_model (bigG)
        if all(key.startswith(outside) for key in tensors):
            continue
        renamed = {key if key.startswith(outside) else "text_model." + key: t for key, t in tensors.items()}
        save_file(renamed, str(path), metadata=metadata)


def build_tiny_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD1.5-like base in diffusers layout (loadable by ``load_host``)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tokenizer_dir = build_tokenizer(out_dir / "tokenizer")
    tokenizer, text_encoder, unet, vae, scheduler = tiny_components(tokenizer_dir, seed)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    portable_text_encoder_keys(out_dir / "text_encoder")
    (out_dir / "RANDOM_WEIGHTS.txt").write_text(
        "This base has random weights (ClassDiffusion demo/tests). Nothing it generates means anything.\n"
    )
    return out_dir


def tiny_sdxl_components(tokenizer_dir: str | Path, seed: int = 0, *, unet_channels: Sequence[int] = (32, 64),
                         text_layers: int = 2) -> dict:
    """SDXL-shaped random components by name (as ``load_base_components`` returns them): CLIP-L
    768 wide and bigG 1280 wide with its 1280 projection (few layers, narrow MLPs), a UNet with
    SDXL's 2048-wide context, linear transformer projections and "text_time" added conditioning
    (pooled 1280 + six 256-wide size/crop embeddings = SDXL's 2816), SDXL's VAE scaling."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir), pad_token="!")  # SDXL's bigG pads with "!"
    torch.manual_seed(seed)

    def text_config(width: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=256, num_attention_heads=4,
            num_hidden_layers=text_layers, max_position_embeddings=77, projection_dim=width,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, hidden_act=act)

    text_encoder = CLIPTextModel(text_config(768, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(1280, "gelu"))
    levels = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        transformer_layers_per_block=tuple(range(1, levels + 1)), cross_attention_dim=2048,
        attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=8, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    return {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2, "unet": unet, "vae": vae, "scheduler": scheduler}


def build_tiny_sdxl_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL-shaped base in diffusers layout (loadable by ``load_host``)."""
    from diffusers import StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    tokenizer_dir = build_tokenizer(out_dir / "_tokenizer_source")
    parts = tiny_sdxl_components(tokenizer_dir, seed)
    pipe = StableDiffusionXLPipeline(**parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(tokenizer_dir)
    for folder in ("text_encoder", "text_encoder_2"):
        portable_text_encoder_keys(out_dir / folder)
    (out_dir / "RANDOM_WEIGHTS.txt").write_text(
        "A tiny SDXL-shaped base with random weights (ClassDiffusion demo/tests). Nothing it generates means anything.\n"
    )
    return out_dir


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel + CLIPProcessor in Hugging Face layout (for the image metrics'
    tests and demos: same classes and loading path as openai/clip-vit-large-patch14)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out_dir = Path(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(build_tokenizer(out_dir / "_tokenizer")))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def build_tiny_dino(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random ViTModel + ViTImageProcessor in Hugging Face layout (like facebook/dino-vits16)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(out_dir, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out_dir)
    return out_dir
