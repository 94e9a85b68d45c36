"""What the memory planner picks at full model size, per GPU memory: the table in the README.

    python benchmarks/memory_plans.py --family sdxl --resolution 1024 --cards 8,12,16,24

Builds the family's full-size models on PyTorch's ``meta`` device (SDXL: the 2.6 B UNet, CLIP-L and
bigG, the VAE; shapes only, no memory, no weights needed), loaded in the run's precision as the
command line loads them, and asks the planner (``memory="auto"``) for each card size: the settings it
picks (gradient checkpointing, batch × accumulation) and the estimated peak, or that nothing fits.
The estimate is the same code a run uses; it is checked against a real step at small shapes by
tests/test_memory.py (SD1.5) and tests/test_sdxl.py (SDXL). A card's free memory is taken as its size
minus ``--reserved-gib`` (CUDA context, other processes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classdiffusion.config import TrainConfig  # noqa: E402
from classdiffusion.errors import InvalidInputError  # noqa: E402
from classdiffusion.run.memory import HEADROOM, SD15_UNET, estimate, plan  # noqa: E402
from classdiffusion.methods import method_class  # noqa: E402
from classdiffusion.model.precision import precision_dtype  # noqa: E402

#: stabilityai/stable-diffusion-xl-base-1.0's UNet config (the keys that shape it).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                  "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
#: CLIP-L (SD1.x, SDXL's first encoder) and OpenCLIP bigG (SDXL's second), as transformers configs.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
FAMILY_MODELS = {"sd15": (SD15_UNET, [CLIP_L]), "sdxl": (SDXL_UNET, [CLIP_L, CLIP_G])}


def meta_host(family: str, dtype: torch.dtype):
    """A DiffusersHost over full-size models of ``family`` on the meta device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from classdiffusion.hosts.diffusers_host import DiffusersHost
    from classdiffusion.model.tiny import build_tokenizer

    unet_config, text_configs = FAMILY_MODELS[family]
    tokenizer_dir = build_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    tokenizers = [CLIPTokenizer.from_pretrained(str(tokenizer_dir)) for _ in text_configs]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).to(dtype)
        encoders = [(CLIPTextModelWithProjection if k else CLIPTextModel)(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)).to(dtype)
            for k, config in enumerate(text_configs)]
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).to(dtype)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    second = {"tokenizer_2": tokenizers[1], "text_encoder_2": encoders[1]} if len(encoders) > 1 else {}
    return DiffusersHost(tokenizers[0], encoders[0], unet, vae, scheduler, device="meta", **second)


def plans(family: str, cards_gib: list[float], *, resolution: int, mixed_precision: str, method: str = "classdiffusion",
          images: int = 5, reserved_gib: float = 0.5) -> list[dict]:
    """One row per card: the plan ``memory="auto"`` picks, or why nothing fits."""
    host = meta_host(family, precision_dtype(mixed_precision))
    config = TrainConfig.for_method(method, resolution=resolution, mixed_precision=mixed_precision, memory="auto")
    method_type = method_class(method)

    def estimate_for(candidate: TrainConfig):
        return estimate(host, candidate, method_type, images=images, class_images=0, concepts=1)

    rows = []
    for card in cards_gib:
        available = int((card - reserved_gib) * 2 ** 30)
        row = {"family": family, "card_gib": card, "resolution": resolution, "mixed_precision": mixed_precision,
               "method": method}
        try:
            chosen = plan(estimate_for, config, available)
        except InvalidInputError as exc:
            row.update(fits=False, reason=str(exc).split(":")[0])
        else:
            picked = chosen.config
            row.update(fits=True, gradient_checkpointing=picked.gradient_checkpointing, batch_size=picked.batch_size,
                       gradient_accumulation=picked.gradient_accumulation,
                       estimate_gib=round(chosen.estimate.total / 2 ** 30, 2),
                       parts_mib={k: round(getattr(chosen.estimate, k) / 2 ** 20) for k in
                                  ("resident", "latents", "trained", "step")})
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| card | plan at {} px, {} | estimated peak |".format(rows[0]["resolution"], rows[0]["mixed_precision"]),
             "|---|---|---|"]
    for row in rows:
        if row["fits"]:
            how = ("gradient checkpointing, " if row["gradient_checkpointing"] else "") + \
                  f"batch {row['batch_size']} × {row['gradient_accumulation']} accumulated"
            lines.append(f"| {row['card_gib']:g} GB | {how} | {row['estimate_gib']:.1f} GiB |")
        else:
            lines.append(f"| {row['card_gib']:g} GB | does not fit (even batch 1 with checkpointing) | — |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILY_MODELS), default="sdxl")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--cards", default="8,12,16,24", help="GPU memory sizes in GB, comma-separated")
    parser.add_argument("--mixed-precision", default="fp16", choices=["fp16", "bf16", "no"])
    parser.add_argument("--method", default="classdiffusion")
    parser.add_argument("--reserved-gib", type=float, default=0.5)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = plans(args.family, [float(c) for c in args.cards.split(",")], resolution=args.resolution,
                 mixed_precision=args.mixed_precision, method=args.method, reserved_gib=args.reserved_gib)
    print(markdown(rows))
    print(f"(a plan uses at most {HEADROOM:.0%} of the free memory; free = card − {args.reserved_gib} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
