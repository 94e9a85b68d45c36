"""`classdiffusion import-diffusers`: a concept from diffusers' Custom Diffusion output."""

from __future__ import annotations

import argparse

from .common import Argument, Command, CONCEPT_SUFFIXES, arg, _base_cross_attention, check_output_file


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    from ..concept.interop import import_custom_diffusion

    check_output_file(args.out, "--out", CONCEPT_SUFFIXES)
    concept = import_custom_diffusion(args.weights, _base_cross_attention(args), args.class_word,
                                      tokens=args.token, prompt=args.prompt)
    path = concept.save(args.out)
    print(f"saved {path}: tokens {concept.tokens}, class words {concept.class_words}, "
          f"{len(concept.deltas)} layers ({concept.train_mode})")
    return 0


def _import_arguments() -> list[Argument]:
    return [
        arg("--base", required=True, help="the base the weights were trained on"),
        arg("--base-config"),
        arg("--weights", required=True, help="the output folder (pytorch_custom_diffusion_weights.* + <new1>.*) or the weights file"),
        arg("--class-word", nargs="+", required=True, help="class word of each token, in token order"),
        arg("--token", nargs="+", help="tokens to import (default: every embedding file found)"),
        arg("--prompt", default="a photo of a {}", help="the training prompt template"),
        arg("--out", required=True),
    ]


COMMAND = Command(
    'import-diffusers',
    "a concept from diffusers' Custom Diffusion output (official ClassDiffusion code)",
    _import_arguments,
    cmd_import_diffusers,
)
