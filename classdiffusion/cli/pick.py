"""`classdiffusion pick`: which step of a run to keep."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (Argument, Command, arg, check_device, check_output_file, check_output_folder, _finite,
                     _positive_int, _read_prompts_file, _share)


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


COMMAND = Command(
    'pick',
    "score every step file of a run for identity and composition and choose the step to keep",
    _pick_arguments,
    cmd_pick,
)
