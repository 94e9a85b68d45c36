"""The toy world's ceiling: what the same five pictures teach the toy base when **every UNet
weight** trains (DreamBooth-like: a rare-token identifier, the text encoder frozen, no prior
preservation) instead of Custom Diffusion's K/V — is what limits identity and composition on this
world the base or the method's parameters?

    python benchmarks/toyworld_ceiling.py [--instances 10] [--seeds 1 2 3] [--json F] [--workers 2]

Each (instance, training seed) trains the whole UNet for ``--steps`` steps of batch 2 at
``--learning-rate`` (2e-5: of 2e-5 and 1e-4 tried on the tuning seed 0, the one that kept the
star's look) on the table's training pictures (``instance_pictures(name, seed=seed)``), then is
scored exactly as ``toyworld_table.py`` scores a concept (the same prompts, sampling seeds and
checker), so its rows compare with the table's Custom Diffusion rows of the same instances and
seeds. Not a method of the product: a full-UNet concept is the base's size (3.4 GB on SD1.5).

``--named`` measures the other bound, the text path's: nothing trains; the base is prompted with
the instance's halves *named* ("a photo of a red blue star on the beach", left half first, as the
v2.1 captions name two-half looks) where a concept's prompt has "<sks> star" — what a concept
whose token meant exactly the instance's colour words would draw. The instance's own pair is never
named in pretraining, so this is the base composing a held-out look from its words. Sampling does
not depend on the training seed: one row per instance, repeated for each ``--seeds`` so that
``--table`` pairs it with the same Custom Diffusion rows as the ceiling.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toyworld_table import SAMPLING_SEEDS, TABLE_SEEDS, by_instance, clustered, paired_cell  # noqa: E402

METRICS = ("identity", "composition_joint", "composition", "composition_identity", "composition_class", "clip_i",
           "clip_t")


def train_whole_unet(pipe, pictures, class_word: str, *, steps: int, learning_rate: float, seed: int,
                     token: str = "<sks>", batch: int = 2) -> list[float]:
    """Fine-tune every weight of ``pipe.unet`` on ``pictures`` captioned "a photo of a <token>
    CLASS" (the token added to the tokenizer, its embedding the rare initializer's, frozen);
    returns the loss of each step."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from classdiffusion.config import DEFAULT_INITIALIZER

    tokenizer, text_encoder, unet, vae, scheduler = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler
    tokenizer.add_tokens([token])
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        pieces = tokenizer(DEFAULT_INITIALIZER, add_special_tokens=False).input_ids
        table[-1] = table[pieces].mean(0)
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    unet.requires_grad_(True).train()
    pixels = torch.stack([torch.from_numpy(np.asarray(p.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for p in pictures])
    ids = tokenizer([f"a photo of a {token} {class_word}"], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        context = text_encoder(ids)[0].expand(batch, -1, -1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    alphas = scheduler.alphas_cumprod
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(pictures), (batch,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * latents[index] + (1 - a).sqrt() * noise, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    unet.requires_grad_(False).eval()
    return losses


def run_one(job: dict) -> dict:
    """Train one (instance, seed) and score it as the table scores a concept (a worker process)."""
    import torch

    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.toyworld.base import WEIGHTS, ToyClip, base_path
    from classdiffusion.toyworld.checker import Checker
    from classdiffusion.toyworld.evaluate import instance_pictures, score
    from classdiffusion.toyworld.world import World

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    started = time.perf_counter()
    weights = Path(job["weights"])
    instance, seed = job["instance"], job["seed"]
    cls = World().instance(instance).cls
    references = instance_pictures(instance, seed=seed)
    pipe = build_pipeline(base_path(weights), device="cpu")
    losses = train_whole_unet(pipe, references, cls, steps=job["steps"], learning_rate=job["learning_rate"], seed=seed)
    checker, clip = Checker.load(WEIGHTS / "checker.safetensors"), ToyClip(weights)
    with torch.no_grad():
        scores = score(pipe, checker, clip, instance, f"<sks> {cls}", references, SAMPLING_SEEDS)
    return {"variant": "whole UNet", "instance": instance, "seed": seed, "steps": job["steps"],
            "learning_rate": job["learning_rate"], "final_loss": round(sum(losses[-20:]) / 20, 4),
            **scores.to_dict(), "seconds": round(time.perf_counter() - started, 1)}


def named_phrase(instance: str) -> str:
    """The instance's look in words, as v2.1's captions name a two-half look: "red blue star"."""
    from classdiffusion.toyworld.world import World

    look = World().instance(instance)
    return f"{look.first} {look.second} {look.cls}"


def run_named(job: dict) -> dict:
    """Score the base on the instance's named halves ("red blue star") in the concept's place."""
    import torch

    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.toyworld.base import WEIGHTS, ToyClip, base_path
    from classdiffusion.toyworld.checker import Checker
    from classdiffusion.toyworld.evaluate import instance_pictures, score
    from classdiffusion.toyworld.world import World

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    weights = Path(job["weights"])
    look = World().instance(job["instance"])
    references = instance_pictures(look.name, seed=job["seed"])
    pipe = build_pipeline(base_path(weights), device="cpu")
    checker, clip = Checker.load(WEIGHTS / "checker.safetensors"), ToyClip(weights)
    phrase = named_phrase(look.name)
    with torch.no_grad():
        scores = score(pipe, checker, clip, look.name, phrase, references, SAMPLING_SEEDS)
    return {"variant": "named halves (base, no training)", "instance": look.name, "seed": job["seed"],
            "phrase": phrase, **scores.to_dict(), "seconds": round(time.perf_counter() - started, 1)}


def summarize(rows: list[dict]) -> dict:
    """Mean ± instance-clustered SE of each metric (as the table's cells)."""
    return {metric: clustered(by_instance(rows, metric)) for metric in METRICS}


def paired_with(rows: list[dict], reference: dict[tuple, dict]) -> dict:
    """The paired difference ceiling − reference (same instance and training seed) of identity,
    joint and scene-and-add-on composition: mean ± instance-clustered SE, pairs up and down."""
    pairs = [(row, reference[(row["instance"], row["seed"])]) for row in rows
             if (row["instance"], row["seed"]) in reference]
    return {"pairs": len(pairs),
            **{metric: paired_cell(pairs, metric) if pairs else None
               for metric in ("identity", "composition_joint", "composition")}}


def against_table(rows: list[dict], table_json: Path) -> dict:
    """The ceiling paired with ``toyworld_table.py``'s Custom Diffusion (λ = 0) rows and with the
    base on the class prompt, for the same instances and training seeds."""
    earlier = json.loads(table_json.read_text())["rows"]
    custom = {(r["instance"], r["seed"]): r for r in earlier if r["variant"] == "Custom Diffusion (λ=0)"}
    base = {(r["instance"], r["seed"]): r["base"] for r in earlier}
    return {"vs Custom Diffusion (λ=0)": paired_with(rows, custom), "vs base (class prompt)": paired_with(rows, base)}


def main() -> int:
    from classdiffusion.toyworld.base import WEIGHTS
    from classdiffusion.toyworld.world import INSTANCES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=len(INSTANCES), help="held-out instances (of 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(TABLE_SEEDS), help="training seeds")
    parser.add_argument("--steps", type=int, default=400, help="training steps (the K/V recipe's)")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--weights", type=Path, default=None, help="another toy-world weights folder")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--table", type=Path, default=None,
                        help="a toyworld_table.py --json of the same settings: pair the ceiling with its rows")
    parser.add_argument("--named", action="store_true",
                        help="no training: score the base on the instance's halves named (the text path's bound)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.instances < 1 or args.steps < 1 or args.learning_rate <= 0:
        parser.error("--instances, --steps and --learning-rate must be positive")

    jobs = [{"instance": inst.name, "seed": seed, "steps": args.steps, "learning_rate": args.learning_rate,
             "threads": 1, "weights": str(args.weights or WEIGHTS)}
            for inst in INSTANCES[:args.instances] for seed in (args.seeds[:1] if args.named else args.seeds)]
    started, rows = time.perf_counter(), []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(run_named if args.named else run_one, jobs):
            # the named rows do not depend on the training seed: one per seed, for pairing
            rows += [row | {"seed": seed} for seed in args.seeds] if args.named else [row]
            print(f"{row['instance']} seed {row['seed']}: identity {row['identity']:.2f}, "
                  f"joint composition {row['composition_joint']:.2f} ({row['seconds']:.0f} s)", flush=True)
    summary = summarize(rows)
    minutes = (time.perf_counter() - started) / 60
    for metric, cell in summary.items():
        print(f"{metric}: {cell[0]:.3f} ± {cell[1]:.3f}")
    print(f"{len(rows)} runs in {minutes:.1f} min")
    comparison = against_table(rows, args.table) if args.table else None
    for label, cells in (comparison or {}).items():
        print(label + ": " + ", ".join(f"Δ {m} {c[0]:+.3f} ± {c[1]:.3f} ({c[2]}↑ {c[3]}↓)"
                                       for m, c in cells.items() if m != "pairs" and c) + f" ({cells['pairs']} pairs)")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "paired": comparison, "rows": sorted(rows, key=lambda r: (r["instance"], r["seed"])),
                                         "minutes": round(minutes, 1), "settings": vars(args) | {
                                             "json": str(args.json), "table": str(args.table) if args.table else None,
                                             "weights": str(args.weights or WEIGHTS)}},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
