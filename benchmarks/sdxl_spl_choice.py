"""How SPL should join SDXL's two text encoders: the mean of each encoder's 1 − cos, or 1 − cos of
the features side by side — measured on semantic drift.

    python benchmarks/sdxl_spl_choice.py --steps 150 --seeds 0,1,2 --out docs/sdxl_spl_choice.json

Trains the same concept on the tiny SDXL-shaped base (``classdiffusion.model.tiny``; random weights at the
real text widths: CLIP-L 768, bigG 1280) with λ = 0 (Custom Diffusion), SPL "mean" and SPL "concat",
and reports after training, per encoder, cos(E("a photo of a <sks> dog"), E("a photo of a dog"))
at the end-of-text token and the drift rank of "a <sks> dog" among the adjective phrases by each
encoder's features and by both together (1 = closest to "a dog"; ``evaluation.drift``). What
this can and cannot say: the encoders here are random, so it measures how each loss distributes
its pull over the two encoders, not what a real SDXL's semantics do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"none (λ = 0)": dict(spl_weight=0.0), "mean": dict(spl_encoders="mean"),
            "concat": dict(spl_encoders="concat")}


def encoder_drift(host, token_vector: torch.Tensor, class_word: str) -> dict:
    """Per encoder (and both): cos of the token phrase to the class phrase, and the drift rank."""
    from classdiffusion.evaluation.drift import ADJECTIVES, PHRASE

    widths = host.text.widths
    vectors = {"<sks>": token_vector}
    adjectives = [PHRASE.format(adjective, class_word) for adjective in ADJECTIVES]
    with torch.no_grad():
        token = host.encode_text([f"a <sks> {class_word}"], vectors, eos_only=True).eos.float()
        photo = host.encode_text([f"a photo of a <sks> {class_word}"], vectors, eos_only=True).eos.float()
        base = host.encode_text([f"a {class_word}", f"a photo of a {class_word}"], {}, eos_only=True).eos.float()
        others = host.encode_text(adjectives, {}, eos_only=True).eos.float()
    out = {}
    parts = {"clip_l": slice(0, widths[0]), "clip_g": slice(widths[0], None), "both": slice(None)}
    for name, part in parts.items():
        cos = torch.nn.functional.cosine_similarity
        closeness = cos(others[:, part], base[:1, part]).tolist()
        mine = float(cos(token[:, part], base[:1, part]))
        out[name] = {"cos_photo_phrase": float(cos(photo[:, part], base[1:, part])),
                     "rank": 1 + sum(c > mine for c in closeness), "of": len(closeness) + 1}
    return out


def run(steps: int, seeds: list[int], learning_rate: float) -> dict:
    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.model.tiny import build_tiny_sdxl_base
    from classdiffusion.toyworld.evaluate import instance_pictures
    from classdiffusion.run.train import train

    work = Path(tempfile.mkdtemp())
    base = build_tiny_sdxl_base(work / "base")
    pictures = instance_pictures("red_blue_star")
    results = {}
    for variant, settings in VARIANTS.items():
        rows = []
        for seed in seeds:
            host = load_host(base, device="cpu")
            config = TrainConfig(steps=steps, resolution=64, seed=seed, learning_rate=learning_rate,
                                 drift_every=steps, **settings)
            result = train(host, [ConceptSpec(token="<sks>", class_word="dog")], config, images=[pictures])
            rows.append({"seed": seed, **encoder_drift(host, result.concept.token_vectors[0], "dog"),
                         "recon_last": result.concept.history[-1]["recon"]})
            host.close()
        summary = {}
        for part in ("clip_l", "clip_g", "both"):
            summary[part] = {key: statistics.mean(r[part][key] for r in rows) for key in ("cos_photo_phrase", "rank")}
        results[variant] = {"runs": rows, "mean": summary}
    return {"steps": steps, "seeds": seeds, "learning_rate": learning_rate, "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=1e-4, help="base learning rate (× batch 2)")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    report = run(args.steps, [int(s) for s in args.seeds.split(",")], args.lr)
    print("| SPL | cos L | cos G | rank L | rank G | rank both |")
    print("|---|---|---|---|---|---|")
    for variant, result in report["results"].items():
        m = result["mean"]
        print(f"| {variant} | {m['clip_l']['cos_photo_phrase']:.4f} | {m['clip_g']['cos_photo_phrase']:.4f} | "
              f"{m['clip_l']['rank']:.1f} | {m['clip_g']['rank']:.1f} | {m['both']['rank']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
