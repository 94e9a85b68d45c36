"""`classdiffusion train`: one run from the command line (images or a concepts file, the settings' flags, resume)."""

from __future__ import annotations

import argparse
import signal
import logging
from pathlib import Path

from ..errors import InvalidInputError
from ..methods import METHOD_CLASSES
from .common import (Argument, Command, CONCEPT_SUFFIXES, IMAGE_SUFFIXES, arg, check_device, check_output_file,
                     setting_arguments, setting_overrides)

logger = logging.getLogger("classdiffusion")


def cmd_train(args: argparse.Namespace) -> int:
    from ..run.data import load_images
    from ..run.distributed import finish, from_environment
    from ..hosts.diffusers_host import load_host
    from ..methods import method_class
    from ..model.precision import precision_dtype
    from ..run.progress import TqdmCallbacks
    from ..run.train import train

    check_output_file(args.out, "--out", CONCEPT_SUFFIXES)  # checkpoints go beside it
    if args.plot:
        check_output_file(args.plot, "--plot", IMAGE_SUFFIXES)
    check_device(args.device)
    config, concepts, checkpoint = _train_inputs(args)
    ranks, device = from_environment(args.device)  # under torchrun: data-parallel, rank 0 writes

    # The images are read (and refused, if bad) before any model loads.
    images = [load_images(spec.images) for spec in concepts]
    class_images = [load_images(spec.class_images, "class") if spec.class_images else None for spec in concepts]
    host = load_host(args.base, base_config=args.base_config, device=device,
                     dtype=precision_dtype(config.mixed_precision))
    if checkpoint is None:  # e.g. SDXL trains at 1024 px unless --resolution says otherwise
        config = config.with_family_defaults(host.family, explicit=setting_overrides(args))
    callbacks = TqdmCallbacks(enabled=not args.quiet and ranks.is_main, description=method_class(config.method).label)
    stop = lambda *_: setattr(callbacks, "stop_requested", True)  # noqa: E731  (Ctrl-C and SIGTERM alike)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = train(host, concepts, config, images=images,
                       class_images=class_images if any(c is not None for c in class_images) else None,
                       out=args.out, resume=checkpoint, callbacks=callbacks,
                       meta_extra={"base_name": Path(args.base).name}, ranks=ranks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        finish(ranks)
    if ranks.is_main:
        _report_training(args, result)
    return 0


def _train_inputs(args: argparse.Namespace):
    """(settings, concepts, checkpoint or None) of ``train``: from the checkpoint with --resume,
    else from the flags (or --concepts FILE) under the method's recipe."""
    from ..concept import load_concept
    from ..config import ConceptSpec, TrainConfig, load_concepts_json
    from ..methods import DEFAULT_METHOD, method_class
    from ..run.resume import resume_settings

    overrides = setting_overrides(args)
    if args.validation_prompt:
        overrides["validation_prompts"] = list(args.validation_prompt)
    if args.resume:
        checkpoint = load_concept(args.resume)
        return (*resume_settings(checkpoint, overrides), checkpoint)
    config = TrainConfig.for_method(overrides.pop("method", DEFAULT_METHOD), **overrides)
    if args.concepts:
        concepts = load_concepts_json(args.concepts)
    else:
        token = method_class(config.method).concept_token(args.token)
        missing = [name for name, value in (("--token", token), ("--class-word", args.class_word),
                                            ("--images", args.images)) if not value]
        if missing:
            raise InvalidInputError(f"train needs {', '.join(missing)} (or --concepts FILE)")
        spec = dict(token=token, class_word=args.class_word, images=args.images,
                    class_images=args.class_images or [], masks=args.masks or [])
        spec.update({key: value for key, value in (("initializer", args.initializer), ("prompt", args.prompt))
                     if value})
        concepts = [ConceptSpec.from_dict(spec)]
    for spec in concepts:  # store absolute paths so a checkpoint can resume from anywhere
        for key in ("images", "class_images", "masks"):
            setattr(spec, key, [str(Path(p).resolve()) for p in getattr(spec, key)])
    return config, concepts, None


def _report_training(args: argparse.Namespace, result) -> None:
    from ..run.summary import summary_line

    if args.plot:
        from ..run.plot import plot_history

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_history(result.concept.history, tokens=result.concept.tokens).save(args.plot)
    size = result.path.stat().st_size
    print(f"saved {result.path} ({size / 1024:.1f} KB, {result.concept.method_label})")
    print(summary_line(result.concept.history))
    if result.validation_grid is not None:
        share = result.validation_seconds / max(result.seconds, 1e-9)
        print(f"validation: {100 * share:.0f} % of the run time ({result.validation_seconds:.1f} s); previews in "
              f"{Path(args.out).parent / 'validation'}")


def _train_arguments() -> list[Argument]:
    return [
        arg("--base", required=True, help="SD1.5 diffusers folder or single-file .safetensors"),
        arg("--base-config", help="diffusers config folder for a single-file base (offline)"),
        arg("--images", nargs="+", help="image files or folders of the concept (3–20 images)"),
        arg("--token", help="the new token, e.g. '<sks>' (not used by --method infusion)"),
        arg("--class-word", help="the concept's class, e.g. 'dog'"),
        arg("--initializer", help="word the token starts from (default 'ktn'; 'class' = the class word)"),
        arg("--prompt", help="prompt template with one {} (default 'a photo of a {}')"),
        arg("--class-images", nargs="+", help="class images for prior preservation (optional)"),
        arg("--masks", nargs="+", help="subject masks for --method infusion (white = subject), named like "
            "the images; default: IMAGES/mask/NAME, else each image's alpha channel, else none"),
        arg("--concepts", help="JSON list of concepts for multi-concept training"),
        arg("--out", required=True, help="output concept file (.safetensors)"),
        *setting_arguments(),
        arg("--validation-prompt", action="append", metavar="PROMPT",
            help="a validation prompt (repeat for more; default: the training phrase and the same "
            "'... wearing headphones'); used with --validation-every"),
        arg("--resume", help="continue from a checkpoint written with --save-every"),
        arg("--plot", help="also write a loss plot (PNG)"),
        arg("--device", help="cuda, cpu, ... (default: cuda if available)"),
        arg("-q", "--quiet", action="store_true", help="no progress bar"),
    ]


COMMAND = Command(
    'train',
    "train a concept: " + ", ".join(f"{m.label} (--method {m.name})" for m in METHOD_CLASSES.values()),
    _train_arguments,
    cmd_train,
)
