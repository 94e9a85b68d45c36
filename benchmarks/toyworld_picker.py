"""Does the step picker choose well? Its choice against the toy world's ground truth.

    python benchmarks/toyworld_picker.py --runs DIR [--instances N] [--steps 1200] [--every 100]
                                         [--workers 2] [--json F]
    python benchmarks/toyworld_picker.py --summarize F [--tolerance T] [--json G]   # no sampling

1. **Runs**: ClassDiffusion (λ = 1, the demo's recipe) on each held-out instance with training
   seed 1 (a table seed: seed 0 chose the recipe), to ``--steps`` with a step file every
   ``--every`` steps, written under ``DIR/INSTANCE-seedS/`` beside the five training pictures
   (``references/``). A run whose final file exists is not trained again, so an interrupted
   benchmark continues.
2. **Ground truth per step**: the independent checker on the table's prompts and sampling seeds
   (0–3): identity (the instance score on "a photo of a <sks> CLASS") and joint composition; the
   ground-truth score of a step is ``identity × joint composition`` (the issue's definition: a
   step is good when the look is learned *and* still composes).
3. **The picker** (``classdiffusion.evaluation.picker``) with the toy CLIP only and other sampling
   seeds (100–103), so its noise is not the checker's: the same prompt forms (the identity prompt and
   the world's composition prompts), identity = CLIP-I to the training pictures, composition =
   CLIP-T, and the vision-only context measure beside it (the picker as a CLIP Vision model
   without a text tower would run it).
4. **Agreement**: a choice is right when its ground-truth score is within 10 % of the best step's
   (``≥ 0.9 × best``). Runs whose every step scores 0 (the look never composes) cannot tell a good
   choice from a bad one; they are counted apart, not as agreements. Compared with taking the last
   step, a fixed step (the demo's 400) and chance (the share of a run's steps that are within 10 %).
5. **Does each measure follow its ground truth?** Per run, Spearman's rank correlation across the
   steps between CLIP-I and the checker's identity, and between CLIP-T / the context agreement and
   the checker's composition (scene and add-on; joint); mean ± SE over runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TRAINING_SEED = 1  # toyworld_table.TABLE_SEEDS[0]; seed 0 chose the recipe
CHECKER_SEEDS = (0, 1, 2, 3)  # the table's sampling seeds
PICKER_SEEDS = (100, 101, 102, 103)  # the picker samples its own pictures
FIXED_STEP = 400  # the demo's and the table's step count
AGREEMENT = 0.9  # a choice agrees when its ground truth is ≥ 90 % of the best step's


def run_dir(runs: Path, instance: str, seed: int) -> Path:
    return runs / f"{instance}-seed{seed}"


def train_run(job: dict) -> str:
    """Train one instance with step files (a worker process); skip a run that is already complete."""
    import torch

    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.toyworld.demo import TOY_RECIPE
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.toyworld.base import base_path
    from classdiffusion.toyworld.evaluate import instance_pictures
    from classdiffusion.toyworld.world import World
    from classdiffusion.run.train import train

    torch.set_num_threads(job["threads"])
    folder = Path(job["folder"])
    final = folder / "concept.safetensors"
    if final.is_file():
        return f"{folder.name}: already trained"
    started = time.perf_counter()
    references = folder / "references"
    references.mkdir(parents=True, exist_ok=True)
    for k, picture in enumerate(instance_pictures(job["instance"], seed=job["seed"])):
        picture.save(references / f"{k}.png")
    cls = World().instance(job["instance"]).cls
    host = load_host(base_path(), device="cpu")
    config = TrainConfig(method="classdiffusion", steps=job["steps"], seed=job["seed"], spl_weight=1.0,
                         save_every=job["every"], checkpoint_optimizer=False, **TOY_RECIPE)
    train(host, [ConceptSpec(token="<sks>", class_word=cls, images=[str(references)])], config, out=final)
    host.close()
    return f"{folder.name}: trained in {time.perf_counter() - started:.0f} s"


def score_run(job: dict) -> dict:
    """Ground truth (checker) and the picker's scores for every step file of one run (a worker)."""
    import torch

    from classdiffusion.concept import load_concept, run_files
    from classdiffusion.run.data import load_images
    from classdiffusion.evaluation.picker import score_steps
    from classdiffusion.concept.generate import build_pipeline, concept_sampler
    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.toyworld.base import WEIGHTS, ToyClip, base_path
    from classdiffusion.toyworld.checker import Checker
    from classdiffusion.toyworld.evaluate import SAMPLING, score
    from classdiffusion.toyworld.world import World, composition_prompts

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    folder = Path(job["folder"])
    final, step_files = run_files(folder / "concept.safetensors")
    files = step_files + [(load_concept(final).step, final)]
    instance = job["instance"]
    cls = World().instance(instance).cls
    references = load_images([folder / "references"], "reference")
    checker, clip = Checker.load(WEIGHTS / "checker.safetensors"), ToyClip()
    pipe = build_pipeline(base_path(), device="cpu")
    truth = []
    for step, path in files:  # the checker's reading of each step, on the table's seeds
        with torch.no_grad():
            applied = apply_concept(pipe.unet, load_concept(path), text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
            scores = score(pipe, checker, clip, instance, f"<sks> {cls}", references, CHECKER_SEEDS)
            applied.remove()
        truth.append({"step": step, "identity": scores.identity, "composition_joint": scores.composition_joint,
                      "composition": scores.composition, "ground_truth": scores.identity * scores.composition_joint})
    prompts = [template.format(f"<sks> {cls}") for template, _ in composition_prompts(cls)]
    sampler = concept_sampler(pipe, steps=SAMPLING["steps"], guidance=SAMPLING["guidance"])
    picker = score_steps(files, sampler, clip, references, token="<sks>", class_word=cls, prompts=prompts,
                         seeds=PICKER_SEEDS)
    rows = [{**t, "clip_i": p.identity, "clip_t": p.clip_t, "context": p.context} for t, p in zip(truth, picker)]
    return {"instance": instance, "seed": job["seed"], "rows": rows, "seconds": round(time.perf_counter() - started, 1)}


def choices(rows: list[dict], tolerance: float) -> dict[str, int]:
    """The step each strategy chooses: the picker with CLIP-T, with the context agreement, the last
    step and the fixed step."""
    from classdiffusion.evaluation.picker import StepScore, pick

    chosen = {}
    for measure in ("clip_t", "context"):
        scores = [StepScore(step=r["step"], file="", identity=r["clip_i"], composition=r[measure]) for r in rows]
        chosen[f"picker ({measure})"] = scores[pick(scores, tolerance)[0]].step
    chosen["last step"] = rows[-1]["step"]
    if any(r["step"] == FIXED_STEP for r in rows):
        chosen[f"fixed step {FIXED_STEP}"] = FIXED_STEP
    return chosen


def agreement(runs: list[dict], tolerance: float) -> dict:
    """Per strategy: in how many decidable runs its choice is within 10 % of the best step's ground
    truth, and the mean share of the best ground truth it reaches; chance = the share of steps that
    are within 10 % (what a step drawn at random would achieve)."""
    decidable = [run for run in runs if max(r["ground_truth"] for r in run["rows"]) > 0]
    table: dict = {}
    for run in decidable:
        truth = {r["step"]: r["ground_truth"] for r in run["rows"]}
        best = max(truth.values())
        picks = choices(run["rows"], tolerance)
        run["chosen"] = picks
        run["best_step"] = max(truth, key=truth.get)
        for name, step in picks.items():
            entry = table.setdefault(name, {"agree": 0, "share_of_best": []})
            entry["agree"] += truth[step] >= AGREEMENT * best
            entry["share_of_best"].append(truth[step] / best)
        entry = table.setdefault("chance (a step at random)", {"agree": 0.0, "share_of_best": []})
        entry["agree"] += sum(v >= AGREEMENT * best for v in truth.values()) / len(truth)
        entry["share_of_best"].append(sum(v / best for v in truth.values()) / len(truth))
    for entry in table.values():
        entry["agree"] = round(float(entry["agree"]), 2)
        entry["rate"] = round(entry["agree"] / len(decidable), 3) if decidable else None
        entry["share_of_best"] = round(sum(entry["share_of_best"]) / len(decidable), 3) if decidable else None
    return {"runs": len(runs), "decidable": len(decidable),
            "undecidable": [f"{run['instance']}-seed{run['seed']}" for run in runs if run not in decidable],
            "strategies": table}


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation; None when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


#: Does each picker measure follow the checker's reading of the same quantity across a run's steps?
CORRELATIONS = {"CLIP-I vs the checker's identity": ("clip_i", "identity"),
                "CLIP-T vs the checker's scene-and-add-on composition": ("clip_t", "composition"),
                "context agreement vs the checker's scene-and-add-on composition": ("context", "composition"),
                "CLIP-T vs the checker's joint composition": ("clip_t", "composition_joint"),
                "context agreement vs the checker's joint composition": ("context", "composition_joint")}


def correlations(runs: list[dict]) -> dict:
    """Per pair of CORRELATIONS: the mean over runs of the Spearman correlation across steps, its
    standard error over runs, and how many runs were positive (runs where a side is constant skip)."""
    out = {}
    for label, (ours, truth) in CORRELATIONS.items():
        values = [v for run in runs
                  if (v := spearman([r[ours] for r in run["rows"]], [r[truth] for r in run["rows"]])) is not None]
        mean = sum(values) / len(values) if values else None
        se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5 if len(values) > 1 else None
        out[label] = {"mean": None if mean is None else round(mean, 3), "se": None if se is None else round(se, 3),
                      "positive": sum(v > 0 for v in values), "runs": len(values)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="where the runs are (trained there if missing)")
    parser.add_argument("--summarize", type=Path, metavar="JSON",
                        help="an earlier --json: its per-run scores summarized again (no sampling)")
    parser.add_argument("--instances", type=int, default=10, help="held-out instances (of 10)")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of each run")
    parser.add_argument("--every", type=int, default=100, help="a step file every N steps")
    parser.add_argument("--tolerance", type=float, default=None, help="the picker's rule (default: its default)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import multiprocessing

    from classdiffusion.evaluation.picker import TOLERANCE as DEFAULT_TOLERANCE
    from classdiffusion.toyworld.world import INSTANCES

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if args.summarize:
        earlier = json.loads(args.summarize.read_text())
        return report(earlier["per_run"], tolerance, earlier["seconds"], earlier.get("train_seconds"), args.json,
                      {**earlier["settings"], "tolerance": tolerance})
    if args.runs is None:
        parser.error("give --runs DIR (or --summarize JSON)")
    started = time.perf_counter()
    jobs = [{"instance": i.name, "seed": TRAINING_SEED, "steps": args.steps, "every": args.every, "threads": 1,
             "folder": str(run_dir(args.runs, i.name, TRAINING_SEED))} for i in INSTANCES[:args.instances]]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers) as pool:
        for message in pool.imap_unordered(train_run, jobs):
            print(message, flush=True)
    train_seconds = time.perf_counter() - started
    runs = []
    with context.Pool(args.workers) as pool:
        for run in pool.imap_unordered(score_run, jobs):
            runs.append(run)
            print(f"[{len(runs)}/{len(jobs)}] {run['instance']}: ground truth by step "
                  + " ".join(f"{r['step']}:{r['ground_truth']:.2f}" for r in run["rows"]) + f" ({run['seconds']:.0f} s)",
                  flush=True)
    runs.sort(key=lambda run: [i.name for i in INSTANCES].index(run["instance"]))
    settings = {"steps": args.steps, "every": args.every, "training_seed": TRAINING_SEED,
                "checker_seeds": list(CHECKER_SEEDS), "picker_seeds": list(PICKER_SEEDS), "tolerance": tolerance,
                "agreement": AGREEMENT, "fixed_step": FIXED_STEP}
    return report(runs, tolerance, time.perf_counter() - started, train_seconds, args.json, settings)


def report(runs: list[dict], tolerance: float, seconds: float, train_seconds: float | None, path: Path | None,
           settings: dict) -> int:
    """Print the agreement and correlation tables; write everything to ``path``."""
    result = agreement(runs, tolerance)
    result["correlations"] = correlations(runs)
    print(f"{result['decidable']} of {result['runs']} runs decidable (the others score 0 at every step: "
          f"{', '.join(result['undecidable']) or 'none'})")
    print("| strategy | within 10 % of the best step | mean share of the best step's ground truth |")
    print("|---|---|---|")
    for name, entry in result["strategies"].items():
        print(f"| {name} | {entry['agree']:g} of {result['decidable']} ({entry['rate']:.0%}) | {entry['share_of_best']:.2f} |")
    print()
    print("| picker measure vs ground truth (Spearman across steps, per run) | mean ± SE over runs | runs > 0 |")
    print("|---|---|---|")
    for label, entry in result["correlations"].items():
        if entry["mean"] is not None:
            se = f" ± {entry['se']:.2f}" if entry["se"] is not None else ""
            print(f"| {label} | {entry['mean']:+.2f}{se} | {entry['positive']} of {entry['runs']} |")
    timing = f" (training {train_seconds / 60:.1f} min)" if train_seconds is not None else ""
    print(f"{len(runs)} runs in {seconds / 60:.1f} min{timing}")
    if path:
        path.write_text(json.dumps({**result, "per_run": runs, "seconds": round(seconds, 1),
                                    "train_seconds": None if train_seconds is None else round(train_seconds, 1),
                                    "settings": settings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
