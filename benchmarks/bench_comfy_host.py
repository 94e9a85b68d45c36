"""Training speed and peak memory on the real ComfyUI host: the Train node's own path.

Run with ComfyUI's Python from the ComfyUI folder (its modules are imported from there):

    cd $COMFYUI_PATH && $COMFYUI_PYTHON /path/to/pack/benchmarks/bench_comfy_host.py --model sd15 \\
        --resolution 512 --mixed-precision fp16 --json out.json

A random checkpoint in ComfyUI's single-file layout (tests/comfyui/make_checkpoint.py: SD1.5's
whole UNet with ``--model sd15``, a one-level SD1.5-shaped UNet with ``--model tiny``; full CLIP-L
and VAE) is loaded by ComfyUI's ``load_state_dict_guess_config`` as CheckpointLoaderSimple does,
so the UNet has ComfyUI's own dtype for the device (fp16 on a GPU). Then exactly what the Train
node runs: ``training_patcher`` (the deep-copied, loaded ModelPatcher), ``ComfyHost``,
``train`` with the node's callbacks (progress bar, loss-plot previews, cancel check). Prints one
``RESULT {json}`` line: steps/s after warm-up, peak memory (CUDA: max allocated and reserved;
CPU: live tensor bytes), and the extrapolated time of a 500-step run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from live_memory import RUN_SETTINGS, ClockCallbacks, PeakMemory, StepClock, add_run_arguments  # noqa: E402


def load_pack():
    """This repository as a package (its relative imports need one), without registering nodes."""
    package = types.ModuleType("classdiffusion_pack")
    package.__path__ = [str(REPO)]
    sys.modules["classdiffusion_pack"] = package
    return types.SimpleNamespace(**{
        name.rpartition(".")[2]: importlib.import_module(f"classdiffusion_pack.{name}")
        for name in ("nodes.comfy_glue", "nodes.comfy_host", "classdiffusion.run.train", "classdiffusion.config",
                     "classdiffusion.model.precision")
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, mixed_precision="fp16")
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu")
    parser.add_argument("--unet-dtype", choices=["auto", "fp16", "bf16"], default="auto",
                        help="the UNet's dtype as ComfyUI's --fp16-unet / --bf16-unet set it (auto: ComfyUI's choice)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()

    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.cpu
    if args.unet_dtype != "auto":
        setattr(comfy.cli_args.args, f"{args.unet_dtype}_unet", True)
    import comfy.model_management
    import comfy.sd
    from make_checkpoint import checkpoint_state_dict

    pack = load_pack()
    model, clip, vae = comfy.sd.load_state_dict_guess_config(checkpoint_state_dict(0, full=args.model == "sd15"))[:3]
    device = comfy.model_management.get_torch_device()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(5, 256, 256, 3, generator=generator)  # a ComfyUI IMAGE batch
    config = pack.config.TrainConfig(steps=args.steps + args.warmup, resolution=args.resolution,
                                     batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                                     gradient_checkpointing=args.gradient_checkpointing)
    spec = pack.config.ConceptSpec(token="<sks>", class_word="dog")
    with PeakMemory(device, enabled=not args.no_memory) as memory:
        clock = StepClock(device, args.warmup, args.steps, memory.split, start=time.perf_counter())

        class Clock(ClockCallbacks, pack.comfy_glue.ComfyCallbacks):
            pass

        Clock.clock = clock

        with torch.inference_mode(False), torch.enable_grad():
            patcher = pack.comfy_glue.training_patcher(model)
            text_dtype = pack.precision.precision_dtype(args.mixed_precision) if args.mixed_precision != "no" else None
            host = pack.comfy_host.ComfyHost(patcher, clip, vae, text_dtype=text_dtype)
            try:
                pack.train.train(host, [spec], config, images=[images], callbacks=Clock(config.steps, None, [spec.token]))
            finally:
                host.close()
    result = {**clock.result(), **memory.result(),
              "unet_dtype": str(patcher.model.get_dtype()).removeprefix("torch."),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
              "settings": {key: getattr(args, key) for key in RUN_SETTINGS}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
