"""`classdiffusion compress`: a concept's K/V deltas as truncated-SVD factors."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError
from ..methods import method_class
from .common import Argument, Command, CONCEPT_SUFFIXES, arg, check_output_file, _positive_int, _share


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


def _compress_arguments() -> list[Argument]:
    return [
        arg("file"),
        arg("out"),
        arg("--rank", type=_positive_int, help="keep this many singular values per layer"),
        arg("--energy", type=_share, help="keep the fewest singular values holding this share of the energy (0–1]"),
    ]


COMMAND = Command(
    'compress',
    "store a concept's K/V deltas as truncated-SVD factors (smaller file)",
    _compress_arguments,
    cmd_compress,
)
