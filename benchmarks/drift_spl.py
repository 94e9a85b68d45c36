"""The paper's claim at small scale: with SPL (λ = 1) the token drifts less from its class than
without (λ = 0, Custom Diffusion), measured by the drift rank among the 71 adjective phrases, the
EOS cosine, and Infusion's Latent Fisher divergence on prompts without the concept.

    python benchmarks/drift_spl.py [--base DIR] [--images DIR] [--steps 200] [--lr 1e-4]

Without --base it builds the tiny random base and synthetic images of the demo: the numbers then
show the mechanism, not SD1.5's behaviour.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from classdiffusion.config import ConceptSpec, TrainConfig
from classdiffusion.toyworld.demo import synthetic_images
from classdiffusion.evaluation.image_metrics import GENERIC_PROMPTS
from classdiffusion.evaluation.overfitting import latent_fisher_divergence
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.model.tiny import build_tiny_base
from classdiffusion.run.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base")
    parser.add_argument("--images")
    parser.add_argument("--class-word", default="toy")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    base = Path(args.base) if args.base else build_tiny_base(work / "base")
    images = args.images or str(synthetic_images(work / "images")[0].parent)
    rows = []
    for spl_weight in (0.0, 1.0):
        host = load_host(base, device=args.device)
        spec = ConceptSpec(token="<sks>", class_word=args.class_word, images=[images])
        config = TrainConfig(steps=args.steps, learning_rate=args.lr, spl_weight=spl_weight, seed=args.seed,
                             resolution=args.resolution, drift_every=max(1, args.steps // 10))
        start = time.perf_counter()
        concept = train(host, [spec], config).concept
        seconds = time.perf_counter() - start
        fisher = latent_fisher_divergence(host, concept.deltas, list(GENERIC_PROMPTS), steps=10,
                                          latent_size=args.resolution // 8)
        before, after = concept.meta["drift_initial"][0], concept.meta["drift_final"][0]
        rows.append({"spl_weight": spl_weight, "cos_before": round(before["cosine"], 4),
                     "cos_after": round(after["cosine"], 4), "rank_before": f"{before['rank']}/{before['total']}",
                     "rank_after": f"{after['rank']}/{after['total']}",
                     "rank_curve": [h["drift_rank"][0] for h in concept.history if h.get("drift_rank")],
                     "latent_fisher_divergence": round(fisher.value, 6), "train_seconds": round(seconds, 1)})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
