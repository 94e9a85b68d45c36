"""What applying a concept costs on the real ComfyUI host: Load Concept K/V on an SD1.5-shaped
checkpoint, and the sampling steps with vs without the concept.

Run with ComfyUI's Python from the ComfyUI folder:

    cd $COMFYUI_PATH && $COMFYUI_PYTHON /path/to/pack/benchmarks/bench_apply.py --cpu [--model sd15] [--json F]

A random checkpoint (``--model sd15``: SD1.5's whole UNet; ``tiny``: a one-level SD1.5-shaped UNet)
is loaded as CheckpointLoaderSimple does; a concept with the checkpoint's fingerprint and small
random K/V deltas is written to models/classdiffusion of a temporary folder. Timed: the Load
Concept K/V node's ``execute`` from start to patched MODEL/CLIP (the first call, which fingerprints
the freshly loaded model's weights, and the median of ``--repeats``, which reuse that), and
KSampler-equivalent sampling (``comfy.sample.sample``, euler, ``--steps`` steps, CFG 6) with the
base MODEL, then with the patched one: the first call of each (ComfyUI loads, and patches, the
weights then) and the median of the repeats after it. Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from bench_comfy_host import load_pack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd15"], default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image size of the sampling runs")
    parser.add_argument("--steps", type=int, default=1, help="sampling steps per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu")
    parser.add_argument("--json")
    args = parser.parse_args()

    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.cpu
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import folder_paths
    from make_checkpoint import checkpoint_state_dict

    pack = load_pack()
    import classdiffusion_pack.classdiffusion.concept as concept_module
    import classdiffusion_pack.classdiffusion.model.kv as kv
    import classdiffusion_pack.nodes.nodes as nodes

    model, clip, _ = comfy.sd.load_state_dict_guess_config(checkpoint_state_dict(0, full=args.model == "sd15"))[:3]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "classdiffusion"
        folder.mkdir()
        pack.comfy_glue.register_folders()
        folder_paths.add_model_folder_path(pack.comfy_glue.CONCEPT_FOLDER, str(folder), is_default=True)
        weights = nodes.model_base_weights(model, "kv")
        generator = torch.Generator().manual_seed(0)
        concept = concept_module.Concept(
            deltas={name: torch.randn(w.shape, generator=generator) * 1e-3 for name, w in weights.items()},
            token_vectors=torch.randn(1, 768, generator=generator) * 0.01, tokens=["<sks>"], class_words=["dog"],
            meta={"train_mode": "kv", "base_fingerprint": kv.base_fingerprint(weights)})
        concept.save(folder / "bench.safetensors")
        kv._FINGERPRINTS.clear()  # the first apply hashes the model's weights, as after loading a checkpoint

        apply_times, patched = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            patched = nodes.LoadConceptNode.execute(model, clip, "bench.safetensors", 1.0, 1.0, False)
            apply_times.append(time.perf_counter() - start)
        patched_model, patched_clip = patched.result[0], patched.result[1]

        def sample(model_, clip_, text):
            tokens = clip_.tokenize(text)
            cond = [[clip_.encode_from_tokens(tokens), {}]]
            neg = [[clip_.encode_from_tokens(clip_.tokenize("")), {}]]
            latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
            noise = comfy.sample.prepare_noise(latent, 0)
            start = time.perf_counter()
            comfy.sample.sample(model_, noise, args.steps, 6.0, "euler", "normal", cond, neg, latent, disable_pbar=True)
            return time.perf_counter() - start

        # Each MODEL in turn, as a graph that samples it would: its first call loads (and, with the
        # concept, patches) the weights; the later ones are the steady cost.
        runs = {"base": [sample(model, clip, "a photo of a dog") for _ in range(args.repeats + 1)],
                "concept": [sample(patched_model, patched_clip, "a photo of a <sks> dog") for _ in range(args.repeats + 1)]}
    steady = {k: statistics.median(v[1:]) for k, v in runs.items()}
    result = {
        "apply_ms_median": 1000 * statistics.median(apply_times), "apply_ms_first": 1000 * apply_times[0],
        "sample_s_first": {k: v[0] for k, v in runs.items()}, "sample_s_median": steady,
        "sampling_overhead": steady["concept"] / steady["base"] - 1.0,
        "layers": len(concept.deltas), "model": args.model, "size": args.size, "steps": args.steps,
        "device": str(comfy.model_management.get_torch_device()), "unet_dtype": str(model.model.get_dtype()),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
