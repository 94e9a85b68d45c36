"""The paper's Table 1 on the toy world: every method on held-out instances, measured with ground truth.

    python benchmarks/toyworld_table.py [--quick] [--json F] [--plot F] [--workers 2]

Each held-out instance (classdiffusion/toyworld/world.py: INSTANCES) is trained from five rendered
pictures in one plain scene (a table), with each seed, by each method:

* Custom Diffusion = ClassDiffusion's parameters with λ = 0; ClassDiffusion with λ = 1 and the
  sweep λ ∈ {0.1, 10}; Infusion (its own recipe: batch 4 × 4 accumulation, so it gets an eighth of
  the steps, the same number of pictures); Textual Inversion (diffusers' recipe);
* the preservation alternatives (issue #36): output preservation (the base as teacher on the
  class prompt, weight 10 and 100) instead of SPL, and TEA at sampling time (ρ = 0.2 and 0.5) on
  the Custom Diffusion concept. ``--variants Output TEA --merge docs/toyworld_table.json`` adds
  them to the committed table's rows (training is deterministic: a rerun of a committed row gives
  the same numbers).

Per run, on the toy base with the concept applied (25 DDIM steps, guidance 5, sampling seeds 0–3):

* identity: the independent checker's instance score on "a photo of a <sks> CLASS" (the DINO-I
  analogue) and the toy CLIP's image cosine to the training pictures (CLIP-I);
* **joint composition**: the share of pictures of paper-style prompts (another scene, a hat, a
  second object, a scene and a hat) in which the checker finds the asked scene and add-on, the
  class (read confidently) *and* the instance's look — the concept composing;
* the older, looser columns: composition (scene and add-on only), the instance score on the
  composition pictures, and toy CLIP-T with the token removed;
* drift rank of "a <sks> CLASS" among the world's modifier phrases ("a red star", "a striped
  star", …) by distance to "a star" (1 = closest; ClassDiffusion's appendix E, on the toy CLIP);
* Infusion's overfitting metrics: Latent Fisher divergence on captions of other classes
  (concept-agnostic) and the 2-Wasserstein distance between toy CLIP features of the concept's
  pictures and the base's pictures of its class (concept-specific).

The base model on the class prompts is the alignment ceiling. Rows: mean ± standard error over
instances and seeds, the standard error **clustered by instance** (the seeds of one instance share
its pictures' look, so they are not independent: the SE is that of the per-instance means); paired
differences against λ = 0 (same instance, same seed) likewise. Fisher is "n/a" where it is zero by
construction (Infusion and Textual Inversion leave prompts without their word untouched).

Seeds: the table trains with seeds 1–3 (``TABLE_SEEDS``); the recipe (classdiffusion/toyworld/demo.py:
TOY_RECIPE) was chosen on seed 0 only, which the table never uses.

    python benchmarks/toyworld_table.py --curve [--json F]

is the **overfitting curve**: λ = 0 and λ = 1 trained to 1,600 steps on three instances
(``--curve-instances all``: the ten), each step checkpoint (100, 200, 400, 800, 1,600) scored for
identity and joint composition, with λ = 1 minus λ = 0 paired per step and on the fall from the
first to the last step (does SPL change the slope?).

    python benchmarks/toyworld_table.py --parts [--json F]

takes the concepts apart: Custom Diffusion and ClassDiffusion (λ = 1) at the table's recipe,
instances and seeds, each scored as trained, with only its token (the K/V deltas zeroed) and with
only its K/V deltas (the token back at its initializer), beside the base on the class prompt —
which part carries the look, and which costs the class that SPL is meant to keep?
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

#: (row label, method, the K/V recipe's settings — None for a method trained on its own recipe —,
#: TEA's rho at sampling time). The preservation alternatives (issue #36) are ClassDiffusion's
#: settings; TEA samples the Custom Diffusion concept.
VARIANTS = (
    ("Custom Diffusion (λ=0)", "classdiffusion", {"spl_weight": 0.0}, 0.0),
    ("ClassDiffusion (λ=0.1)", "classdiffusion", {"spl_weight": 0.1}, 0.0),
    ("ClassDiffusion (λ=1)", "classdiffusion", {"spl_weight": 1.0}, 0.0),
    ("ClassDiffusion (λ=10)", "classdiffusion", {"spl_weight": 10.0}, 0.0),
    ("Infusion", "infusion", None, 0.0),
    ("Textual Inversion", "textual-inversion", None, 0.0),
    ("Output preservation (w=10)", "classdiffusion", {"preservation": "output", "output_weight": 10.0}, 0.0),
    ("Output preservation (w=100)", "classdiffusion", {"preservation": "output", "output_weight": 100.0}, 0.0),
    ("Custom Diffusion + TEA (ρ=0.2)", "classdiffusion", {"spl_weight": 0.0}, 0.2),
    ("Custom Diffusion + TEA (ρ=0.5)", "classdiffusion", {"spl_weight": 0.0}, 0.5),
)
#: Opt-in rows (run only when ``--variants`` names them): Custom Diffusion's own prior preservation —
#: the official recipe's class images, here 200 pictures of "a photo of a CLASS" drawn by the base
#: (sampling seeds ``CLASS_IMAGE_SEEDS``), the learning rate ×2 as the official code does.
PRIOR_VARIANTS = (
    ("Custom Diffusion + prior (200 class images)", "classdiffusion", {"spl_weight": 0.0, "class_images": 200}, 0.0),
    ("ClassDiffusion (λ=1) + prior (200 class images)", "classdiffusion", {"spl_weight": 1.0, "class_images": 200}, 0.0),
)
ALL_VARIANTS = VARIANTS + PRIOR_VARIANTS
METRICS = ("identity", "composition_joint", "clip_i", "composition", "composition_identity", "clip_t",
           "drift_rank", "fisher", "wasserstein")
SAMPLING_SEEDS = (0, 1, 2, 3)
GRID_COMPOSITION = 3  # composition_prompts' "… on the grass wearing a hat"
#: Training seeds of the table: fresh, never used to choose the recipe (seed 0 was).
TABLE_SEEDS = (1, 2, 3)
#: The overfitting curve: the steps scored, and its instances (one star, one box, one tree).
CURVE_STEPS = (100, 200, 400, 800, 1600)
CURVE_INSTANCES = ("red_blue_star", "pink_blue_box", "blue_yellow_tree")
CURVE_METRICS = ("composition", "composition_joint", "identity")
#: Methods whose Latent Fisher divergence on other classes' captions is zero by construction.
NO_FISHER = ("infusion", "textual-inversion")


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


def run_one(job: dict) -> list[dict]:
    """Train one (instance, seed, variant) and measure it, once per sampling (TEA) of the trained
    concept; runs in a worker process."""
    import tempfile

    import torch

    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.toyworld.demo import TOY_RECIPE
    from classdiffusion.evaluation.drift import DriftProbe
    from classdiffusion.evaluation.overfitting import latent_fisher_divergence, wasserstein_metric
    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.toyworld.base import WEIGHTS, ToyClip, base_path
    from classdiffusion.toyworld.checker import Checker
    from classdiffusion.toyworld.evaluate import instance_pictures, score
    from classdiffusion.toyworld.world import World
    from classdiffusion.run.train import train

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    weights = Path(job["weights"])
    base = base_path(weights)
    instance, seed, (label, method, settings, tea) = job["instance"], job["seed"], job["variant"]
    cls = World().instance(instance).cls
    references = instance_pictures(instance, seed=seed)
    checker, clip = Checker.load(WEIGHTS / "checker.safetensors"), ToyClip(weights)
    pipe = build_pipeline(base, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for k, picture in enumerate(references):
            picture.save(Path(tmp) / f"{k}.png")
        host = load_host(base, device="cpu")
        if settings is None:  # Infusion, Textual Inversion: their own recipes, the same number of pictures seen
            recipe = TrainConfig.for_method(method)
            pictures = job["steps"] * TrainConfig().batch_size  # what the K/V variants see
            steps = max(1, pictures // (recipe.batch_size * recipe.gradient_accumulation))
            config = TrainConfig.for_method(method, steps=steps, seed=seed, resolution=TOY_RECIPE["resolution"],
                                            augment=False)
        else:
            steps = job["steps"]
            settings = dict(settings)
            count = settings.pop("class_images", 0)
            config = TrainConfig(method=method, steps=steps, seed=seed, **settings, **TOY_RECIPE)
        class_images = []
        if settings and count:  # drawn once per class by main() (draw_class_pictures), or here
            drawn = job.get("class_folders", {}).get(f"{cls}-{count}")
            class_images = [drawn or str(class_pictures(pipe, cls, count, Path(tmp) / "class"))]
        # Textual Inversion starts from the class word, as diffusers' recipe asks for an initializer word
        initializer = "class" if method == "textual-inversion" else ConceptSpec.initializer
        concept = train(host, [ConceptSpec(token="<sks>", class_word=cls, images=[tmp], initializer=initializer,
                                           class_images=class_images)], config,
                        out=Path(tmp) / "concept.safetensors").concept
        train_seconds = time.perf_counter() - started
        row = {"variant": label, "instance": instance, "seed": seed, "steps": steps}
        if concept.tokens:
            probe = DriftProbe(host.encode_text, cls, adjectives=world_modifiers())
            row["drift_rank"] = probe.measure("<sks>", concept.token_vectors[0].float()).rank
        else:
            row["drift_rank"] = None  # Infusion trains no token: the prompt's words keep their meaning
        if method in NO_FISHER:  # prompts without its word sample exactly as the base: 0 by construction
            row["fisher"] = None
        else:
            fisher = latent_fisher_divergence(host, {n: d.float() for n, d in concept.deltas.items()},
                                              other_captions(cls), tokens=concept.tokens, steps=10, seeds=(0,),
                                              latent_size=8, concepts=[])
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
        # Infusion is triggered by the class word; Textual Inversion's token stands for the object alone
        phrase = cls if not concept.tokens else "<sks>" if method == "textual-inversion" else f"<sks> {cls}"
        rows = []
        for sampled_label, sampled_tea in job.get("samplings", [(label, tea)]):  # one training, each sampling
            concept_pictures: dict = {}
            mine = dict(row, variant=sampled_label)
            mine.update(score(pipe, checker, clip, instance, phrase, references, SAMPLING_SEEDS,
                              keep=concept_pictures, tea=sampled_tea).to_dict())
            mine["wasserstein"] = wasserstein_metric(clip.image_features(every_picture(concept_pictures)),
                                                     base_features).value
            rows.append(mine)
        applied.remove()
    for mine in rows:
        mine["base"] = base_scores.to_dict()
        mine["train_seconds"], mine["seconds"] = round(train_seconds, 1), round(time.perf_counter() - started, 1)
    return rows


def training_jobs(variants, instances, seeds, steps: int, weights: str) -> list[dict]:
    """One job per (instance, seed, training): variants that differ only in how the concept is
    sampled (TEA's ρ) share the training, each scored on its own."""
    trainings: dict = {}
    for variant in variants:
        trainings.setdefault((variant[1], json.dumps(variant[2], sort_keys=True)), []).append(variant)
    return [{"instance": instance, "seed": seed, "variant": group[0], "samplings": [(v[0], v[3]) for v in group],
             "steps": steps, "threads": 1, "weights": weights}
            for instance in instances for seed in seeds for group in trainings.values()]


def rows_not_rerun(earlier: list[dict], jobs: list[dict]) -> list[dict]:
    """The rows of an earlier run that this run's ``jobs`` do not measure again: a row is
    replaced only by a run of the same variant, instance and training seed, so seeds can be added
    to a variant's rows in parts."""
    rerun = {(label, job["instance"], job["seed"]) for job in jobs for label, _ in job["samplings"]}
    return [r for r in earlier if (r["variant"], r["instance"], r["seed"]) not in rerun]


def clustered(values_by_instance: dict[str, list[float]]) -> list | None:
    """Mean and standard error of values grouped by instance: the SE of the per-instance means
    (a cluster-robust SE with equal cluster sizes), so seeds of one instance count once."""
    groups = [statistics.fmean(v) for v in values_by_instance.values() if v]
    if not groups:
        return None
    mean = statistics.fmean(v for vs in values_by_instance.values() for v in vs)
    se = statistics.stdev(groups) / len(groups) ** 0.5 if len(groups) > 1 else 0.0
    return [mean, se]


def by_instance(rows: list[dict], metric: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        if r.get(metric) is not None:
            out.setdefault(r["instance"], []).append(r[metric])
    return out


def summarize(rows: list[dict]) -> dict:
    """Per variant, mean ± instance-clustered SE of every metric; the base row from the base's
    scores on the class prompts (one per instance and seed)."""
    table = {}
    for label, *_ in ALL_VARIANTS:
        mine = [r for r in rows if r["variant"] == label]
        if mine:
            table[label] = {m: clustered(by_instance(mine, m)) for m in METRICS}
            table[label]["runs"] = len(mine)
            table[label]["instances"] = len({r["instance"] for r in mine})
    bases = list({(r["instance"], r["seed"]): dict(r["base"], instance=r["instance"]) for r in rows}.values())
    table["base (class prompt)"] = {m: clustered(by_instance(bases, m)) for m in METRICS}
    table["base (class prompt)"]["runs"] = len(bases)
    table["base (class prompt)"]["instances"] = len({b["instance"] for b in bases})
    return table


PAIRED_METRICS = ("identity", "composition_joint", "composition", "clip_t", "clip_i")


def paired(rows: list[dict], reference: str = "Custom Diffusion (λ=0)") -> dict:
    """Per variant, the paired difference to ``reference`` (same instance and seed), mean ±
    instance-clustered SE, and how many pairs went up and down."""
    ref = {(r["instance"], r["seed"]): r for r in rows if r["variant"] == reference}
    out = {}
    for label, *_ in ALL_VARIANTS:
        if label == reference:
            continue
        pairs = [(r, ref[(r["instance"], r["seed"])]) for r in rows
                 if r["variant"] == label and (r["instance"], r["seed"]) in ref]
        if not pairs:
            continue
        out[label] = {"pairs": len(pairs)}
        for metric in PAIRED_METRICS:
            out[label][metric] = paired_cell(pairs, metric)
    return out


def paired_cell(pairs: list[tuple[dict, dict]], metric: str) -> list:
    """Mine − theirs of ``metric`` over (mine, theirs) row pairs of the same instance and seed:
    mean, instance-clustered SE, pairs up, pairs down."""
    diffs: dict[str, list[float]] = {}
    for mine, theirs in pairs:
        diffs.setdefault(mine["instance"], []).append(mine[metric] - theirs[metric])
    flat = [d for ds in diffs.values() for d in ds]
    return clustered(diffs) + [sum(d > 0 for d in flat), sum(d < 0 for d in flat)]


def _cell(metric: str, value) -> str:
    if value is None:
        return "n/a" if metric == "fisher" else "–"
    if metric == "drift_rank":
        return f"{value[0]:.1f} ± {value[1]:.1f}"
    if metric in ("fisher", "wasserstein"):
        return f"{value[0]:.3g} ± {value[1]:.2g}"
    return f"{value[0]:.3f} ± {value[1]:.3f}"


def markdown(table: dict) -> str:
    heads = ("identity (checker) ↑", "joint composition ↑", "CLIP-I ↑", "composition (scene, add-on) ↑",
             "identity in composition ↑", "CLIP-T ↑", "drift rank ↓", "Fisher ↓", "W₂ ↓")
    lines = ["| method | " + " | ".join(heads) + " | runs (instances) |", "|---" * (len(heads) + 2) + "|"]
    for label, row in table.items():
        cells = [_cell(metric, row[metric]) if not (label.startswith("base") and row[metric] is None) else "–"
                 for metric in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['runs']} ({row['instances']}) |")
    return "\n".join(lines)


def paired_markdown(diffs: dict, reference: str = "Custom Diffusion (λ=0)") -> str:
    lines = [f"| vs {reference} | " + " | ".join(f"Δ {m}" for m in PAIRED_METRICS) + " | pairs |",
             "|---" * (len(PAIRED_METRICS) + 2) + "|"]
    for label, row in diffs.items():
        cells = [f"{row[m][0]:+.3f} ± {row[m][1]:.3f} ({row[m][2]}↑ {row[m][3]}↓)" for m in PAIRED_METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['pairs']} |")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """Identity (checker) against composition, one point per method and λ."""
    from classdiffusion.run.plot import plot_tradeoff

    points = {label.replace("λ", "lambda "): (*row["composition_joint"], *row["identity"])
              for label, row in table.items()}
    plot_tradeoff(points, x_label="joint composition (checker) ->", y_label="identity: instance score (checker)",
                  title="Toy world v2: identity vs joint composition (mean ± clustered SE)").save(path)


#: A trained Custom Diffusion / ClassDiffusion concept taken apart (toyworld_recipe.py --parts): both
#: parts as trained; only the token (the K/V deltas zeroed); only the K/V deltas (the token back at
#: the vector it started from) — which part costs the class in the composed pictures?
CONCEPT_PARTS = ("both", "token", "kv")
#: Sampling seeds of the base's class pictures for prior preservation (toyworld_recipe.py
#: --class-images): far from the scoring seeds (SAMPLING_SEEDS), so no scored picture is a class image.
CLASS_IMAGE_SEEDS = tuple(range(1000, 1400))


def class_pictures(pipe, cls: str, count: int, folder: Path) -> Path:
    """``count`` pictures of "a photo of a CLASS" drawn by the base (``pipe`` with no concept
    applied) into ``folder``: prior preservation's class images, as Custom Diffusion's and
    DreamBooth's recipes generate them. The sampling seeds are ``CLASS_IMAGE_SEEDS``, never a
    scoring seed."""
    import torch

    from classdiffusion.toyworld.evaluate import sample

    if count > len(CLASS_IMAGE_SEEDS):
        raise ValueError(f"at most {len(CLASS_IMAGE_SEEDS)} class images, not {count}")
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        drawn = sample(pipe, [f"a photo of a {cls}"], CLASS_IMAGE_SEEDS[:count])[0]
    for k, picture in enumerate(drawn):
        picture.save(folder / f"{k}.png")
    return folder


def draw_class_pictures(job: dict) -> str:
    """class_pictures in a worker process, on a fresh pipeline of the base."""
    import torch

    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.toyworld.base import base_path

    torch.set_num_threads(1)
    pipe = build_pipeline(base_path(Path(job["weights"])), device="cpu")
    return str(class_pictures(pipe, job["cls"], job["count"], Path(job["folder"])))


def concept_part(concept, part: str, start_vector):
    """``concept`` with only ``part`` of what it learned (CONCEPT_PARTS); the file is not changed."""
    import dataclasses

    import torch

    if part not in CONCEPT_PARTS:
        raise ValueError(f"part must be one of {CONCEPT_PARTS}, not {part!r}")
    if part == "token":
        return dataclasses.replace(concept, deltas={k: torch.zeros_like(v) for k, v in concept.deltas.items()},
                                   factors=None, exact=None)
    if part == "kv":
        vectors = start_vector.to(concept.token_vectors.dtype).expand_as(concept.token_vectors).clone()
        return dataclasses.replace(concept, token_vectors=vectors)
    return concept


def run_curve(job: dict) -> list[dict]:
    """Train one (instance, λ) to the last of ``CURVE_STEPS`` with step checkpoints and score each
    scored step's checkpoint; runs in a worker process."""
    import tempfile

    import torch

    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.concept import load_concept
    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.toyworld.demo import TOY_RECIPE
    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.toyworld.base import WEIGHTS, ToyClip, base_path
    from classdiffusion.toyworld.checker import Checker
    from classdiffusion.toyworld.evaluate import instance_pictures, picture_grid, score
    from classdiffusion.toyworld.world import World
    from classdiffusion.run.train import checkpoint_path, train

    torch.set_num_threads(job["threads"])
    weights = Path(job["weights"])
    base = base_path(weights)
    instance, seed, spl_weight, steps = job["instance"], job["seed"], job["spl_weight"], job["steps"]
    cls = World().instance(instance).cls
    references = instance_pictures(instance, seed=seed, scene=job.get("scenes") or "table")
    checker, clip = Checker.load(WEIGHTS / "checker.safetensors"), ToyClip(weights)
    pipe = build_pipeline(base, device="cpu")
    recipe = {**TOY_RECIPE, **job.get("recipe", {})}  # the recipe search (toyworld_recipe.py) overrides it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, picture in enumerate(references):
            picture.save(Path(tmp) / f"{k}.png")
        host = load_host(base, device="cpu")
        gap = min(b - a for a, b in zip((0,) + steps, steps))
        config = TrainConfig(method="classdiffusion", steps=max(steps), seed=seed, spl_weight=spl_weight,
                             save_every=gap, checkpoint_optimizer=False, **recipe)
        out = Path(tmp) / "concept.safetensors"
        initializer = job.get("initializer") or ConceptSpec.initializer  # the search may start from the class word
        # prior preservation on the base's own "a photo of a CLASS" pictures
        class_images = [str(class_pictures(pipe, cls, job["class_images"], Path(tmp) / "class"))] \
            if job.get("class_images") else []
        spec = ConceptSpec(token="<sks>", class_word=cls, images=[tmp], initializer=initializer,
                           class_images=class_images)
        train(host, [spec], config, out=out)
        start_vector = host.word_embedding(spec.initializer_word)  # the token's start, as training set it
        host.close()
        grid_rows, grid_labels = [], []
        for step in steps:
            trained = load_concept(out if step == max(steps) else checkpoint_path(out, step))
            for part in job.get("parts") or ("both",):
                concept = concept_part(trained, part, start_vector)
                pictures: dict = {}
                with torch.no_grad():
                    applied = apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
                    scores = score(pipe, checker, clip, instance, f"<sks> {cls}", references, SAMPLING_SEEDS,
                                   keep=pictures)
                    applied.remove()
                if job.get("grid") and part == "both":  # the identity prompt's pictures, then "… on the grass wearing a hat"
                    grid_rows.append(list(pictures["concept"]) + list(pictures["composition"][GRID_COMPOSITION]))
                    grid_labels.append(f"step {step}: {pictures['prompts'][0]} | {pictures['prompts'][GRID_COMPOSITION + 1]}")
                rows.append({"instance": instance, "seed": seed, "spl_weight": spl_weight, "step": step,
                             "learning_rate": recipe["learning_rate"], "initializer": initializer,
                             **({"class_images": job["class_images"],  # the prior term's mean over the run: it trained
                                 "prior_loss": round(statistics.fmean(h["prior"] for h in trained.history if "prior" in h), 4)}
                                if job.get("class_images") else {}),
                             **({"part": part} if job.get("parts") else {}), **scores.to_dict()})
    if job.get("score_base"):  # the base on the class prompt, for "token only − base" (--parts)
        with torch.no_grad():
            base_scores = score(pipe, checker, clip, instance, cls, references, SAMPLING_SEEDS)
        rows.append({"instance": instance, "seed": seed, "spl_weight": None, "step": 0, "part": "base",
                     **base_scores.to_dict()})
    if job.get("grid"):
        picture_grid(grid_rows, grid_labels).save(job["grid"])
    return rows


def curve_summary(rows: list[dict]) -> dict:
    """Per λ and step: identity and joint composition, mean ± instance-clustered SE."""
    out: dict = {}
    for weight in sorted({r["spl_weight"] for r in rows}):
        out[f"λ={weight:g}"] = {
            str(step): {m: clustered(by_instance([r for r in rows if r["spl_weight"] == weight and r["step"] == step], m))
                        for m in CURVE_METRICS}
            for step in sorted({r["step"] for r in rows})}
    return out


def curve_paired(rows: list[dict]) -> dict:
    """λ = 1 minus λ = 0 on the same instance and seed, per scored step, and the same for the
    *fall* from the first to the last scored step (does SPL change the slope?): mean,
    instance-clustered SE, pairs up, pairs down."""
    metrics = CURVE_METRICS
    steps = sorted({r["step"] for r in rows})
    runs: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        runs.setdefault((r["instance"], r["seed"], r["spl_weight"]), {})[r["step"]] = r
    keys = [(inst, seed) for inst, seed, weight in runs if weight == 0.0 and (inst, seed, 1.0) in runs]
    out: dict = {str(step): {m: paired_cell([(runs[(*k, 1.0)][step], runs[(*k, 0.0)][step]) for k in keys], m)
                             for m in metrics} for step in steps}

    def fall(run: dict[int, dict]) -> dict:
        return {"instance": run[steps[0]]["instance"],
                **{m: run[steps[-1]][m] - run[steps[0]][m] for m in metrics}}

    out[f"fall {steps[0]}→{steps[-1]}"] = {
        m: paired_cell([(fall(runs[(*k, 1.0)]), fall(runs[(*k, 0.0)])) for k in keys], m) for m in metrics}
    return out


def curve_markdown(summary: dict) -> str:
    steps = list(next(iter(summary.values())))
    lines = ["| λ | metric | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---" * (len(steps) + 2) + "|"]
    for label, per_step in summary.items():
        for metric in CURVE_METRICS:
            cells = [f"{per_step[s][metric][0]:.3f} ± {per_step[s][metric][1]:.3f}" for s in steps]
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_paired_markdown(diffs: dict) -> str:
    columns = list(diffs)
    lines = ["| λ=1 − λ=0, paired | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in CURVE_METRICS:
        cells = [f"{c[0]:+.3f} ± {c[1]:.3f} ({c[2]}↑ {c[3]}↓)" for c in (diffs[col][metric] for col in columns)]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PARTS_METRICS = ("identity", "composition_joint", "composition_class", "composition_identity", "composition")


def parts_summary(rows: list[dict]) -> dict:
    """--parts: per λ and part (as trained, token only, K/V only; and the base), mean ±
    instance-clustered SE; then the paired differences that say which part costs the class: token
    only − base and K/V only − as trained at each λ, and λ = 1 − λ = 0 of each part."""
    def pick(weight, part):
        return {(r["instance"], r["seed"]): r for r in rows if r.get("part") == part
                and (part == "base" or r["spl_weight"] == weight)}

    cells = {"base (class prompt)": {m: clustered(by_instance(list(pick(None, "base").values()), m)) for m in PARTS_METRICS}}
    diffs: dict = {}
    weights = sorted({r["spl_weight"] for r in rows if r.get("part") != "base"})
    base = pick(None, "base")
    for weight in weights:
        for part in CONCEPT_PARTS:
            cells[f"λ={weight:g}, {PART_LABELS[part]}"] = {
                m: clustered(by_instance(list(pick(weight, part).values()), m)) for m in PARTS_METRICS}
        both, token, kv = (pick(weight, part) for part in CONCEPT_PARTS)
        diffs[f"λ={weight:g}: token only − base"] = {
            m: paired_cell([(token[k], base[k]) for k in token if k in base], m) for m in PARTS_METRICS}
        diffs[f"λ={weight:g}: K/V only − as trained"] = {
            m: paired_cell([(kv[k], both[k]) for k in kv if k in both], m) for m in PARTS_METRICS}
    if len(weights) == 2:
        for part in CONCEPT_PARTS:
            high, low = pick(weights[1], part), pick(weights[0], part)
            diffs[f"{PART_LABELS[part]}: λ={weights[1]:g} − λ={weights[0]:g}"] = {
                m: paired_cell([(high[k], low[k]) for k in high if k in low], m) for m in PARTS_METRICS}
    return {"cells": cells, "paired": diffs}


PART_LABELS = {"both": "as trained", "token": "token only", "kv": "K/V only"}


def parts_markdown(summary: dict) -> str:
    lines = ["| concept | " + " | ".join(PARTS_METRICS) + " |", "|---" * (len(PARTS_METRICS) + 1) + "|"]
    for label, cell in summary["cells"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(m, cell[m]) for m in PARTS_METRICS) + " |")
    lines.append("| **paired** | | | | | |")
    for label, cell in summary["paired"].items():
        lines.append(f"| {label} | " + " | ".join(
            f"{c[0]:+.3f} ± {c[1]:.3f} ({c[2]}↑ {c[3]}↓)" if c else "–" for c in (cell[m] for m in PARTS_METRICS)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 instances × 1 seed (a smoke run, ≤ 10 min)")
    parser.add_argument("--instances", type=int, default=10, help="held-out instances (of 10)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds, from TABLE_SEEDS (1, 2, 3)")
    parser.add_argument("--training-seeds", type=int, nargs="+", choices=TABLE_SEEDS, default=None,
                        help="exactly these training seeds instead (e.g. 2 3, to add seeds to a --merge file)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--weights", type=Path, default=None, help="another toy-world weights folder")
    parser.add_argument("--variants", nargs="+", default=None, metavar="LABEL",
                        help="run only the variants whose label contains one of these (e.g. 'Textual'); the "
                             "prior-preservation rows run only when named ('prior')")
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier --json of the same settings: its rows of the variants not run now join the table")
    parser.add_argument("--curve", action="store_true",
                        help="the overfitting curve instead: λ = 0 and 1 to 1,600 steps on three instances")
    parser.add_argument("--curve-instances", nargs="+", default=list(CURVE_INSTANCES), metavar="NAME",
                        help="the curve's instances (names, or 'all' for the 10); default: one star, one box, one tree")
    parser.add_argument("--parts", action="store_true",
                        help="Custom Diffusion and ClassDiffusion (λ = 1) at the table's recipe and seeds, each "
                             "scored as trained, with only its token and with only its K/V deltas")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    import inspect
    import multiprocessing

    from classdiffusion.toyworld.demo import run_demo
    from classdiffusion.toyworld.base import WEIGHTS
    from classdiffusion.toyworld.world import INSTANCES, World

    weights = str(args.weights or WEIGHTS)
    started = time.perf_counter()
    if args.curve:
        curve_instances = [inst.name for inst in INSTANCES] if args.curve_instances == ["all"] else args.curve_instances
        unknown = sorted(set(curve_instances) - {inst.name for inst in INSTANCES})
        if unknown:
            parser.error(f"--curve-instances: unknown {unknown}; choose from {[inst.name for inst in INSTANCES]} or 'all'")
        jobs = [{"instance": name, "seed": TABLE_SEEDS[0], "spl_weight": weight, "steps": CURVE_STEPS, "threads": 1,
                 "weights": weights} for name in curve_instances for weight in (0.0, 1.0)]
        rows = []
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for part in pool.imap_unordered(run_curve, jobs):
                rows += part
                print(f"[{len(rows) // len(CURVE_STEPS)}/{len(jobs)}] {part[0]['instance']} λ={part[0]['spl_weight']:g}: "
                      + ", ".join(f"{r['step']}: {r['identity']:.2f}/{r['composition_joint']:.2f}" for r in part),
                      flush=True)
        summary, diffs = curve_summary(rows), curve_paired(rows)
        print(curve_markdown(summary))
        print(curve_paired_markdown(diffs))
        seconds = time.perf_counter() - started
        print(f"{len(jobs)} runs in {seconds / 60:.1f} min")
        if args.json:
            args.json.write_text(json.dumps({"curve": summary, "paired": diffs, "rows": rows, "seconds": round(seconds, 1),
                                             "settings": {"instances": curve_instances, "steps": list(CURVE_STEPS),
                                                          "seed": TABLE_SEEDS[0]}}, indent=2) + "\n")
        return 0

    steps = args.steps or inspect.signature(run_demo).parameters["steps"].default
    instances, seeds = (2, 1) if args.quick else (args.instances, args.seeds)
    training_seeds = list(TABLE_SEEDS[:seeds]) if args.quick or not args.training_seeds else sorted(set(args.training_seeds))
    if args.parts:
        jobs = [{"instance": inst.name, "seed": seed, "spl_weight": weight, "steps": (steps,), "threads": 1,
                 "weights": weights, "parts": list(CONCEPT_PARTS), "score_base": weight == 0.0}
                for inst in INSTANCES[:instances] for seed in training_seeds for weight in (0.0, 1.0)]
        rows = []
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for done, part in enumerate(pool.imap_unordered(run_curve, jobs), 1):
                rows += part
                print(f"[{done}/{len(jobs)}] {part[0]['instance']} seed {part[0]['seed']} λ={part[0]['spl_weight']:g}: "
                      + ", ".join(f"{r['part']} {r['identity']:.2f}/{r['composition_joint']:.2f}/"
                                  f"{r['composition_class']:.2f}" for r in part), flush=True)
        summary = parts_summary(rows)
        print(parts_markdown(summary))
        seconds = time.perf_counter() - started
        print(f"{len(jobs)} runs in {seconds / 60:.1f} min")
        if args.json:
            args.json.write_text(json.dumps({**summary, "rows": rows, "seconds": round(seconds, 1), "settings": {
                "instances": [inst.name for inst in INSTANCES[:instances]], "training_seeds": training_seeds,
                "steps": steps, "weights": weights}}, indent=1) + "\n")
        return 0
    seeds = len(training_seeds)
    # the prior-preservation rows are opt-in: only when --variants names them
    variants = [v for v in ALL_VARIANTS if any(part in v[0] for part in args.variants)] if args.variants else list(VARIANTS)
    jobs = training_jobs(variants, [inst.name for inst in INSTANCES[:instances]], training_seeds, steps, weights)
    runs = sum(len(job["samplings"]) for job in jobs)
    rows = []
    merged = []
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        if earlier["settings"]["steps"] != steps or not set(training_seeds) <= set(earlier["settings"]["training_seeds"]):
            parser.error(f"{args.merge} was run with other settings ({earlier['settings']})")
        merged = rows_not_rerun(earlier["rows"], jobs)
    import tempfile

    class_root = tempfile.TemporaryDirectory()  # the prior rows' class images, drawn once per class
    counts = {v[2].get("class_images", 0) for v in variants if v[2]} - {0}
    wanted = [(cls, count) for count in counts for cls in sorted({World().instance(j["instance"]).cls for j in jobs})]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        folders = dict(zip(wanted, pool.map(draw_class_pictures, [
            {"cls": cls, "count": count, "weights": weights, "folder": f"{class_root.name}/{cls}-{count}"}
            for cls, count in wanted])))
        for job in jobs:
            job["class_folders"] = {f"{cls}-{count}": folder for (cls, count), folder in folders.items()}
        for part in pool.imap_unordered(run_one, jobs):
            for row in part:
                rows.append(row)
                print(f"[{len(rows)}/{runs}] {row['variant']:24s} {row['instance']:18s} seed {row['seed']}: "
                      f"identity {row['identity']:.2f}, joint composition {row['composition_joint']:.2f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    table = summarize(rows + merged)
    diffs = paired(rows + merged)
    print(markdown(table))
    print()
    print(paired_markdown(diffs))
    with_prior = {label: cells for label, cells in paired(rows + merged, reference=PRIOR_VARIANTS[0][0]).items()
                  if label in {v[0] for v in PRIOR_VARIANTS}}  # λ = 1 against λ = 0, both with prior
    if with_prior:
        print()
        print(paired_markdown(with_prior, reference=PRIOR_VARIANTS[0][0]))
    print(f"{runs} rows from {len(jobs)} trainings in {seconds / 60:.1f} min ({instances} instances × {seeds} seeds, "
          f"{steps} steps)")
    settings = {"instances": [i.name for i in INSTANCES[:instances]], "seeds": seeds,
                "training_seeds": training_seeds, "steps": steps, "sampling_seeds": list(SAMPLING_SEEDS),
                "workers": args.workers}
    if merged:  # the earlier rows' settings stay the file's; the rows run now are listed beside them
        added = earlier["settings"].get("added", [])  # each merged run's settings, in order
        added = added if isinstance(added, list) else [added]
        settings = dict(earlier["settings"], added=added + [{"variants": [v[0] for v in variants], **settings}])
    result = {"table": table, "paired": diffs, "rows": rows + merged, "seconds": round(seconds, 1),
              "settings": settings, **({"paired_with_prior": with_prior} if with_prior else {})}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
