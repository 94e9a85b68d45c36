"""Compact concepts: file size, relative error of the deltas and the effect on the UNet's output
for truncated-SVD compression at several ranks / energy shares.

    python benchmarks/bench_compress.py --concept my_dog.safetensors --base ./stable-diffusion-v1-5
    python benchmarks/bench_compress.py --model sd15 --train-steps 20     # random SD1.5-shaped UNet

Without --concept it trains a concept for a few steps on a random-weight model (tiny or
SD1.5-shaped) at 64 px: such deltas are close to the first Adam steps' ~sign(gradient) pattern and
compress worse than deltas of a real 500-step run; the numbers show the mechanics and the sizes.
Output effect = ‖ε_compressed − ε_full‖ / ‖ε_full − ε_base‖ on a fixed random input (0 = the
compressed concept acts exactly like the full one; 1 = as far off as having no concept).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept")
    parser.add_argument("--base", help="diffusers folder or single file (with --concept)")
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--ranks", default="1,4,16,64")
    parser.add_argument("--energies", default="0.5,0.9,0.99")
    args = parser.parse_args()

    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.concept import compress_concept, load_concept
    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.hosts.diffusers_host import DiffusersHost, load_components
    from classdiffusion.model.tiny import build_tokenizer
    from classdiffusion.run.train import train
    from bench_train import build_models, images

    tmp = Path(tempfile.mkdtemp())
    if args.concept:
        components = load_components(args.base)
        concept_path = Path(args.concept)
    else:
        torch.manual_seed(0)
        components = build_models(args.model, build_tokenizer(tmp / "tok"), torch.float32)
        host = DiffusersHost(*components, device="cpu")
        config = TrainConfig(steps=args.train_steps, resolution=64)
        concept_path = train(host, [ConceptSpec(token="<sks>", class_word="dog")], config, images=[images()],
                             out=tmp / "concept.safetensors").path
        host.close()
    unet = components[2].float().eval()
    full = load_concept(concept_path)
    gen = torch.Generator().manual_seed(0)
    side = int(unet.config.sample_size)
    x = torch.randn(1, 4, side, side, generator=gen)
    ctx = torch.randn(1, 77, 768, generator=gen)
    t = torch.tensor([500])

    def output(concept=None):
        with torch.no_grad():
            handle = apply_concept(unet, concept, strict=False) if concept is not None else None
            out = unet(x, t, encoder_hidden_states=ctx).sample
            if handle is not None:
                handle.remove()
        return out

    base_out, full_out = output(), output(full)
    effect = float((full_out - base_out).norm())
    print(f"concept {concept_path.name}: {concept_path.stat().st_size / 2**20:.2f} MiB, {len(full.deltas)} layers")
    print("| setting | file MiB | ranks (min–max) | delta error max / mean | output effect |")
    print("|---|---|---|---|---|")
    settings = [("rank", int(r)) for r in args.ranks.split(",") if r] + \
               [("energy", float(e)) for e in args.energies.split(",") if e]
    for kind, value in settings:
        compressed, stats = compress_concept(full, **{kind: value})
        path = compressed.save(tmp / f"{kind}{value}.safetensors")
        ranks = [s["rank"] for s in stats.values()]
        errors = [s["relative_error"] for s in stats.values()]
        diff = float((output(load_concept(path)) - full_out).norm()) / effect
        print(f"| {kind} {value} | {path.stat().st_size / 2**20:.2f} | {min(ranks)}–{max(ranks)} | "
              f"{max(errors):.3f} / {sum(errors) / len(errors):.3f} | {diff:.4f} |")


if __name__ == "__main__":
    main()
