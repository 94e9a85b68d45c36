"""`classdiffusion demo`: a concept learned and scored on the committed toy base."""

from __future__ import annotations

import argparse

from ..model.families import FAMILIES, SD15, SDXL
from .common import Argument, Command, arg, check_output_folder, _finite, _positive_int


def cmd_demo(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    return DEMOS[args.family](args)


def _toy_demo(args: argparse.Namespace) -> int:
    """SD1.x: the toy base, a held-out instance learned and scored by the checker."""
    from ..toyworld.demo import DISCLAIMER, run_demo

    print(DISCLAIMER)
    summary = run_demo(args.out, steps=args.steps, spl_weight=args.spl_weight, seed=args.seed,
                       instance=args.instance, method=args.method, progress=not args.quiet)
    print(f"identity (the checker's instance score) {summary['identity_before']:.2f} before training → "
          f"{summary['identity_after']:.2f} after; joint composition (scene, add-on, class and look) "
          f"{summary['composition_joint_after']:.0%} (the base on the class prompt: "
          f"{summary['composition_joint_base']:.0%}); scene and add-on alone {summary['composition_after']:.0%}; "
          f"{summary['summary']}; "
          f"{summary['seconds']:.0f} s")
    print("wrote " + ", ".join(summary["files"].values()))
    print(DISCLAIMER)
    return 0


def _sdxl_demo(args: argparse.Namespace) -> int:
    """SDXL: a tiny random SDXL-shaped base, the SDXL path end to end (no look is learned)."""
    from ..toyworld.demo import SDXL_DISCLAIMER, run_sdxl_demo

    print(SDXL_DISCLAIMER)
    summary = run_sdxl_demo(args.out, steps=args.steps, spl_weight=args.spl_weight, seed=args.seed,
                            instance=args.instance, method=args.method, progress=not args.quiet)
    print(f"SDXL: {summary['layers']} cross-attention layers trained, token {summary['token_width']} wide "
          f"(768 CLIP-L + 1280 bigG); {summary['summary']}; {summary['seconds']:.0f} s")
    print("wrote " + ", ".join(summary["files"].values()))
    return 0


#: The demo of each model family (``--family``).
DEMOS = {SD15.name: _toy_demo, SDXL.name: _sdxl_demo}


def _toy_instances():
    from ..toyworld.world import INSTANCES

    return INSTANCES


def _demo_arguments() -> list[Argument]:
    from ..methods import DEFAULT_METHOD, METHOD_CLASSES

    return [
        arg("--out", required=True, help="output folder (grid.png, scores.json, concept.safetensors, images/)"),
        arg("--steps", type=_positive_int, default=400, help="training steps"),
        arg("--family", choices=list(FAMILIES), default="sd15",
            help="sd15: the toy base (a pretrained 64 px world); sdxl: a tiny SDXL-shaped random base "
            "built in OUT/base (the SDXL path end to end, no learned look)"),
        arg("--spl-weight", type=_finite, default=1.0, help="λ of the semantic preservation loss"),
        arg("--method", choices=list(METHOD_CLASSES), default=DEFAULT_METHOD, help="the training method"),
        arg("--instance", default="red_blue_star", choices=[i.name for i in _toy_instances()],
            help="which held-out toy-world instance to learn"),
        arg("--seed", type=int, default=0, help="seed of the pictures and of training"),
        arg("-q", "--quiet", action="store_true", help="no progress bar"),
    ]


COMMAND = Command(
    'demo',
    "learn a held-out toy-world concept on the committed toy base and score it (no downloads)",
    _demo_arguments,
    cmd_demo,
)
