"""The paper's Table 1 on the toy world: every method on held-out instances, measured with ground truth.

    python benchmarks/toyworld_table.py [--quick] [--json F] [--plot F] [--workers 2]

Each held-out instance (classdiffusion/toyworld/world.py: INSTANCES) is trained from five rendered
pictures in one plain scene (a table), with each seed, by each method:

* Custom Diffusion = ClassDiffusion's parameters with λ = 0; ClassDiffusion with λ = 1 and the
  sweep λ ∈ {0.1, 10}; Infusion (its own recipe: batch 4 × 4 accumulation, so it gets an eighth of
  the steps, the same number of pictures). Textual Inversion joins when the method plug-in lands.

Per run, on the toy base with the concept applied (25 DDIM steps, guidance 5, sampling seeds 0–3):

* identity: the independent checker's instance score on "a photo of a <sks> CLASS" (the DINO-I
  analogue) and the toy CLIP's image cosine to the training pictures (CLIP-I);
* alignment: the checker's composition accuracy on paper-style prompts (another scene, a hat, a
  second object — each picture right on every asked attribute), the checker's instance score on
  those pictures (does the concept survive composition), and toy CLIP-T with the token removed;
* drift rank of "a <sks> CLASS" among the world's modifier phrases ("a red star", "a striped
  star", …) by distance to "a star" (1 = closest; ClassDiffusion's appendix E, on the toy CLIP);
* Infusion's overfitting metrics: Latent Fisher divergence on captions of other classes
  (concept-agnostic) and the 2-Wasserstein distance between toy CLIP features of the concept's
  pictures and the base's pictures of its class (concept-specific).

The base model on the class prompts is the alignment ceiling. Rows: mean ± std over instances and
seeds. Nothing here is tuned on the table's numbers: the recipe is the demo's (classdiffusion/demo.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (row label, method, λ); λ is None for methods without SPL.
VARIANTS = (
    ("Custom Diffusion (λ=0)", "classdiffusion", 0.0),
    ("ClassDiffusion (λ=0.1)", "classdiffusion", 0.1),
    ("ClassDiffusion (λ=1)", "classdiffusion", 1.0),
    ("ClassDiffusion (λ=10)", "classdiffusion", 10.0),
    ("Infusion", "infusion", None),
    ("Textual Inversion", "textual-inversion", None),
)
METRICS = ("identity", "clip_i", "composition", "composition_identity", "clip_t", "drift_rank", "fisher",
           "wasserstein")
SAMPLING_SEEDS = (0, 1, 2, 3)


def world_modifiers() -> list[str]:
    """The words that modify a class in the world's captions: the drift ranking's phrases."""
    from classdiffusion.toyworld.world import COLOURS, PATTERNS, SIZES

    return list(COLOURS) + [p for p in PATTERNS if p != "plain"] + list(SIZES)


def other_captions(cls: str) -> list[str]:
    """Prompts about other things (the concept-agnostic metric's): one caption per other class."""
    from classdiffusion.toyworld.world import CLASSES, SCENES, Scene

    scenes = list(SCENES)
    return [Scene(other, "blue", "plain", "big", "middle", scenes[k % len(scenes)]).caption()
            for k, other in enumerate(c for c in CLASSES if c != cls)]


def every_picture(kept: dict) -> list:
    """The pictures ``score`` kept: the concept prompt's and every composition prompt's."""
    return list(kept["concept"]) + [image for row in kept["composition"] for image in row]


_BASE_SCORES: dict = {}  # per worker process: (instance, seed, weights) → the base's scores and features


def run_one(job: dict) -> dict:
    """Train one (instance, seed, variant) and measure it; runs in a worker process."""
    import tempfile

    import torch

    from classdiffusion.apply import apply_concept
    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.demo import TOY_RECIPE
    from classdiffusion.evaluation.drift import DriftProbe
    from classdiffusion.evaluation.overfitting import latent_fisher_divergence, wasserstein_metric
    from classdiffusion.generate import build_pipeline
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.toyworld.base import WEIGHTS, ToyClip, base_path
    from classdiffusion.toyworld.checker import Checker
    from classdiffusion.toyworld.evaluate import instance_pictures, score
    from classdiffusion.toyworld.world import World
    from classdiffusion.train import train

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    weights = Path(job["weights"])
    base = base_path(weights)
    instance, seed, (label, method, spl_weight) = job["instance"], job["seed"], job["variant"]
    cls = World().instance(instance).cls
    references = instance_pictures(instance, seed=seed)
    checker, clip = Checker.load(WEIGHTS / "checker.safetensors"), ToyClip(weights)
    pipe = build_pipeline(base, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for k, picture in enumerate(references):
            picture.save(Path(tmp) / f"{k}.png")
        host = load_host(base, device="cpu")
        if spl_weight is None:  # Infusion, Textual Inversion: their own recipes, the same number of pictures seen
            recipe = TrainConfig.for_method(method)
            pictures = job["steps"] * TrainConfig().batch_size  # what the K/V variants see
            steps = max(1, pictures // (recipe.batch_size * recipe.gradient_accumulation))
            config = TrainConfig.for_method(method, steps=steps, seed=seed, resolution=TOY_RECIPE["resolution"],
                                            augment=False)
        else:
            steps = job["steps"]
            config = TrainConfig(method=method, steps=steps, seed=seed, spl_weight=spl_weight, **TOY_RECIPE)
        # Textual Inversion starts from the class word, as diffusers' recipe asks for an initializer word
        initializer = "class" if method == "textual-inversion" else ConceptSpec.initializer
        concept = train(host, [ConceptSpec(token="<sks>", class_word=cls, images=[tmp], initializer=initializer)], config,
                        out=Path(tmp) / "concept.safetensors").concept
        train_seconds = time.perf_counter() - started
        row = {"variant": label, "instance": instance, "seed": seed, "steps": steps}
        if concept.tokens:
            probe = DriftProbe(host.encode_text, cls, adjectives=world_modifiers())
            row["drift_rank"] = probe.measure("<sks>", concept.token_vectors[0].float()).rank
        else:
            row["drift_rank"] = None  # Infusion trains no token: the prompt's words keep their meaning
        fisher = latent_fisher_divergence(host, {n: d.float() for n, d in concept.deltas.items()}, other_captions(cls),
                                          tokens=concept.tokens, steps=10, seeds=(0,), latent_size=8,
                                          residual_concepts=[concept] if concept.residuals else [])
        row["fisher"] = fisher.value
        host.close()
    with torch.no_grad():
        key = (instance, seed, job["weights"])
        if key not in _BASE_SCORES:  # the base's side depends on the instance and seed, not the variant
            base_pictures: dict = {}
            base_scores = score(pipe, checker, clip, instance, cls, references, SAMPLING_SEEDS, keep=base_pictures)
            _BASE_SCORES[key] = (base_scores, clip.image_features(every_picture(base_pictures)))
        base_scores, base_features = _BASE_SCORES[key]
        applied = apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        concept_pictures: dict = {}
        # Infusion is triggered by the class word; Textual Inversion's token stands for the object alone
        phrase = cls if not concept.tokens else "<sks>" if method == "textual-inversion" else f"<sks> {cls}"
        row.update(score(pipe, checker, clip, instance, phrase, references, SAMPLING_SEEDS,
                         keep=concept_pictures).to_dict())
        applied.remove()
        row["wasserstein"] = wasserstein_metric(clip.image_features(every_picture(concept_pictures)), base_features).value
    row["base"] = base_scores.to_dict()
    row["train_seconds"], row["seconds"] = round(train_seconds, 1), round(time.perf_counter() - started, 1)
    return row


def summarize(rows: list[dict]) -> dict:
    """Per variant, mean and std of every metric over instances and seeds; the base row from the
    base's scores on the class prompts (one per instance and seed)."""
    table = {}
    for label, _, _ in VARIANTS:
        mine = [r for r in rows if r["variant"] == label]
        if mine:
            table[label] = {m: _mean_std([r[m] for r in mine]) for m in METRICS}
            table[label]["runs"] = len(mine)
    bases = {(r["instance"], r["seed"]): r["base"] for r in rows}.values()
    table["base (class prompt)"] = {m: _mean_std([b.get(m) for b in bases]) for m in METRICS}
    table["base (class prompt)"]["runs"] = len(bases)
    return table


def _mean_std(values) -> list | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return [statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0]


def markdown(table: dict) -> str:
    heads = ("identity (checker) ↑", "CLIP-I ↑", "composition ↑", "identity in composition ↑", "CLIP-T ↑",
             "drift rank ↓", "Fisher ↓", "W₂ ↓")
    lines = ["| method | " + " | ".join(heads) + " | runs |", "|---" * (len(heads) + 2) + "|"]
    for label, row in table.items():
        cells = []
        for metric in METRICS:
            value = row[metric]
            if value is None:
                cells.append("–")
            elif metric == "drift_rank":
                cells.append(f"{value[0]:.1f} ± {value[1]:.1f}")
            elif metric in ("fisher", "wasserstein"):
                cells.append(f"{value[0]:.3g} ± {value[1]:.2g}")
            else:
                cells.append(f"{value[0]:.3f} ± {value[1]:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['runs']} |")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """Identity (checker) against composition, one point per method and λ."""
    from classdiffusion.plot import plot_tradeoff

    points = {label.replace("λ", "lambda "): (*row["composition"], *row["identity"]) for label, row in table.items()}
    plot_tradeoff(points, x_label="composition accuracy (checker) ->", y_label="identity: instance score (checker)",
                  title="Toy world: identity vs alignment (mean ± std over instances and seeds)").save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 instances × 1 seed (a smoke run, ≤ 8 min)")
    parser.add_argument("--instances", type=int, default=5, help="held-out instances (of 6)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--weights", type=Path, default=None, help="another toy-world weights folder")
    parser.add_argument("--variants", nargs="+", default=None, metavar="LABEL",
                        help="run only the variants whose label contains one of these (e.g. 'Textual')")
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier --json of the same settings: its rows of the variants not run now join the table")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    import inspect
    import multiprocessing

    from classdiffusion.demo import run_demo
    from classdiffusion.toyworld.base import WEIGHTS
    from classdiffusion.toyworld.world import INSTANCES

    steps = args.steps or inspect.signature(run_demo).parameters["steps"].default
    instances, seeds = (2, 1) if args.quick else (args.instances, args.seeds)
    variants = [v for v in VARIANTS if not args.variants or any(part in v[0] for part in args.variants)]
    jobs = [{"instance": inst.name, "seed": seed, "variant": variant, "steps": steps, "threads": 1,
             "weights": str(args.weights or WEIGHTS)}
            for inst in INSTANCES[:instances] for seed in range(seeds) for variant in variants]
    started = time.perf_counter()
    rows = []
    merged = []
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        if earlier["settings"]["steps"] != steps or earlier["settings"]["seeds"] != seeds:
            parser.error(f"{args.merge} was run with other settings ({earlier['settings']})")
        merged = [r for r in earlier["rows"] if r["variant"] not in {v[0] for v in variants}]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            rows.append(row)
            print(f"[{len(rows)}/{len(jobs)}] {row['variant']:24s} {row['instance']:16s} seed {row['seed']}: "
                  f"identity {row['identity']:.2f}, composition {row['composition']:.2f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    table = summarize(rows + merged)
    print(markdown(table))
    print(f"{len(jobs)} runs in {seconds / 60:.1f} min ({instances} instances × {seeds} seeds, {steps} steps)")
    result = {"table": table, "rows": rows + merged, "seconds": round(seconds, 1),
              "settings": {"instances": [i.name for i in INSTANCES[:instances]], "seeds": seeds, "steps": steps,
                           "sampling_seeds": list(SAMPLING_SEEDS), "workers": args.workers}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
