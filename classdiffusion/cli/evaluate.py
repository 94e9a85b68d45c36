"""`classdiffusion eval` and `pick`: what a concept costs, and which step of a run to keep."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (Argument, Command, _finite, _image_size,
                     _phase_bars, _positive_int, _read_prompts_file, _share, arg,
                     check_device, check_output_file, check_output_folder)

def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation.report import evaluate

    check_output_folder(args.out, "--out")
    check_device(args.device)

    def run(concepts, out):
        return evaluate(
            args.base, concepts, out, base_config=args.base_config, device=args.device, clip=args.clip,
            dino=args.dino, reference_images=args.reference_images, prompts_file=args.prompts,
            subject_kind=args.subject_kind, num_images=args.num_images, steps=args.steps, guidance=args.guidance,
            size=args.size, seed=args.seed, fisher_prompts_file=args.fisher_prompts, fisher_steps=args.fisher_steps,
            map_method=args.map, images=not args.no_images, strict=not args.force,
            progress=_phase_bars(not args.quiet),
            say=(lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr)),
        )

    if args.separately:
        return _eval_side_by_side(args, run)
    report = run(args.concept, args.out)
    for drift in report["drift"]:
        print(drift["summary"])
    print(f"Latent Fisher divergence: {report['latent_fisher_divergence']['value']:.6g}")
    for key, value in report.get("images", {}).items():
        if isinstance(value, float):
            print(f"{key}: {value:.4f}")
    if "wasserstein" in report:
        print(f"Wasserstein-2 ({report['wasserstein']['features']}): {report['wasserstein']['value']:.5g}")
    print(f"report: {Path(args.out) / 'report.json'}, summary: {Path(args.out) / 'summary.png'}")
    return 0


def _eval_side_by_side(args: argparse.Namespace, run) -> int:
    """Each concept evaluated alone (OUT/<n>-<name>/), then one table and comparison.json: e.g. a
    ClassDiffusion and an Infusion concept of the same images, on Infusion's own metrics."""
    from ..concept import read_metadata

    rows = []
    for k, path in enumerate(args.concept):
        out = Path(args.out) / f"{k + 1}-{Path(path).stem}"
        report = run([path], out)
        meta = read_metadata(path)
        drift = report["drift"][0] if report["drift"] else None
        images = report.get("images", {})
        rows.append({
            "concept": str(path), "method": meta.method, "file_kb": round(Path(path).stat().st_size / 1024, 1),
            "latent_fisher_divergence": report["latent_fisher_divergence"]["value"],
            "wasserstein": report.get("wasserstein", {}).get("value"),
            "drift_rank": None if drift is None else [drift["before"]["rank"], drift["after"]["rank"],
                                                      drift["after"]["total"]],
            **{key: value for key, value in images.items() if isinstance(value, float)},
            "report": str(out / "report.json"),
        })
    keys = ["method", "file_kb", "latent_fisher_divergence", "wasserstein", "drift_rank"]
    keys += sorted({key for row in rows for key in row} - set(keys) - {"concept", "report"})

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.5g}"
        if isinstance(value, list):
            return f"{value[0]} → {value[1]}/{value[2]}"
        return str(value)

    print("| concept | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {Path(row['concept']).name} | " + " | ".join(cell(row.get(key)) for key in keys) + " |")
    (Path(args.out) / "comparison.json").write_text(json.dumps(rows, indent=2))
    print(f"comparison: {Path(args.out) / 'comparison.json'}")
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    from ..evaluation.picker import pick_on_base

    if args.out:
        check_output_folder(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json", (".json",))
    check_device(args.device)
    prompts = _read_prompts_file(args.prompts) if args.prompts else None
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(desc="scoring steps", unit="file", leave=True)

    def on_step(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        result = pick_on_base(
            args.run, args.base, references=args.references, clip=args.clip, dino=args.dino, prompts=prompts,
            seeds=range(args.seed, args.seed + args.num_images), steps=args.steps, guidance=args.guidance,
            tolerance=args.tolerance, base_config=args.base_config, device=args.device, out=args.out,
            strict=not args.force, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    extra = [key for key in ("clip_t", "context", "dino_i") if getattr(result.steps[0], key) is not None]
    print("| step | identity | composition | " + " | ".join(extra) + " |")
    print("|---" * (3 + len(extra)) + "|")
    for s in result.steps:
        mark = " ←" if s.step == result.chosen_step else ""
        print(f"| {s.step}{mark} | {s.identity:.4f} | {s.composition:.4f} | "
              + " | ".join(f"{getattr(s, key):.4f}" for key in extra) + " |")
    print(f"chosen: {result.chosen_file}\n  {result.reason}")
    if args.json:
        from ..concept import atomic_write

        atomic_write(args.json, json.dumps(result.to_dict(), indent=2).encode() + b"\n")
    if args.out:
        print(f"table: {Path(args.out) / 'pick.json'}, plot: {Path(args.out) / 'plot.png'}, "
              f"grid: {Path(args.out) / 'grid.png'}")
    return 0


def _eval_arguments() -> list[Argument]:
    return [
        arg("--base", required=True),
        arg("--base-config"),
        arg("--concept", nargs="+", required=True, help="concept file(s)"),
        arg("--out", required=True, help="output folder (report.json, summary.png, images)"),
        arg("--clip", help="local CLIP folder (e.g. clip-vit-large-patch14) for CLIP-T / CLIP-I"),
        arg("--dino", help="local DINO ViT-S/16 folder (dino-vits16) for DINO-I"),
        arg("--reference-images", nargs="+", help="the concept's real images (default: its training images)"),
        arg("--prompts", help="prompt file, one per line with the token (default: DreamBooth's 25)"),
        arg("--subject-kind", choices=["auto", "live", "object"], default="auto",
            help="which DreamBooth prompt set (auto: live for animals and people)"),
        arg("--num-images", type=_positive_int, default=1, help="images per prompt (papers: 4–20)"),
        arg("--steps", type=_positive_int, help="sampling steps (default: 50 for an SD1.5-sized base, 10 for "
            "small bases such as the toy base)"),
        arg("--guidance", type=_finite, default=6.0, help="classifier-free guidance (paper: 6.0)"),
        arg("--size", type=_image_size, help="image size, a multiple of 8 (default: the model's)"),
        arg("--seed", type=int, default=0, help="seed of image 0 of each prompt (image j: seed + j)"),
        arg("--fisher-prompts", help="prompts without the concept for the Fisher divergence (file)"),
        arg("--fisher-steps", type=_positive_int, default=20, help="DDIM timesteps of the Fisher divergence"),
        arg("--map", choices=["pca", "tsne"], default="pca", help="2-D map of the drift view"),
        arg("--no-images", action="store_true", help="drift and Fisher divergence only (fast)"),
        arg("--separately", action="store_true", help="evaluate each concept alone and print them side by "
            "side (e.g. a ClassDiffusion and an Infusion concept of the same images)"),
        arg("--force", action="store_true", help="evaluate a concept trained on another base"),
        arg("--device", help="cuda, cpu, ... (default: cuda if available)"),
        arg("-q", "--quiet", action="store_true", help="no plan and no progress bars"),
    ]


def _pick_arguments() -> list[Argument]:
    return [
        arg("run", help="the run's final concept file or any of its -stepNNNNN files"),
        arg("--base", required=True),
        arg("--base-config"),
        arg("--references", nargs="+", help="the concept's photos (default: its training images, if still there)"),
        arg("--clip", help="local CLIP folder to score with (default on the toy base: its toy CLIP; 'toy' "
            "asks for it)"),
        arg("--dino", help="local DINO ViT folder: DINO-I beside CLIP-I"),
        arg("--prompts", help="composition prompts, one per line with the token (default: scenes and a hat "
            "from the paper's list; on the toy base, the world's composition prompts)"),
        arg("--num-images", type=_positive_int, default=4, help="seeds per prompt"),
        arg("--seed", type=int, default=0, help="the first seed (seeds: seed … seed + num-images − 1)"),
        arg("--steps", type=_positive_int, help="sampling steps (default: 50 for an SD1.5-sized base, 10 for "
            "small bases such as the toy base)"),
        arg("--guidance", type=_finite, default=6.0, help="classifier-free guidance (paper: 6.0)"),
        arg("--tolerance", type=_share, default=0.5, help="the rule: the best identity among steps whose "
            "composition keeps ≥ 1 − tolerance of the run's composition range"),
        arg("--out", help="folder for pick.json, plot.png and grid.png (chosen vs last step)"),
        arg("--json", help="write the per-step scores and the choice here"),
        arg("--force", action="store_true", help="score a run trained on another base"),
        arg("--device", help="cuda, cpu, ... (default: cuda if available)"),
        arg("-q", "--quiet", action="store_true", help="no progress bar"),
    ]



COMMANDS = [
    Command('eval', "measure drift, overfitting and image metrics of concepts; JSON + PNG report", _eval_arguments, cmd_eval),
    Command('pick', "score every step file of a run for identity and composition and choose the step to keep", _pick_arguments, cmd_pick),
]
