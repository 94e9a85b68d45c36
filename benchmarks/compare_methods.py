"""ClassDiffusion vs Infusion on the same base and images: concept file size, text drift and
Infusion's own overfitting metrics (Latent Fisher divergence on prompts without the concept,
Wasserstein on images of the class-word prompts), side by side.

    python benchmarks/compare_methods.py [--steps 20] [--out DIR] [--json FILE]

Runs on the tiny random base (no weights needed), so the metric values show the mechanics, not
SD1.5's quality. The SD1.5-shaped file sizes come from a random UNet with SD1.5's config (its
shapes are all a file depends on). Step times: ``bench_train.py --variants ours,infusion``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sd15_file_sizes(out: Path) -> dict:
    """Bytes of an SD1.5-shaped Infusion (V and K+V) and ClassDiffusion concept, one history row."""
    from diffusers import UNet2DConditionModel

    from classdiffusion.concept import Concept
    from classdiffusion.model.kv import cross_attention_weights
    from classdiffusion.methods.infusion.residual import residual_modules

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    weights = cross_attention_weights(unet, "kv")
    sizes = {}
    history = [{"step": 1, "loss": 0.1, "recon": 0.1, "spl": 0.0, "cos": [], "lr": 0.01}]
    for target in ("v", "kv"):
        residuals = {m: torch.zeros(weights[f"{m}.weight"].shape[0]) for m in residual_modules(list(weights), target)}
        concept = Concept(deltas={}, token_vectors=torch.zeros(0, 768), tokens=[], class_words=["dog"],
                          residuals=residuals, meta={"history": history})
        path = concept.save(out / f"sd15_infusion_{target}.safetensors")
        sizes[f"infusion_{target}"] = {"bytes": path.stat().st_size,
                                       "values": sum(r.numel() for r in residuals.values())}
    deltas = {n: torch.zeros(w.shape) for n, w in weights.items()}
    concept = Concept(deltas=deltas, token_vectors=torch.zeros(1, 768), tokens=["<sks>"], class_words=["dog"],
                      meta={"history": [{**history[0], "cos": [0.9]}]})
    path = concept.save(out / "sd15_classdiffusion.safetensors")
    sizes["classdiffusion"] = {"bytes": path.stat().st_size, "values": sum(d.numel() for d in deltas.values()) + 768}
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from PIL import Image

    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.evaluation.report import evaluate
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.model.tiny import build_tiny_base
    from classdiffusion.run.train import train

    out = Path(args.out or tempfile.mkdtemp(prefix="compare_methods_"))
    out.mkdir(parents=True, exist_ok=True)
    base = build_tiny_base(out / "base", seed=0)
    rng = np.random.default_rng(0)
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(folder / f"dog{i}.png")
    spec = ConceptSpec(token="<sks>", class_word="dog", images=[str(folder)])
    configs = {
        "classdiffusion": TrainConfig(steps=args.steps, resolution=64),
        "infusion": TrainConfig.for_method("infusion", steps=args.steps, resolution=64),
    }
    results: dict = {"tiny": {}, "sd15_file_sizes": sd15_file_sizes(out)}
    for method, config in configs.items():
        path = out / f"{method}.safetensors"
        result = train(load_host(base, device="cpu"), [spec], config, out=path)
        report = evaluate(base, [path], out / f"eval_{method}", device="cpu", num_images=2, steps=10, size=64,
                          fisher_steps=10, prompts_file=None)
        drift = report["drift"][0] if report["drift"] else None
        results["tiny"][method] = {
            "file_bytes": path.stat().st_size,
            "final_loss": result.concept.history[-1]["loss"],
            "latent_fisher_divergence": report["latent_fisher_divergence"]["value"],
            "fisher_per_prompt": report["latent_fisher_divergence"]["per_prompt"],
            "wasserstein": report.get("wasserstein", {}).get("value"),
            "drift_rank": None if drift is None else f"{drift['before']['rank']} → {drift['after']['rank']}/"
                                                      f"{drift['after']['total']}",
        }
    lines = ["| method | file (tiny) | file (SD1.5-shaped) | drift rank | Latent Fisher | Wasserstein |",
             "|---|---|---|---|---|---|"]
    sizes = results["sd15_file_sizes"]
    for method, row in results["tiny"].items():
        sd15 = sizes["infusion_v" if method == "infusion" else "classdiffusion"]
        lines.append(f"| {method} | {row['file_bytes'] / 1024:.1f} KB | {sd15['bytes'] / 1024:.1f} KB "
                     f"({sd15['values']:,} values) | {row['drift_rank'] or 'no token: none'} | "
                     f"{row['latent_fisher_divergence']:.4g} | "
                     f"{row['wasserstein'] if row['wasserstein'] is None else format(row['wasserstein'], '.4g')} |")
    lines.append(f"(Infusion K+V, SD1.5-shaped: {sizes['infusion_kv']['bytes'] / 1024:.1f} KB)")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
