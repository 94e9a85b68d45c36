"""`classdiffusion train | generate | inspect | demo` — the trainer outside ComfyUI."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import ClassDiffusionError, InvalidInputError, TrainingCancelled
from .families import FAMILIES

logger = logging.getLogger("classdiffusion")


CONCEPT_SUFFIXES = (".safetensors", ".sft")  #: what the loader reads back
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_output_file(value: str, flag: str, suffixes: Sequence[str]) -> Path:
    """Refuse, before any model loads, an output the run could not write or the project could not
    read back: a wrong extension, an existing folder or special file, an unwritable place."""
    path = Path(value)
    if path.is_dir():
        raise InvalidInputError(f"{flag} {value} is a folder; give a file name such as {path / ('out' + suffixes[0])}.")
    if path.suffix.lower() not in suffixes:
        raise InvalidInputError(f"{flag} {value}: the file name must end in {' or '.join(suffixes)} "
                                "(other names are not read back).")
    if path.exists() and not path.is_file():
        raise InvalidInputError(f"{flag} {value} exists and is not a regular file.")
    _check_writable(path.parent, flag)
    return path


def check_output_folder(value: str, flag: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{flag} {value} is an existing file; give a folder.")
    _check_writable(path, flag)
    return path


def _check_writable(folder: Path, flag: str) -> None:
    """The nearest existing folder on the way to ``folder`` accepts a new file (tried for real: root
    passes permission checks on read-only file systems)."""
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InvalidInputError(f"{flag}: {probe} is a file, so {folder} cannot be created.")
    try:
        fd, name = tempfile.mkstemp(prefix=".classdiffusion-write-test.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise InvalidInputError(f"{flag}: cannot write in {probe} ({exc.strerror}).") from None


def check_device(name: str | None) -> str | None:
    """A device PyTorch knows and this machine has."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError("--device cuda: CUDA is not available here (no GPU, or a CPU-only "
                                    "PyTorch); use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s).")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError("--device mps: Apple's MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise InvalidInputError(f"--device {name}: only cpu, cuda and mps are supported.")
    return name


class _DefaultsHelp(argparse.HelpFormatter):
    """Every option's default in its help, unless the help says it already or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {action.default})".strip()


def _phase_bars(enabled: bool):
    """progress(phase, total) for evaluate(): one tqdm bar per phase on stderr."""

    def phase(name: str, total: int):
        if not enabled or total <= 0:
            return lambda: None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=name, unit="step", leave=True)

        def advance() -> None:
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        return advance

    return phase


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig setting that has a flag, with the help, type and choices
    written on the field (config.setting). Unset options stay None: the config's default or, when
    resuming, the checkpoint's value."""
    import dataclasses

    from .config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("cli")
        if not flag:
            continue
        help_text = f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_const", const=not f.default, default=None,
                                help=help_text + (" (on by default; this turns it off)" if f.default else ""))
            continue
        kind = {int: _positive_int if f.metadata.get("min") == 1 else _whole, float: _finite}.get(type(f.default))
        parser.add_argument(flag, dest=f.name, type=kind, choices=f.metadata.get("choices"), default=None,
                            help=f"{help_text} (default {f.default})")


def setting_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig settings given on the command line."""
    import dataclasses

    from .config import TrainConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.metadata.get("cli") and getattr(args, f.name, None) is not None}


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _image_size(text: str) -> int:
    value = _positive_int(text)
    if value < 64 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, at least 64 (got {value}); SD1.5: 512")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def _share(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {value})")
    return value


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that every cleanup (temporary files) runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_images
    from .distributed import finish, from_environment
    from .hosts.diffusers_host import load_host
    from .methods import method_class
    from .precision import precision_dtype
    from .progress import TqdmCallbacks
    from .train import train

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
    from .concept import load_concept
    from .config import ConceptSpec, TrainConfig, load_concepts_json
    from .methods import DEFAULT_METHOD, method_class
    from .resume import resume_settings

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
    from .summary import summary_line

    if args.plot:
        from .plot import plot_history

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_history(result.concept.history, tokens=result.concept.tokens).save(args.plot)
    size = result.path.stat().st_size
    print(f"saved {result.path} ({size / 1024:.1f} KB, {result.concept.method_label})")
    print(summary_line(result.concept.history))
    if result.validation_grid is not None:
        share = result.validation_seconds / max(result.seconds, 1e-9)
        print(f"validation: {100 * share:.0f} % of the run time ({result.validation_seconds:.1f} s); previews in "
              f"{Path(args.out).parent / 'validation'}")


def cmd_queue(args: argparse.Namespace) -> int:
    """Every job of JOBS.json, one per device at a time; a summary table at the end. Exit 1 if a
    job failed (the others still ran)."""
    import torch

    from .jobs import load_jobs, run_queue, summary_table

    jobs = load_jobs(args.jobs)
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        for device in devices:
            check_device(device)
    elif torch.cuda.is_available():
        devices = [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    else:
        devices = ["cpu"]
    if args.workers:
        if devices != ["cpu"]:
            raise InvalidInputError("--workers is for the CPU; with GPUs give --devices (one job per device).")
        devices = ["cpu"] * args.workers
    print(f"{len(jobs)} job(s) on {len(devices)} worker(s): {', '.join(devices)}", flush=True)
    results = run_queue(jobs, devices, base=args.base,
                        on_result=lambda r: print(f"{r.name}: {r.status}{': ' + r.message if r.message else ''}",
                                                  flush=True))
    print(summary_table(results))
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    check_output_folder(args.out, "--out")

    paths = generate(args.base, args.concept, args.prompt, args.out, steps=args.steps, guidance=args.guidance,
                     eta=args.eta, seed=args.seed, num_images=args.num_images, size=args.size,
                     strength=args.strength, strict=not args.force, base_config=args.base_config,
                     negative_prompt=args.negative_prompt, progress=not args.quiet)
    for path in paths:
        print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .concept import checkpoint_table, read_metadata, run_files
    from .methods import METHOD_CLASSES

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


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.report import evaluate

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
    from .concept import read_metadata

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
    from .evaluation.picker import pick_on_base

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
        from .concept import atomic_write

        atomic_write(args.json, json.dumps(result.to_dict(), indent=2).encode() + b"\n")
    if args.out:
        print(f"table: {Path(args.out) / 'pick.json'}, plot: {Path(args.out) / 'plot.png'}, "
              f"grid: {Path(args.out) / 'grid.png'}")
    return 0


def _read_prompts_file(path: str) -> list[str]:
    from .evaluation.report import _read_prompts

    try:
        return _read_prompts(path)
    except OSError as exc:
        raise InvalidInputError(f"Cannot read the prompt file {path}: {exc.strerror or exc}.") from None


def cmd_compress(args: argparse.Namespace) -> int:
    from .concept import compress_concept, load_concept

    if (args.rank is None) == (args.energy is None):
        raise InvalidInputError("compress needs --rank R or --energy E (e.g. --energy 0.9), not both")
    check_output_file(args.out, "OUT", CONCEPT_SUFFIXES)
    concept = load_concept(args.file)
    if concept.residuals:
        values = sum(r.numel() for r in concept.residuals.values())
        print(f"{args.file} is an Infusion concept: {values} residual values ({values * 4 / 1024:.0f} KB), one "
              "vector per layer; there is nothing for a low-rank factorisation to shrink. Nothing written.")
        return 0
    compressed, _ = compress_concept(concept, rank=args.rank, energy=args.energy)
    out = compressed.save(args.out)
    info = compressed.meta.compression
    ranks = sorted(s["rank"] for s in info["layers"].values())
    print(f"{args.file}: {Path(args.file).stat().st_size / 2**20:.2f} MiB → {out}: {out.stat().st_size / 2**20:.2f} MiB")
    print(f"ranks {ranks[0]}–{ranks[-1]} (median {ranks[len(ranks) // 2]}), relative error of the deltas: "
          f"max {info['max_relative_error']:.4f}, {info['parameters']:,} of {info['dense_parameters']:,} parameters")
    return 0


def _base_cross_attention(args: argparse.Namespace) -> dict:
    from .hosts.diffusers_host import load_components
    from .kv import cross_attention_weights

    unet = load_components(args.base, base_config=args.base_config)[2]
    return cross_attention_weights(unet, "crossattn")


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    from .interop import import_custom_diffusion

    check_output_file(args.out, "--out", CONCEPT_SUFFIXES)
    concept = import_custom_diffusion(args.weights, _base_cross_attention(args), args.class_word,
                                      tokens=args.token, prompt=args.prompt)
    path = concept.save(args.out)
    print(f"saved {path}: tokens {concept.tokens}, class words {concept.class_words}, "
          f"{len(concept.deltas)} layers ({concept.train_mode})")
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    from .concept import load_concept
    from .interop import export_custom_diffusion

    check_output_folder(args.out, "--out")
    for path in export_custom_diffusion(load_concept(args.concept), _base_cross_attention(args), args.out,
                                        strict=not args.force):
        print(path)
    print("load with: pipe.unet.load_attn_procs(DIR, weight_name='pytorch_custom_diffusion_weights.bin', "
          "_pipeline=pipe) and pipe.load_textual_inversion(DIR, weight_name='<token>.safetensors'), "
          "or use this concept file directly with `classdiffusion generate`")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DISCLAIMER, SDXL_DISCLAIMER, run_demo, run_sdxl_demo

    check_output_folder(args.out, "--out")
    if args.family == "sdxl":
        print(SDXL_DISCLAIMER)
        summary = run_sdxl_demo(args.out, steps=args.steps, spl_weight=args.spl_weight, seed=args.seed,
                                instance=args.instance, method=args.method, progress=not args.quiet)
        print(f"SDXL: {summary['layers']} cross-attention layers trained, token {summary['token_width']} wide "
              f"(768 CLIP-L + 1280 bigG); {summary['summary']}; {summary['seconds']:.0f} s")
        print("wrote " + ", ".join(summary["files"].values()))
        return 0
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


def configure_output(*, verbose: bool) -> None:
    """What a run prints: our warnings, the memory plan as one plain line, progress bars.

    Without ``-v``, the libraries' own notices are left out: transformers' and diffusers' loading
    bars ("Loading weights", "Writing model shards"), diffusers' advice to install accelerate
    (loading is not slower without it here: docs/development.md) and transformers' note that
    torchvision is missing for image processors the trainer does not use. Their errors still show."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .memory import PLAN_LOGGER

    plan_logger = logging.getLogger(PLAN_LOGGER)
    if not verbose and not plan_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        plan_logger.addHandler(handler)
        plan_logger.setLevel(logging.INFO)
        plan_logger.propagate = False
    if not verbose:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library in (diffusers_logging, transformers_logging):
            library.set_verbosity_error()
            library.disable_progress_bar()


def _toy_instances():
    from .toyworld.world import INSTANCES

    return INSTANCES


def _add_pick_parser(sub) -> None:
    """`classdiffusion pick` (docs/evaluation.md#picking-the-step)."""
    pk = sub.add_parser("pick", formatter_class=_DefaultsHelp,
        help="score every step file of a run for identity and composition and choose the step to keep")
    pk.add_argument("run", help="the run's final concept file or any of its -stepNNNNN files")
    pk.add_argument("--base", required=True)
    pk.add_argument("--base-config")
    pk.add_argument("--references", nargs="+", help="the concept's photos (default: its training images, if still there)")
    pk.add_argument("--clip", help="local CLIP folder to score with (default on the toy base: its toy CLIP; 'toy' "
                    "asks for it)")
    pk.add_argument("--dino", help="local DINO ViT folder: DINO-I beside CLIP-I")
    pk.add_argument("--prompts", help="composition prompts, one per line with the token (default: scenes and a hat "
                    "from the paper's list; on the toy base, the world's composition prompts)")
    pk.add_argument("--num-images", type=_positive_int, default=4, help="seeds per prompt")
    pk.add_argument("--seed", type=int, default=0, help="the first seed (seeds: seed … seed + num-images − 1)")
    pk.add_argument("--steps", type=_positive_int, help="sampling steps (default: 50 for an SD1.5-sized base, 10 for "
                    "small bases such as the toy base)")
    pk.add_argument("--guidance", type=_finite, default=6.0, help="classifier-free guidance (paper: 6.0)")
    pk.add_argument("--tolerance", type=_share, default=0.5, help="the rule: the best identity among steps whose "
                    "composition keeps ≥ 1 − tolerance of the run's composition range")
    pk.add_argument("--out", help="folder for pick.json, plot.png and grid.png (chosen vs last step)")
    pk.add_argument("--json", help="write the per-step scores and the choice here")
    pk.add_argument("--force", action="store_true", help="score a run trained on another base")
    pk.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    pk.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pk.set_defaults(func=cmd_pick)


def build_parser() -> argparse.ArgumentParser:
    from .methods import DEFAULT_METHOD, METHOD_CLASSES

    parser = argparse.ArgumentParser(prog="classdiffusion", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", formatter_class=_DefaultsHelp,
        help="train a concept: " + ", ".join(f"{m.label} (--method {m.name})" for m in METHOD_CLASSES.values()))
    train.add_argument("--base", required=True, help="SD1.5 diffusers folder or single-file .safetensors")
    train.add_argument("--base-config", help="diffusers config folder for a single-file base (offline)")
    train.add_argument("--images", nargs="+", help="image files or folders of the concept (3–20 images)")
    train.add_argument("--token", help="the new token, e.g. '<sks>' (not used by --method infusion)")
    train.add_argument("--class-word", help="the concept's class, e.g. 'dog'")
    train.add_argument("--initializer", help="word the token starts from (default 'ktn'; 'class' = the class word)")
    train.add_argument("--prompt", help="prompt template with one {} (default 'a photo of a {}')")
    train.add_argument("--class-images", nargs="+", help="class images for prior preservation (optional)")
    train.add_argument("--masks", nargs="+", help="subject masks for --method infusion (white = subject), named like "
                       "the images; default: IMAGES/mask/NAME, else each image's alpha channel, else none")
    train.add_argument("--concepts", help="JSON list of concepts for multi-concept training")
    train.add_argument("--out", required=True, help="output concept file (.safetensors)")
    add_setting_arguments(train)
    train.add_argument("--validation-prompt", action="append", metavar="PROMPT",
                       help="a validation prompt (repeat for more; default: the training phrase and the same "
                       "'... wearing headphones'); used with --validation-every")
    train.add_argument("--resume", help="continue from a checkpoint written with --save-every")
    train.add_argument("--plot", help="also write a loss plot (PNG)")
    train.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    queue = sub.add_parser("queue", formatter_class=_DefaultsHelp,
        help="train a list of concepts, one job per device at a time; a rerun skips finished jobs and resumes "
             "interrupted ones")
    queue.add_argument("jobs", help="JOBS.json: a list of --concepts entries, each with \"out\" and optional "
                                    "\"settings\" and \"base\" (docs/cli.md)")
    queue.add_argument("--devices", help="comma-separated devices, e.g. cuda:0,cuda:1 (default: every GPU, else "
                                         "the CPU)")
    queue.add_argument("--workers", type=_positive_int, default=None,
                       help="CPU worker processes (the CPU's cores are shared among them); default 1")
    queue.add_argument("--base", help="the base of jobs that name none")
    queue.set_defaults(func=cmd_queue)

    gen = sub.add_parser("generate", formatter_class=_DefaultsHelp,
        help="sample images with one or more concepts applied")
    gen.add_argument("--base", required=True)
    gen.add_argument("--base-config")
    gen.add_argument("--concept", nargs="*", default=[],
                     help="concept file(s) to apply; none samples the base model alone (to compare)")
    gen.add_argument("--prompt", required=True, help="e.g. 'photo of a <sks> dog wearing headphones'")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--steps", type=_positive_int, default=100, help="sampling steps (paper: 100)")
    gen.add_argument("--guidance", type=_finite, default=6.0, help="classifier-free guidance (paper: 6.0)")
    gen.add_argument("--eta", type=_finite, default=1.0, help="DDIM eta (official README: 1.0)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--num-images", type=_positive_int, default=1, help="images for the prompt")
    gen.add_argument("--size", type=_image_size, help="image size, a multiple of 8 (default: the model's)")
    gen.add_argument("--strength", type=_finite, default=1.0, help="K/V delta (Infusion: residual) strength")
    gen.add_argument("--force", action="store_true", help="apply a concept trained on another base")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    ins = sub.add_parser("inspect", formatter_class=_DefaultsHelp,
        help="print a concept file's metadata as JSON (with its run's step checkpoints, if any)")
    ins.add_argument("file")
    ins.add_argument("--history", action="store_true", help="include the per-step loss history")
    ins.set_defaults(func=cmd_inspect)

    ev = sub.add_parser("eval", formatter_class=_DefaultsHelp,
        help="measure drift, overfitting and image metrics of concepts; JSON + PNG report")
    ev.add_argument("--base", required=True)
    ev.add_argument("--base-config")
    ev.add_argument("--concept", nargs="+", required=True, help="concept file(s)")
    ev.add_argument("--out", required=True, help="output folder (report.json, summary.png, images)")
    ev.add_argument("--clip", help="local CLIP folder (e.g. clip-vit-large-patch14) for CLIP-T / CLIP-I")
    ev.add_argument("--dino", help="local DINO ViT-S/16 folder (dino-vits16) for DINO-I")
    ev.add_argument("--reference-images", nargs="+", help="the concept's real images (default: its training images)")
    ev.add_argument("--prompts", help="prompt file, one per line with the token (default: DreamBooth's 25)")
    ev.add_argument("--subject-kind", choices=["auto", "live", "object"], default="auto",
                    help="which DreamBooth prompt set (auto: live for animals and people)")
    ev.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt (papers: 4–20)")
    ev.add_argument("--steps", type=_positive_int, help="sampling steps (default: 50 for an SD1.5-sized base, 10 for "
                    "small bases such as the toy base)")
    ev.add_argument("--guidance", type=_finite, default=6.0, help="classifier-free guidance (paper: 6.0)")
    ev.add_argument("--size", type=_image_size, help="image size, a multiple of 8 (default: the model's)")
    ev.add_argument("--seed", type=int, default=0, help="seed of image 0 of each prompt (image j: seed + j)")
    ev.add_argument("--fisher-prompts", help="prompts without the concept for the Fisher divergence (file)")
    ev.add_argument("--fisher-steps", type=_positive_int, default=20, help="DDIM timesteps of the Fisher divergence")
    ev.add_argument("--map", choices=["pca", "tsne"], default="pca", help="2-D map of the drift view")
    ev.add_argument("--no-images", action="store_true", help="drift and Fisher divergence only (fast)")
    ev.add_argument("--separately", action="store_true", help="evaluate each concept alone and print them side by "
                    "side (e.g. a ClassDiffusion and an Infusion concept of the same images)")
    ev.add_argument("--force", action="store_true", help="evaluate a concept trained on another base")
    ev.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no plan and no progress bars")
    ev.set_defaults(func=cmd_eval)

    _add_pick_parser(sub)

    comp = sub.add_parser("compress", formatter_class=_DefaultsHelp,
        help="store a concept's K/V deltas as truncated-SVD factors (smaller file)")
    comp.add_argument("file")
    comp.add_argument("out")
    comp.add_argument("--rank", type=_positive_int, help="keep this many singular values per layer")
    comp.add_argument("--energy", type=_share, help="keep the fewest singular values holding this share of the energy (0–1]")
    comp.set_defaults(func=cmd_compress)

    imp = sub.add_parser("import-diffusers", formatter_class=_DefaultsHelp,
        help="a concept from diffusers' Custom Diffusion output (official ClassDiffusion code)")
    imp.add_argument("--base", required=True, help="the base the weights were trained on")
    imp.add_argument("--base-config")
    imp.add_argument("--weights", required=True, help="the output folder (pytorch_custom_diffusion_weights.* + <new1>.*) or the weights file")
    imp.add_argument("--class-word", nargs="+", required=True, help="class word of each token, in token order")
    imp.add_argument("--token", nargs="+", help="tokens to import (default: every embedding file found)")
    imp.add_argument("--prompt", default="a photo of a {}", help="the training prompt template")
    imp.add_argument("--out", required=True)
    imp.set_defaults(func=cmd_import_diffusers)

    exp = sub.add_parser("export-diffusers", formatter_class=_DefaultsHelp,
        help="write a concept in diffusers' Custom Diffusion format")
    exp.add_argument("--base", required=True)
    exp.add_argument("--base-config")
    exp.add_argument("--concept", required=True)
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--force", action="store_true", help="export although the base differs from the concept's")
    exp.set_defaults(func=cmd_export_diffusers)

    demo = sub.add_parser("demo", formatter_class=_DefaultsHelp,
        help="learn a held-out toy-world concept on the committed toy base and score it (no downloads)")
    demo.add_argument("--out", required=True, help="output folder (grid.png, scores.json, concept.safetensors, images/)")
    demo.add_argument("--steps", type=_positive_int, default=400, help="training steps")
    demo.add_argument("--family", choices=list(FAMILIES), default="sd15",
                      help="sd15: the toy base (a pretrained 64 px world); sdxl: a tiny SDXL-shaped random base "
                           "built in OUT/base (the SDXL path end to end, no learned look)")
    demo.add_argument("--spl-weight", type=_finite, default=1.0, help="λ of the semantic preservation loss")
    demo.add_argument("--method", choices=list(METHOD_CLASSES), default=DEFAULT_METHOD, help="the training method")
    demo.add_argument("--instance", default="red_blue_star", choices=[i.name for i in _toy_instances()],
                      help="which held-out toy-world instance to learn")
    demo.add_argument("--seed", type=int, default=0, help="seed of the pictures and of training")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_output(verbose=args.verbose)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except TrainingCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except ClassDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated):  # while models load or files are written
        print("cancelled; nothing partial was written (files are written whole or not at all).", file=sys.stderr)
        return 130
    except OSError as exc:  # a disk filled up, a folder vanished, a permission changed mid-run
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
