"""`classdiffusion eval`: drift, overfitting and image metrics of concepts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (Argument, Command, arg, check_device, check_output_folder, _finite, _image_size, _phase_bars,
                     _positive_int)


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


COMMAND = Command(
    'eval',
    "measure drift, overfitting and image metrics of concepts; JSON + PNG report",
    _eval_arguments,
    cmd_eval,
)
