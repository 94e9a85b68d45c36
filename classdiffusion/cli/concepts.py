"""`classdiffusion generate | inspect | compress | import-diffusers | export-diffusers`: using
and converting concept files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InvalidInputError
from ..methods import method_class
from ..model.families import FAMILIES
from .common import (CONCEPT_SUFFIXES, Argument, Command, _finite, _image_size,
                     _positive_int, _share, _unit, _base_cross_attention, arg,
                     check_output_file, check_output_folder)

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


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..concept import checkpoint_table, read_metadata, run_files
    from ..methods import METHOD_CLASSES

    parsed = read_metadata(args.file)
    meta = {**parsed.to_dict(), "method_label": METHOD_CLASSES[parsed.method].label,
            "family_label": FAMILIES[parsed.family].label}
    if run_files(args.file)[1]:  # the run saved step checkpoints: list them to pick the best step
        meta["run_checkpoints"] = checkpoint_table(args.file)
    if not args.history:
        history = meta.pop("history", [])
        meta["history_steps"] = len(history)
        if history:
            meta["history_last"] = history[-1]
    json.dump(meta, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from ..concept import compress_concept, load_concept

    if (args.rank is None) == (args.energy is None):
        raise InvalidInputError("compress needs --rank R or --energy E (e.g. --energy 0.9), not both")
    check_output_file(args.out, "OUT", CONCEPT_SUFFIXES)
    concept = load_concept(args.file)
    try:
        method_class(concept.method).check_compressible(concept)
    except InvalidInputError as exc:
        print(f"{args.file}: {exc} Nothing written.")
        return 0
    compressed, _ = compress_concept(concept, rank=args.rank, energy=args.energy)
    out = compressed.save(args.out)
    info = compressed.meta.compression
    ranks = sorted(s["rank"] for s in info["layers"].values())
    print(f"{args.file}: {Path(args.file).stat().st_size / 2**20:.2f} MiB → {out}: {out.stat().st_size / 2**20:.2f} MiB")
    print(f"ranks {ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]}), relative error of the deltas: "
          f"max {info['max_relative_error']:.4f}, {info['parameters']:,} of {info['dense_parameters']:,} parameters")
    return 0


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    from ..concept.interop import import_custom_diffusion

    check_output_file(args.out, "--out", CONCEPT_SUFFIXES)
    concept = import_custom_diffusion(args.weights, _base_cross_attention(args), args.class_word,
                                      tokens=args.token, prompt=args.prompt)
    path = concept.save(args.out)
    print(f"saved {path}: tokens {concept.tokens}, class words {concept.class_words}, "
          f"{len(concept.deltas)} layers ({concept.train_mode})")
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    from ..concept import load_concept
    from ..concept.interop import export_custom_diffusion

    check_output_folder(args.out, "--out")
    for path in export_custom_diffusion(load_concept(args.concept), _base_cross_attention(args), args.out,
                                        strict=not args.force):
        print(path)
    print("load with: pipe.unet.load_attn_procs(DIR, weight_name='pytorch_custom_diffusion_weights.bin', "
          "_pipeline=pipe) and pipe.load_textual_inversion(DIR, weight_name='<token>.safetensors'), "
          "or use this concept file directly with `classdiffusion generate`")
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


def _inspect_arguments() -> list[Argument]:
    return [
        arg("file"),
        arg("--history", action="store_true", help="include the per-step loss history"),
    ]


def _compress_arguments() -> list[Argument]:
    return [
        arg("file"),
        arg("out"),
        arg("--rank", type=_positive_int, help="keep this many singular values per layer"),
        arg("--energy", type=_share, help="keep the fewest singular values holding this share of the energy (0–1]"),
    ]


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


def _export_arguments() -> list[Argument]:
    return [
        arg("--base", required=True),
        arg("--base-config"),
        arg("--concept", required=True),
        arg("--out", required=True, help="output folder"),
        arg("--force", action="store_true", help="export although the base differs from the concept's"),
    ]



COMMANDS = [
    Command('generate', "sample images with one or more concepts applied", _generate_arguments, cmd_generate),
    Command('inspect', "print a concept file's metadata as JSON (with its run's step checkpoints, if any)", _inspect_arguments, cmd_inspect),
    Command('compress', "store a concept's K/V deltas as truncated-SVD factors (smaller file)", _compress_arguments, cmd_compress),
    Command('import-diffusers', "a concept from diffusers' Custom Diffusion output (official ClassDiffusion code)", _import_arguments, cmd_import_diffusers),
    Command('export-diffusers', "write a concept in diffusers' Custom Diffusion format", _export_arguments, cmd_export_diffusers),
]
