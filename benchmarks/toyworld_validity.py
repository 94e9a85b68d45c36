"""The toy base's validity gate: does the base draw what the evaluation's own prompt forms ask
for, and does its VAE keep every instance's look?

    python benchmarks/toyworld_validity.py [--base BASE_DIR] [--images 4] [--json F] [--grid F.png]

Prompt forms (each prompt with ``--images`` seeds; the independent checker reads every picture):

- **class only** — "a photo of a star" (every class): the class;
- **class + scene** — "a photo of a star on the beach" (every class × scene): class and scene;
- **class + add-on** — "a photo of a star wearing a hat" (every class × add-on): class and add-on;
- **held-out combinations** — the (class, colour, scene) triples pretraining never showed, as
  captions ("a photo of a blue star on the beach"): class, colour and scene.

The gate: in every form, each asked attribute right on ≥ 80 % of the pictures (the class only
when read confidently: a blob is no star), and every instance's training pictures, reconstructed
through the VAE's latent mean, score ≥ 0.8 on the checker's instance head (``vae_instance_scores``:
a concept cannot look more like its instance than the codec lets it). The same held-out measure
on as many seen combinations is printed for comparison. Exit status 0 when the gate passes.
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
VAE_GATE = 0.8


def prompt_forms(seed: int = 0) -> dict[str, list[tuple[str, dict]]]:
    """The evaluation's prompt forms, each prompt with what the checker must find in its pictures."""
    import numpy as np

    from classdiffusion.toyworld.world import (ADDON_WORDS, CLASSES, COLOURS, SCENES, Scene, held_out_combination,
                                               held_out_triples)

    def triples(chosen):
        return [(Scene(c, k, "plain", "big", "middle", s).caption(), {"cls": c, "colour": k, "scene": s})
                for c, k, s in chosen]

    held_out = held_out_triples()
    rng = np.random.default_rng(seed)
    seen_all = [(c, k, s) for c in CLASSES for k in COLOURS for s in SCENES if not held_out_combination(c, k, s)]
    seen = [seen_all[i] for i in rng.choice(len(seen_all), len(held_out), replace=False)]
    return {
        "class": [(f"a photo of a {c}", {"cls": c}) for c in CLASSES],
        "class_scene": [(f"a photo of a {c} {SCENES[s][3]}", {"cls": c, "scene": s}) for c in CLASSES for s in SCENES],
        "class_addon": [(f"a photo of a {c}{ADDON_WORDS[a]}", {"cls": c, "addon": a})
                        for c in CLASSES for a in ("hat", "ball") if not (a == "ball" and c == "ball")],
        "held_out": triples(held_out),
        "seen": triples(seen),
    }


def measure(pipe, checker, prompts, images: int, steps: int, guidance: float, seed: int) -> dict:
    """Accuracy of every asked attribute over ``images`` pictures per prompt."""
    import torch

    hits: dict[str, int] = {}
    asked: dict[str, int] = {}
    pictures = []
    for k in range(images):
        generator = torch.Generator().manual_seed(seed + k)
        batch = pipe([p for p, _ in prompts], num_inference_steps=steps, guidance_scale=guidance,
                     generator=generator, height=64, width=64).images
        for (_, truth), reading in zip(prompts, checker.read(batch)):
            for name, value in truth.items():
                asked[name] = asked.get(name, 0) + 1
                hits[name] = hits.get(name, 0) + (reading[name] == value)
        pictures += batch
    return {"accuracy": {name: hits[name] / asked[name] for name in asked}, "pictures": len(pictures),
            "_images": pictures}


def vae_instance_scores(vae, checker) -> dict[str, float]:
    """Per instance, the checker's mean instance score on its training pictures (the table's and
    the demo's: five on a table) reconstructed through the VAE's latent mean."""
    import numpy as np
    import torch
    from PIL import Image

    from classdiffusion.toyworld.evaluate import instance_pictures
    from classdiffusion.toyworld.world import INSTANCES

    scores = {}
    for inst in INSTANCES:
        pictures = instance_pictures(inst.name)
        pixels = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) for p in pictures]))
        with torch.no_grad():
            x = pixels.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        images = [Image.fromarray(((r.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
                  for r in recon]
        scores[inst.name] = round(float(np.mean(checker.instance_score(images, inst.name))), 4)
    return scores


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

    import torch

    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.toyworld.base import base_path
    from classdiffusion.toyworld.checker import Checker

    torch.set_num_threads(2)
    started = time.perf_counter()
    pipe = build_pipeline(args.base or base_path(), device="cpu")
    checker = Checker.load(REPO / "classdiffusion" / "toyworld" / "weights" / "checker.safetensors")
    forms = prompt_forms(args.seed)
    result = {name: measure(pipe, checker, prompts, args.images, args.steps, args.guidance, args.seed)
              for name, prompts in forms.items()}
    if args.grid:
        from PIL import Image

        pictures = result["held_out"]["_images"]
        columns = len(forms["held_out"])
        grid = Image.new("RGB", (64 * columns, 64 * args.images))
        for k, picture in enumerate(pictures):
            grid.paste(picture, ((k % columns) * 64, (k // columns) * 64))
        grid.save(args.grid)
    for part in result.values():
        part.pop("_images")
    vae = pipe.vae.float()
    vae_scores = vae_instance_scores(vae, checker)
    gated = [name for name in forms if name != "seen"]
    forms_passed = all(v >= GATE for name in gated for v in result[name]["accuracy"].values())
    vae_passed = all(v >= VAE_GATE for v in vae_scores.values())
    out = {"forms": result, "vae_instance_scores": vae_scores, "gate": GATE, "vae_gate": VAE_GATE,
           "forms_passed": forms_passed, "vae_passed": vae_passed, "gate_passed": forms_passed and vae_passed,
           "seconds": round(time.perf_counter() - started, 1),
           "settings": {"images": args.images, "steps": args.steps, "guidance": args.guidance, "seed": args.seed}}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    for name in forms:
        cells = ", ".join(f"{k} {v:.0%}" for k, v in result[name]["accuracy"].items())
        print(f"{name:12s} {cells} ({result[name]['pictures']} pictures){'' if name in gated else ' (not gated)'}")
    print("VAE instance scores: " + ", ".join(f"{k} {v:.2f}" for k, v in vae_scores.items()))
    print("gate " + ("PASSED" if out["gate_passed"] else "NOT passed") + f" (every asked attribute ≥ {GATE:.0%} in "
          f"every prompt form; every instance's VAE reconstruction ≥ {VAE_GATE})")
    return 0 if out["gate_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
