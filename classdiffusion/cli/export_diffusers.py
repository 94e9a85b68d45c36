"""`classdiffusion export-diffusers`: a concept in diffusers' Custom Diffusion format."""

from __future__ import annotations

import argparse

from .common import Argument, Command, arg, _base_cross_attention, check_output_folder


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


def _export_arguments() -> list[Argument]:
    return [
        arg("--base", required=True),
        arg("--base-config"),
        arg("--concept", required=True),
        arg("--out", required=True, help="output folder"),
        arg("--force", action="store_true", help="export although the base differs from the concept's"),
    ]


COMMAND = Command(
    'export-diffusers',
    "write a concept in diffusers' Custom Diffusion format",
    _export_arguments,
    cmd_export_diffusers,
)
