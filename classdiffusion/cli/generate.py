"""`classdiffusion generate`: sample with concepts applied (and TEA at sampling time)."""

from __future__ import annotations

import argparse

from .common import Argument, Command, arg, check_output_folder, _finite, _image_size, _positive_int, _unit


def cmd_generate(args: argparse.Namespace) -> int:
    from ..concept.generate import generate

    check_output_folder(args.out, "--out")

    paths = generate(args.base, args.concept, args.prompt, args.out, steps=args.steps, guidance=args.guidance,
                     eta=args.eta, seed=args.seed, num_images=args.num_images, size=args.size,
                     strength=args.strength, strict=not args.force, base_config=args.base_config,
                     negative_prompt=args.negative_prompt, progress=not args.quiet, tea=args.tea,
                     tea_alpha=args.tea_alpha)
    for path in paths:
        print(path)
    return 0


def _generate_arguments() -> list[Argument]:
    return [
        arg("--base", required=True),
        arg("--base-config"),
        arg("--concept", nargs="*", default=[],
            help="concept file(s) to apply; none samples the base model alone (to compare)"),
        arg("--prompt", required=True, help="e.g. 'photo of a <sks> dog wearing headphones'"),
        arg("--negative-prompt"),
        arg("--out", required=True, help="output folder"),
        arg("--steps", type=_positive_int, default=100, help="sampling steps (paper: 100)"),
        arg("--guidance", type=_finite, default=6.0, help="classifier-free guidance (paper: 6.0)"),
        arg("--eta", type=_finite, default=1.0, help="DDIM eta (official README: 1.0)"),
        arg("--seed", type=int, default=0, help="sampling seed"),
        arg("--num-images", type=_positive_int, default=1, help="images for the prompt"),
        arg("--size", type=_image_size, help="image size, a multiple of 8 (default: the model's)"),
        arg("--strength", type=_finite, default=1.0, help="K/V delta (Infusion: residual) strength"),
        arg("--tea", type=_unit, default=0.0, metavar="RHO",
            help="TEA (test-time embedding adjustment, ICLR 2026): turn the prompt's text embedding RHO of the way "
                 "towards the class prompt's (the prompt without the token) at sampling time; 0 = off, the "
                 "source's default 0.2. Nothing in the concept file changes"),
        arg("--tea-alpha", type=_unit, default=0.5, metavar="ALPHA",
            help="with --tea: how far the embedding's norm moves to the class prompt's (the source: 0.5)"),
        arg("--force", action="store_true", help="apply a concept trained on another base"),
        arg("-q", "--quiet", action="store_true", help="no progress bar"),
    ]


COMMAND = Command('generate', "sample images with one or more concepts applied", _generate_arguments, cmd_generate)
