"""The toy base's validity gate: prompted with the held-out (class, colour, scene) combinations it
never saw in pretraining, does it draw the prompted class, colour and scene?

    python benchmarks/toyworld_validity.py [--base BASE_DIR] [--images 4] [--json F] [--grid F.png]

Every held-out triple is prompted as its caption ("a photo of a blue star on the beach") with
``--images`` seeds; the independent checker (classdiffusion/toyworld/checker.py, committed
weights) reads each picture. The gate: class, colour and scene each right on ≥ 80 % of the
pictures. The same is measured on as many seen combinations, for comparison. Exit status 0 when
the gate passes, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GATE = 0.8


def prompts_for(triples) -> list[tuple[str, dict]]:
    from classdiffusion.toyworld.world import Scene

    out = []
    for cls, colour, scene in triples:
        caption = Scene(cls, colour, "plain", "big", "middle", scene).caption()
        out.append((caption, {"cls": cls, "colour": colour, "scene": scene}))
    return out


def measure(pipe, checker, prompts, images: int, steps: int, guidance: float, seed: int) -> dict:
    """Accuracy of class, colour and scene over ``images`` pictures per prompt."""
    import torch

    hits = {"cls": 0, "colour": 0, "scene": 0}
    total, pictures = 0, []
    for k in range(images):
        generator = torch.Generator().manual_seed(seed + k)
        batch = pipe([p for p, _ in prompts], num_inference_steps=steps, guidance_scale=guidance,
                     generator=generator, height=64, width=64).images
        for (_, truth), reading in zip(prompts, checker.read(batch)):
            total += 1
            for name in hits:
                hits[name] += reading[name] == truth[name]
        pictures += batch
    return {"accuracy": {name: value / total for name, value in hits.items()}, "pictures": total,
            "_images": pictures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a toy base (a diffusers SD folder; default: the committed one)")
    parser.add_argument("--images", type=int, default=4, help="pictures per prompt (one seed each)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--grid", type=Path, help="save the held-out pictures as one PNG here")
    args = parser.parse_args()

    import numpy as np
    import torch

    from classdiffusion.generate import build_pipeline
    from classdiffusion.toyworld.checker import Checker
    from classdiffusion.toyworld.world import CLASSES, COLOURS, SCENES, held_out_combination, held_out_triples

    torch.set_num_threads(2)
    started = time.perf_counter()
    from classdiffusion.toyworld.base import base_path

    pipe = build_pipeline(args.base or base_path(), device="cpu")
    checker = Checker.load(REPO / "classdiffusion" / "toyworld" / "weights" / "checker.safetensors")
    held_out = held_out_triples()
    rng = np.random.default_rng(args.seed)
    seen_all = [(c, k, s) for c in CLASSES for k in COLOURS for s in SCENES if not held_out_combination(c, k, s)]
    seen = [seen_all[i] for i in rng.choice(len(seen_all), len(held_out), replace=False)]
    result = {"held_out": measure(pipe, checker, prompts_for(held_out), args.images, args.steps, args.guidance, args.seed),
              "seen": measure(pipe, checker, prompts_for(seen), args.images, args.steps, args.guidance, args.seed)}
    if args.grid:
        from PIL import Image

        pictures = result["held_out"]["_images"]
        columns = len(held_out)
        grid = Image.new("RGB", (64 * columns, 64 * args.images))
        for k, picture in enumerate(pictures):
            grid.paste(picture, ((k % columns) * 64, (k // columns) * 64))
        grid.save(args.grid)
    for part in result.values():
        part.pop("_images")
    result["gate"] = GATE
    result["passed"] = all(v >= GATE for v in result["held_out"]["accuracy"].values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["settings"] = {"images": args.images, "steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("gate " + ("PASSED" if result["passed"] else "NOT passed") + f" (each of class, colour, scene ≥ {GATE:.0%} "
          "on held-out combinations)")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
