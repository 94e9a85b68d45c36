"""Build the toy world's committed weights, deterministically, on the CPU.

    python tools/pretrain_toyworld.py checker      # the independent checker (3,000 steps)
    python tools/pretrain_toyworld.py calibrate    # seconds per step of every stage, nothing written
    python tools/pretrain_toyworld.py vae          # then clip, then unet: the toy base (v2.1: 132 min of
                                                   # wall time on 2 cores, stages side by side)

Every stage is resumable: it saves to OUT/resume/STAGE.pt every --save-every steps and a rerun
continues there (docs/toyworld.md).

The unet stage captions two-half looks by their two colours ("a red blue star") when a caption
names a colour (``--no-name-halves``: by class only, as the v2.0 base was; docs/toyworld.md, "What
limits the concept here"); an instance's own pair is never drawn on its class, so never named.

``--device cuda`` trains a stage's model on a GPU (a larger base: ``--steps``/``--batch`` with ``--out``
elsewhere); every random draw stays on the CPU, so the pictures, noise and timesteps are the same on
either device, and what is written is the same CPU fp16 folder. The committed weights were built on
the CPU; no GPU run has been made yet.

Each stage writes under ``classdiffusion/toyworld/weights/`` (``--out`` elsewhere) and records in
``MANIFEST.json`` the command, the settings, the time it took and the SHA-256 of what it wrote;
the unet stage assembles the base (``weights/base``, a diffusers SD folder in fp16) and the toy
CLIP's image tower, and lists every committed file's hash, so a test can tell the committed files
are the ones this script wrote. Every random choice comes from the stage's seed and runs use two
threads and torch's deterministic algorithms; a rerun of the checker stage reproduced its logged
losses (byte identity across machines is not claimed). The vae and clip stages leave their
intermediate folders (``vae/``, ``clip/``, ``tokenizer/``) beside the weights: they are inputs of
the unet stage, not package data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WEIGHTS = REPO / "classdiffusion" / "toyworld" / "weights"
OUT = WEIGHTS  # --out changes it (calibration runs write elsewhere)
SAVE_EVERY = 500  # --save-every: steps between resume points
DEVICE = "cpu"  # --device: where the models train (every random draw stays on the CPU, so a seed
#                 means the same pictures, noise and timesteps on every device)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(stage: str, path: Path, seconds: float, settings: dict, files: dict | None = None) -> None:
    import torch

    manifest_path = OUT / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[stage] = {
        "file": path.relative_to(OUT).as_posix(), "sha256": sha256(path), "bytes": path.stat().st_size,
        "command": f"python tools/pretrain_toyworld.py {stage}", "settings": settings,
        "seconds": round(seconds, 1), "torch": torch.__version__, "machine": platform.machine(),
    }
    if files:
        manifest[stage]["files"] = files
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def stage_checker(args) -> None:
    from classdiffusion.toyworld.checker import Checker, accuracy, rejection, train_checker
    from classdiffusion.toyworld.world import World

    settings = {"steps": args.steps or 3000, "batch": 64, "seed": 0}
    started = time.perf_counter()
    checker = Checker(train_checker(**settings, device=DEVICE))
    seconds = time.perf_counter() - started
    path = OUT / "checker.safetensors"
    checker.save(path)
    record("checker", path, seconds, settings)
    print(f"wrote {path} in {seconds:.0f} s")
    print("accuracy on fresh pictures:", accuracy(checker, World(seed=99), seed=12345, count=600))
    print("broken objects refused:", rejection(checker, World(seed=99), seed=54321, count=300))


def optimize(name: str, params, steps: int, lr: float, loss_at, *, weight_decay: float = 0.0,
             warmup: float = 0.05, clip_grad: float | None = None, after_step=None, model=None) -> float:
    """AdamW with a one-cycle schedule over ``steps``, ``loss_at(step)`` giving each step's loss
    (a function of the step alone, so a resumed run draws what an unbroken one would); logs every
    100 steps; calls ``after_step(step)`` if given; returns the seconds it took (resumed runs: the
    seconds of every part together).

    Resumable: with ``model`` given, every ``--save-every`` steps the model, optimizer and schedule
    are written atomically to OUT/resume/NAME.pt; a rerun of the stage continues from there."""
    import torch

    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warmup)
    resume = OUT / "resume" / f"{name}.pt"
    first, earlier = 0, 0.0
    if model is not None and resume.is_file():
        state = torch.load(resume, weights_only=True, map_location=DEVICE)
        if state["steps"] == steps:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            first, earlier = int(state["step"]), float(state["seconds"])
            print(f"{name}: resumed at step {first} of {steps} ({earlier:.0f} s before)", flush=True)
    started = time.perf_counter()
    for step in range(first, steps):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name} step {step}: loss {loss.item():.4f} ({earlier + time.perf_counter() - started:.0f} s)",
                  flush=True)
        if after_step is not None:
            after_step(step)
        if model is not None and SAVE_EVERY and (step + 1) % SAVE_EVERY == 0 and step + 1 < steps:
            resume.parent.mkdir(parents=True, exist_ok=True)
            partial = resume.with_suffix(".part")
            torch.save({"steps": steps, "step": step + 1, "seconds": earlier + time.perf_counter() - started,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict()}, partial)
            partial.replace(resume)
    if model is not None:
        resume.unlink(missing_ok=True)
    return earlier + time.perf_counter() - started


def _pictures(world, start: int, count: int, size: int, name_halves: bool = False):
    """Pretraining pictures ``start``..``start+count`` as [-1, 1] tensors, with their captions
    (``name_halves``: two-half looks named by their colours when the caption names a colour)."""
    import numpy as np
    import torch

    images, captions = [], []
    for image, scene in world.pretraining_batch(start, count):
        images.append(np.asarray(image, dtype=np.float32))
        captions.append(scene.caption(name_halves=name_halves))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return pixels, captions


def _codec_pictures(world, start: int, count: int):
    """The VAE's pictures (``World.codec_batch``) as [-1, 1] tensors."""
    import numpy as np
    import torch

    images = [np.asarray(image, dtype=np.float32) for image in world.codec_batch(start, count)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1


def vae_fidelity(vae, count: int = 256, seed: int = 123) -> dict:
    """What the latent space keeps: the checker's accuracy on the VAE's reconstructions of fresh
    pictures (through the latent mean). A base cannot draw better than its VAE reconstructs."""
    import numpy as np
    import torch
    from PIL import Image

    from classdiffusion.toyworld.base import RESOLUTION
    from classdiffusion.toyworld.checker import Checker, agreement, example_scene
    from classdiffusion.toyworld.world import World

    checker = Checker.load(WEIGHTS / "checker.safetensors")
    world = World(size=RESOLUTION, seed=seed)
    rng = np.random.default_rng(seed)
    scenes = [example_scene(world, rng) for _ in range(count)]
    pixels = torch.from_numpy(np.stack([np.asarray(world.render(s, rng), dtype=np.float32) for s in scenes]))
    with torch.no_grad():
        x = pixels.permute(0, 3, 1, 2) / 127.5 - 1
        recon = vae.float().decode(vae.float().encode(x).latent_dist.mean).sample
    images = [Image.fromarray(((r.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for r in recon]
    return agreement(checker, scenes, images)


def stage_vae(args) -> None:
    """The ×8 AutoencoderKL on 64 px pictures: L1 + MSE reconstruction and a small KL term."""
    import torch
    from torch.nn import functional as F

    from classdiffusion.toyworld.base import RESOLUTION, VAE_CHANNELS, build_world_tokenizer, make_components
    from classdiffusion.toyworld.world import World

    steps, batch = args.steps or 6000, 16
    channels = tuple(int(c) for c in args.vae_channels.split(",")) if args.vae_channels else VAE_CHANNELS
    world = World(size=RESOLUTION, seed=1)
    _, _, _, vae, _ = make_components(build_world_tokenizer(OUT / "tokenizer"), seed=1, vae_channels=channels)
    vae.to(DEVICE)
    def loss_at(step):  # the latent sample from the step's own seed: a resumed run draws the same
        pixels = _codec_pictures(world, step * batch, batch).to(DEVICE)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(1_000_000 + step))).sample
        kl = posterior.kl().mean() / (4 * (RESOLUTION // 8) ** 2)
        return F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-4 * kl

    started = time.perf_counter()
    trained = optimize("vae", vae.parameters(), steps, 1e-3, loss_at, model=vae)
    vae.to("cpu")
    started -= trained - (time.perf_counter() - started)  # a resumed run counts its earlier parts
    with torch.no_grad():  # SD's scaling: latents of unit standard deviation
        pixels, _ = _pictures(world, 10_000_000, 64, RESOLUTION)
        std = float(vae.encode(pixels).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    seconds = time.perf_counter() - started
    fidelity = vae_fidelity(vae)
    print("checker on reconstructions:", {k: round(v, 3) for k, v in fidelity.items()}, flush=True)
    out = OUT / "vae"
    vae.to(torch.float16).save_pretrained(out, safe_serialization=True)
    record("vae", out / "diffusion_pytorch_model.safetensors", seconds,
           {"steps": steps, "batch": batch, "seed": 1, "channels": list(channels), "scaling_factor": 1.0 / std,
            "pictures": "World.codec_batch (half with random looks)",
            "checker_on_reconstructions": fidelity})
    print(f"wrote {out} in {seconds:.0f} s (scaling factor {1 / std:.4f})")


def stage_clip(args) -> None:
    """The toy CLIP: text tower and a small ViT, contrastive on (picture, caption) pairs."""
    import torch
    from torch.nn import functional as F

    from classdiffusion.toyworld.base import build_world_tokenizer, make_clip
    from classdiffusion.toyworld.world import World

    steps, batch = args.steps or 1500, 64
    world = World(size=64, seed=2)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(build_world_tokenizer(OUT / "tokenizer")))
    clip = make_clip(tokenizer, seed=2).to(DEVICE)

    def loss_at(step):
        pixels, captions = _pictures(world, step * batch, batch, 64)
        # Captions are under 20 tokens: 24 positions carry all of them and their end-of-text token.
        ids = tokenizer(captions, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
        logits = clip(input_ids=ids.to(DEVICE), pixel_values=pixels.to(DEVICE), return_loss=False).logits_per_image
        # Pairs with the same caption are not negatives of each other.
        same = torch.tensor([[a == b for b in captions] for a in captions], device=DEVICE).float()
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t())) / 2

    seconds = optimize("clip", clip.parameters(), steps, 5e-4, loss_at, weight_decay=0.05, model=clip)
    clip.to("cpu")
    out_dir = OUT / "clip"
    clip.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record("clip", out_dir / "model.safetensors", seconds, {"steps": steps, "batch": batch, "seed": 2})
    print(f"wrote {out_dir} in {seconds:.0f} s")


def stage_unet(args) -> None:
    """The UNet on VAE latents of pretraining pictures, conditioned on the frozen toy CLIP's text
    tower (last hidden states, as SD1.5's), captions dropped 10 % of the time for guidance."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from torch.nn import functional as F
    from transformers import CLIPModel, CLIPTokenizer

    from classdiffusion.toyworld.base import CLIP_CONFIG_FILE, CLIP_EXTRA_FILE, RESOLUTION, make_components, split_clip, text_tower
    from classdiffusion.toyworld.world import World

    steps, batch, pool = args.steps or 13_000, args.batch or 32, args.pool
    tokenizer = CLIPTokenizer.from_pretrained(str(OUT / "clip"))
    _, text_encoder, unet, _, scheduler = make_components(OUT / "tokenizer", seed=3)
    if args.init_from:  # continue an earlier base's UNet (a new schedule over --steps) instead of a fresh one
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(Path(args.init_from) / "unet"),
                                                                  torch_dtype=torch.float32).state_dict())
    clip = CLIPModel.from_pretrained(str(OUT / "clip"), torch_dtype=torch.float32)
    text_tower(text_encoder).load_state_dict(text_tower(clip).state_dict())
    text_encoder.requires_grad_(False).eval()
    vae = AutoencoderKL.from_pretrained(str(OUT / "vae"), torch_dtype=torch.float32).eval()
    for model in (unet, text_encoder, vae):
        model.to(DEVICE)
    world = World(size=RESOLUTION, seed=3)
    started = time.perf_counter()
    with torch.no_grad():  # the pictures' latent distributions and captions, once
        means, stds, captions = [], [], []
        for start in range(0, pool, 256):
            pixels, caps = _pictures(world, start, 256, RESOLUTION, name_halves=args.name_halves)
            dist = vae.encode(pixels.to(DEVICE)).latent_dist
            means.append(dist.mean.half())
            stds.append(dist.std.half())
            captions += caps
        means, stds = torch.cat(means), torch.cat(stds)
        unique = sorted(set(captions)) + [""]
        features = {}
        for start in range(0, len(unique), 128):
            chunk = unique[start:start + 128]
            ids = tokenizer(chunk, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            for caption, feature in zip(chunk, text_encoder(ids.to(DEVICE)).last_hidden_state.half()):
                features[caption] = feature
    print(f"encoded {pool} pictures and {len(unique)} captions in {time.perf_counter() - started:.0f} s", flush=True)
    scaling = vae.config.scaling_factor
    alphas = scheduler.alphas_cumprod.to(DEVICE)
    def loss_at(step):  # every draw from the step's own seed: a resumed run draws the same
        rng = np.random.default_rng([3, step])
        generator = torch.Generator().manual_seed(3_000_000 + step)
        index = torch.from_numpy(rng.integers(0, pool, batch))
        noise_shape = (batch, 4, RESOLUTION // 8, RESOLUTION // 8)
        sample = torch.randn(noise_shape, generator=generator).to(DEVICE)
        latents = (means[index.to(means.device)].float() + stds[index.to(stds.device)].float() * sample) * scaling
        context = torch.stack([features["" if rng.random() < 0.1 else captions[i]] for i in index.tolist()]).float()
        noise = torch.randn(latents.shape, generator=generator).to(DEVICE)
        t = torch.randint(0, 1000, (batch,), generator=generator).to(DEVICE)
        a = alphas[t].view(-1, 1, 1, 1)
        return F.mse_loss(unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, context).sample, noise)

    def snapshot(step):  # a look at the base while it trains (not part of the result)
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < steps:
            import copy

            # Copies: assemble casts to fp16 in place, and the training weights must stay fp32.
            parts = [copy.deepcopy(m).to("cpu") for m in (unet, text_encoder, vae)]
            assemble(parts[0], parts[1], parts[2], scheduler, tokenizer, OUT / "snapshot")

    encode_seconds = time.perf_counter() - started
    seconds = encode_seconds + optimize("unet", unet.parameters(), steps, 4e-4, loss_at, weight_decay=0.01,
                                        warmup=0.03, clip_grad=1.0, after_step=snapshot, model=unet)
    for model in (unet, text_encoder, vae):
        model.to("cpu")
    assemble(unet, text_encoder, vae, scheduler, tokenizer, OUT / "base")
    split_clip(clip, OUT)  # the evaluation CLIP: its image tower here, its text tower is the base's
    files = sorted(p for p in (OUT / "base").rglob("*") if p.is_file()) + [OUT / CLIP_EXTRA_FILE, OUT / CLIP_CONFIG_FILE]
    record("unet", OUT / "base" / "unet" / "diffusion_pytorch_model.safetensors", seconds,
           {"steps": steps, "batch": batch, "seed": 3, "pool": pool,
            **({"init_from": str(args.init_from)} if args.init_from else {}),
            "name_halves": args.name_halves},
           files={p.relative_to(OUT).as_posix(): sha256(p) for p in files})
    print(f"wrote {OUT / 'base'} in {seconds:.0f} s")


def assemble(unet, text_encoder, vae, scheduler, tokenizer, out: Path) -> None:
    """The base as a diffusers SD folder (what `load_host` and the pipelines read), in fp16."""
    import torch
    from diffusers import StableDiffusionPipeline

    from classdiffusion.model.tiny import portable_text_encoder_keys

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    portable_text_encoder_keys(out / "text_encoder")
    import shutil

    for name in ("vocab.json", "merges.txt"):  # transformers 4.x's CLIPTokenizer reads these, not tokenizer.json
        shutil.copy(OUT / "tokenizer" / name, out / "tokenizer" / name)


def stage_calibrate(args) -> None:
    """Seconds per training step of each stage at its settings (2 warm-up steps, then 10 timed),
    on random data of the right shapes: what a pretraining budget buys, measured before choosing."""
    import torch
    from torch.nn import functional as F

    from classdiffusion.toyworld.base import RESOLUTION, build_world_tokenizer, make_clip, make_components
    from classdiffusion.toyworld.checker import CheckerNet

    import tempfile

    tokenizer, text_encoder, unet, vae, _ = make_components(build_world_tokenizer(tempfile.mkdtemp()))
    clip = make_clip(tokenizer)
    latent = RESOLUTION // 8
    steps = {
        "checker (batch 64)": (CheckerNet(), lambda m: sum(v.sum() for v in m(torch.randn(64, 3, 64, 64)).values())),
        "vae (batch 16)": (vae, lambda m: F.mse_loss(m(torch.randn(16, 3, RESOLUTION, RESOLUTION)).sample, torch.zeros(1))),
        "clip (batch 64, 24 tokens)": (clip, lambda m: m(input_ids=torch.randint(0, len(tokenizer), (64, 24)),
                                                         pixel_values=torch.randn(64, 3, 64, 64)).logits_per_image.sum()),
        "unet (batch 64)": (unet, lambda m: m(torch.randn(64, 4, latent, latent), torch.randint(0, 1000, (64,)),
                                              torch.randn(64, 77, 768)).sample.square().mean()),
        "unet (batch 32)": (unet, lambda m: m(torch.randn(32, 4, latent, latent), torch.randint(0, 1000, (32,)),
                                              torch.randn(32, 77, 768)).sample.square().mean()),
    }
    for name, (model, loss_of) in steps.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for k in range(12):
            if k == 2:
                started = time.perf_counter()
            loss = loss_of(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        per_step = (time.perf_counter() - started) / 10
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:28s} {params:6.2f} M parameters  {per_step:6.3f} s/step  "
              f"{int(3600 / per_step):6d} steps/hour", flush=True)


STAGES = {"checker": stage_checker, "vae": stage_vae, "clip": stage_clip, "unet": stage_unet,
          "calibrate": stage_calibrate}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--steps", type=int, help="override the stage's number of steps (calibration only)")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where to write (calibration runs: elsewhere)")
    parser.add_argument("--vae-channels", help="the VAE's four widths, e.g. 32,64,128,128 (calibration)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 = the committed runs)")
    parser.add_argument("--batch", type=int, help="unet: override the batch (calibration)")
    parser.add_argument("--snapshot-every", type=int, default=0, help="unet: write OUT/snapshot every N steps")
    parser.add_argument("--save-every", type=int, default=500,
                        help="steps between resume points (OUT/resume/STAGE.pt; a rerun continues there)")
    parser.add_argument("--pool", type=int, default=32_768, help="unet: pretraining pictures encoded once")
    parser.add_argument("--init-from", type=Path, help="unet: start from this base folder's UNet (a longer run in "
                        "parts, e.g. the committed base: --init-from classdiffusion/toyworld/weights/base --out elsewhere)")
    parser.add_argument("--name-halves", action=argparse.BooleanOptionalAction, default=True,
                        help="unet: captions name a two-half look's two colours when they name a colour "
                        "(--no-name-halves: by class only, the v2.0 base)")
    parser.add_argument("--device", default="cpu", help="where the models train: cpu (the committed runs) or cuda; "
                        "the random draws stay on the CPU, so the data are the same on either")
    args = parser.parse_args()
    global OUT, SAVE_EVERY, DEVICE
    OUT, SAVE_EVERY, DEVICE = args.out, args.save_every, args.device
    if torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {DEVICE}: this machine's PyTorch sees no CUDA GPU (use --device cpu)")
    torch.set_num_threads(args.threads)
    if torch.device(DEVICE).type == "cuda":  # cuBLAS needs this for deterministic matrix products
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # some CUDA kernels have no deterministic twin
    else:
        torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    STAGES[args.stage](args)


if __name__ == "__main__":
    main()
