"""The toy recipe search, on the tuning seed only: identity and joint composition of a concept
against training steps for a few learning rates (and, optionally, training pictures in several
scenes or all of attn2 trained), so the demo's recipe (classdiffusion/toyworld/demo.py: TOY_RECIPE and its
step count) is chosen on seed 0 and the table's seeds (1-3) stay unseen.

    python benchmarks/toyworld_recipe.py --rates 1e-4 3e-5 --steps 50 100 200 300 400 --json F
    python benchmarks/toyworld_recipe.py --scenes table beach snow --json F
    python benchmarks/toyworld_recipe.py --rates 1e-4 --train-mode crossattn --steps 100 200 400
    python benchmarks/toyworld_recipe.py --rates 1e-4 --initializer class --steps 200 400 800
    python benchmarks/toyworld_recipe.py --rates 1e-4 --spl-weight 0 --steps 400 --parts
    python benchmarks/toyworld_recipe.py --rates 1e-4 --instances yellow_purple_ball --grid DIR

Each (instance, learning rate) trains once to the last step with step checkpoints; every
listed step's checkpoint is scored (identity on "a photo of a <sks> CLASS", joint composition on
the six composition prompts), ClassDiffusion with λ = 1.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toyworld_table import CONCEPT_PARTS, run_curve  # noqa: E402

TUNING_SEED = 0  # never one of toyworld_table.TABLE_SEEDS
TUNING_INSTANCES = ("red_blue_star", "yellow_purple_ball", "pink_blue_box")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-4, 3e-5])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 300, 400])
    parser.add_argument("--instances", nargs="+", default=list(TUNING_INSTANCES))
    parser.add_argument("--spl-weight", type=float, default=1.0)
    parser.add_argument("--scenes", nargs="+", default=None, help="the training pictures' scenes, in turn (default: table)")
    parser.add_argument("--train-mode", default="kv", choices=("kv", "crossattn"),
                        help="crossattn: all of attn2 (more capacity: does K/V limit identity?)")
    parser.add_argument("--initializer", default=None,
                        help='the word that starts the token: "class" for the class word (default: the rare "ktn", '
                             "Custom Diffusion's)")
    parser.add_argument("--parts", action="store_true",
                        help="also score each checkpoint with only its token and with only its K/V deltas "
                             "(which part costs the class in composition?)")
    parser.add_argument("--class-images", type=int, default=0,
                        help="prior preservation (Custom Diffusion's own): N pictures of 'a photo of a CLASS' drawn "
                             "by the base, as class images (the learning rate ×2, as the official code does)")
    parser.add_argument("--grid", type=Path, default=None,
                        help="a folder: each run's pictures per scored step (identity prompt | grass with a hat)")
    parser.add_argument("--weights", type=Path, default=None, help="another toy-world weights folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from classdiffusion.toyworld.base import WEIGHTS

    if args.grid:
        args.grid.mkdir(parents=True, exist_ok=True)

    steps = tuple(sorted(args.steps))
    jobs = [{"instance": name, "seed": TUNING_SEED, "spl_weight": args.spl_weight, "steps": steps, "threads": 1,
             "weights": str(args.weights or WEIGHTS), "recipe": {"learning_rate": rate, "train_mode": args.train_mode},
             "scenes": args.scenes, "initializer": args.initializer,
             "parts": list(CONCEPT_PARTS) if args.parts else None, "class_images": args.class_images,
             "grid": str(args.grid / f"{name}-lr{rate:g}.png") if args.grid else None}
            for rate in args.rates for name in args.instances]
    started, rows = time.perf_counter(), []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for curve in pool.imap_unordered(run_curve, jobs):
            rows += curve
            print(f"{curve[0]['instance']} lr {curve[0]['learning_rate']:g}: "
                  + ", ".join(f"{r['step']}{' ' + r['part'] if 'part' in r else ''}: "
                              f"{r['identity']:.2f}/{r['composition_joint']:.2f}" for r in curve), flush=True)
    print("\n| learning rate | part | step | identity | joint composition | class read in composition |\n"
          "|---|---|---|---|---|---|")
    for rate in args.rates:
        for part in CONCEPT_PARTS if args.parts else ("both",):
            for step in steps:
                cell = [r for r in rows if r["learning_rate"] == rate and r["step"] == step
                        and r.get("part", "both") == part]
                print(f"| {rate:g} | {part} | {step} | {statistics.fmean(r['identity'] for r in cell):.3f} "
                      f"| {statistics.fmean(r['composition_joint'] for r in cell):.3f} "
                      f"| {statistics.fmean(r['composition_class'] for r in cell):.3f} |")
    seconds = time.perf_counter() - started
    print(f"{len(jobs)} runs in {seconds / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seconds": round(seconds, 1), "seed": TUNING_SEED,
                                         "spl_weight": args.spl_weight, "initializer": args.initializer,
                                         "class_images": args.class_images,
                                         "train_mode": args.train_mode, "weights": str(args.weights or WEIGHTS)},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
