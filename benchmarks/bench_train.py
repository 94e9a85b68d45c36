"""Training speed and peak memory: this trainer vs. the official recipe's loop, same model.

The reference loop is written the way the official ClassDiffusion code (diffusers'
train_custom_diffusion.py + SPL) does a step: augment in pixel space, VAE-encode the batch,
text-encode the batch prompts *and* both SPL phrases, Custom Diffusion attention processors
holding full copies of K/V, and the whole token-embedding matrix in AdamW with the other rows'
gradients zeroed.

    python benchmarks/bench_train.py --model tiny --resolution 64
    python benchmarks/bench_train.py --model sd15 --resolution 128 --steps 5     # CPU
    python benchmarks/bench_train.py --model sd15 --resolution 512 --mixed-precision bf16  # GPU

Each variant runs in its own subprocess so that peak memory belongs to that variant alone
(CUDA: max allocated; CPU: peak bytes of live tensors, counted the same way by live_memory.py,
with the process's max RSS beside it). Random weights: the timing is what counts, not the loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from classdiffusion.model.precision import precision_dtype  # noqa: E402
from live_memory import RUN_SETTINGS, ClockCallbacks, PeakMemory, StepClock, add_run_arguments  # noqa: E402


def build_models(kind: str, tokenizer_dir: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from classdiffusion.model.tiny import tiny_components

    if kind == "tiny":
        return tiny_components(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 shapes
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    return tokenizer, text_encoder, unet, vae, scheduler


def images(count: int = 5, size: int = 256):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


#: The trainer's variants the benchmark can time (the reference loop is "reference").
VARIANTS = {
    "ours": {},
    "ours-ckpt": {"gradient_checkpointing": True},
    "ours-fast": {"channels_last": True, "compile": True},
    # the same again in a fresh process: torch.compile's cache (persistent_compile_cache) should spare the compile
    "ours-fast-again": {"channels_last": True, "compile": True},
    # CUDA graphs: compile_mode reduce-overhead
    "ours-graphs": {"channels_last": True, "compile": True, "compile_mode": "reduce-overhead"},
    "floor": {},
    "reference": {},
    # Infusion's method at the same batch, one micro-batch per step (its recipe accumulates 4: ×4 per step)
    "infusion": {"method": "infusion"},
}


def run_ours(args, components, device, after_warmup) -> dict:
    from classdiffusion.config import ConceptSpec, TrainConfig
    from classdiffusion.hosts.diffusers_host import DiffusersHost
    from classdiffusion.run.train import TrainCallbacks, train

    host = DiffusersHost(*components, device=device)
    clock = StepClock(device, args.warmup, args.steps, after_warmup, start=time.perf_counter())

    class Clock(ClockCallbacks, TrainCallbacks):
        pass

    Clock.clock = clock

    options = VARIANTS[args.variant]
    config = TrainConfig.for_method(
                         options.get("method", "classdiffusion"), gradient_accumulation=1,
                         steps=args.steps + args.warmup, resolution=args.resolution, batch_size=args.batch_size,
                         mixed_precision=args.mixed_precision,
                         gradient_checkpointing=args.gradient_checkpointing or options.get("gradient_checkpointing", False),
                         channels_last=options.get("channels_last", False), compile=options.get("compile", False),
                         compile_mode=options.get("compile_mode", "default"))
    train(host, [ConceptSpec(token="<sks>", class_word="dog")], config, images=[images(args.images)], callbacks=Clock())
    return clock.result()


def run_reference(args, components, device, after_warmup) -> dict:
    """One step as in the official code (see the module docstring)."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
    from PIL import Image

    tokenizer, text_encoder, unet, vae, scheduler = components
    dtype = precision_dtype(args.mixed_precision)
    tokenizer.add_tokens(["<new1>"])
    token_id = tokenizer.convert_tokens_to_ids("<new1>")
    # The offline test tokenizer is small; keep the model's full vocabulary (SD1.5: 49408 + 1
    # rows), since the official loop trains the whole embedding matrix.
    text_encoder.resize_token_embeddings(max(len(tokenizer), text_encoder.config.vocab_size + 1))
    text_encoder.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    unet.to(device, dtype)
    vae.to(device, dtype)
    text_encoder.to(device)  # the official code keeps the text encoder in fp32 when training the token
    procs, state = {}, unet.state_dict()
    for name in unet.attn_processors:
        layer = name.split(".processor")[0]
        if name.endswith("attn2.processor"):
            hidden = state[layer + ".to_k.weight"].shape[0]
            proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden,
                                                   cross_attention_dim=768).to(device)
            proc.load_state_dict({"to_k_custom_diffusion.weight": state[layer + ".to_k.weight"],
                                  "to_v_custom_diffusion.weight": state[layer + ".to_v.weight"]})
        else:
            proc = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
        procs[name] = proc
    unet.set_attn_processor(procs)
    trainable = [p for p in unet.attn_processors.values() for p in p.parameters()]
    for p in trainable:
        p.data = p.data.float()
        p.requires_grad_(True)
    embedding = text_encoder.get_input_embeddings().weight
    optimizer = torch.optim.AdamW(trainable + [embedding], lr=2e-5, weight_decay=1e-2)
    pil = images(args.images)
    res = args.resolution
    prompt_tp, prompt_cp = "a photo of a <new1> dog", "a photo of a dog"
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)

    def eos(ids, hidden):
        return hidden[torch.arange(len(ids)), (ids == tokenizer.eos_token_id).int().argmax(1)]

    clock = StepClock(device, args.warmup, args.steps, after_warmup)
    rng = np.random.default_rng(0)
    for step in range(args.steps + args.warmup):
        pixels, masks = [], []
        for b in range(args.batch_size):  # the official per-sample pixel-space augmentation
            img = pil[rng.integers(len(pil))]
            scale = int(rng.integers(res // 3, res + 1))
            canvas = np.zeros((res, res, 3), np.float32)
            top, left = rng.integers(0, res - scale + 1, 2)
            canvas[top:top + scale, left:left + scale] = np.asarray(img.resize((scale, scale), Image.BILINEAR)) / 127.5 - 1
            pixels.append(torch.from_numpy(canvas).permute(2, 0, 1))
            mask = torch.zeros(res // 8, res // 8)
            mask[top // 8 + 1:(top + scale) // 8 - 1, left // 8 + 1:(left + scale) // 8 - 1] = 1
            masks.append(mask)
        pixels = torch.stack(pixels).to(device, dtype)
        mask = torch.stack(masks)[:, None].to(device)
        with autocast:
            latents = vae.encode(pixels).latent_dist.sample() * 0.18215
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (args.batch_size,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            ids = tokenize([prompt_tp] * args.batch_size)
            context = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, context.to(dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
            loss = ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
            ids_tp, ids_cp = tokenize([prompt_tp]), tokenize([prompt_cp])
            e_tp = eos(ids_tp, text_encoder(ids_tp).last_hidden_state)
            e_cp = eos(ids_cp, text_encoder(ids_cp).last_hidden_state)
            loss = loss + (1 - F.cosine_similarity(e_tp, e_cp)).mean()
        loss.backward()
        keep = torch.arange(embedding.shape[0], device=device) == token_id
        embedding.grad[~keep] = 0
        torch.nn.utils.clip_grad_norm_(trainable + [embedding], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return clock.result()


def run_floor(args, components, device, after_warmup) -> dict:
    """The irreducible work of one ClassDiffusion step at this model, resolution, batch and
    precision: one text-encoder pass over the batch prompts plus the SPL phrase (the token's
    gradient needs it), the UNet forward and backward on precomputed latents with gradients only
    for the attn2 K/V weights (trained in place, one matmul each, fp32 masters), cosine SPL
    against a precomputed class feature, and fused AdamW on the trained tensors. No data work,
    no hooks, no clipping, no per-step host syncs except the clock's."""
    import torch.nn.functional as F

    tokenizer, text_encoder, unet, vae, scheduler = components
    dtype = precision_dtype(args.mixed_precision)
    tokenizer.add_tokens(["<sks>"])
    token_id = tokenizer.convert_tokens_to_ids("<sks>")
    unet.requires_grad_(False).to(device)
    text_encoder.requires_grad_(False).to(device)
    trained = []
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            module.weight.data = module.weight.data.float()
            module.weight.requires_grad_(True)
            trained.append(module.weight)
    embedding = text_encoder.get_input_embeddings()
    vector = torch.nn.Parameter(embedding.weight[tokenizer.convert_tokens_to_ids("dog")].detach().float().clone())

    optimizer = torch.optim.AdamW(trained + [vector], lr=2e-5, weight_decay=1e-2, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)

    batch, side = args.batch_size, args.resolution // 8
    ids = tokenize(["a photo of a <sks> dog"] * (batch + 1))
    eos_at = (ids == tokenizer.eos_token_id).int().argmax(1)
    at_token = (ids == token_id)[..., None]
    ids = ids.masked_fill(ids == token_id, 0)  # any row; the hook puts the trained vector there
    embedding.register_forward_hook(lambda module, inputs, output: torch.where(at_token, vector.to(output.dtype), output))
    with torch.no_grad(), autocast:
        class_ids = tokenize(["a photo of a dog"])
        class_hidden = text_encoder(class_ids).last_hidden_state
        class_eos = class_hidden[0, (class_ids[0] == tokenizer.eos_token_id).int().argmax()].float()
    latents = torch.randn(args.images, 4, side, side, device=device)
    alphas = scheduler.alphas_cumprod.to(device)
    clock = StepClock(device, args.warmup, args.steps, after_warmup)
    for step in range(args.steps + args.warmup):
        x0 = latents[torch.randint(0, args.images, (batch,), device=device)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast:
            hidden = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, hidden[:batch]).sample
        recon = F.mse_loss(pred.float(), noise)
        spl = 1 - F.cosine_similarity(hidden[batch, eos_at[batch]].float(), class_eos, dim=0)
        (recon + spl).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return clock.result()


#: Dense bf16/fp16 tensor-core peaks in TFLOP/s by device name (vendor data sheets; SXM parts),
#: for model FLOPs utilisation. Longest matching name wins; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(device_name: str, mixed_precision: str) -> float | None:
    """The device's tensor-core peak for the run's precision, if known (none for fp32 runs)."""
    if mixed_precision == "no":
        return None
    matches = [name for name in PEAK_TFLOPS if name.lower() in device_name.lower()]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def count_step_flops(args, components, device) -> dict:
    """The FLOPs of one ClassDiffusion step's irreducible work (the floor's step: text encoder,
    UNet forward and backward), counted once by torch's FLOP counter. Every variant does at least
    this work per step, so achieved TFLOP/s = this × steps/s (model FLOPs utilisation)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    one = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1})
    with counter:
        run_floor(one, components, device, after_warmup=lambda: None)
    return {"step_flops": counter.get_total_flops() / 2}  # two steps ran: warm-up and timed


def _profiler(device: torch.device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def child(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    dtype = torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        from classdiffusion.model.tiny import build_tokenizer

        tokenizer_dir = build_tokenizer(Path(tmp) / "tok")
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            components = build_models(args.model, tokenizer_dir, dtype)  # random init on the GPU: fast
        if args.mixed_precision != "no":
            # Frozen models in half precision before memory is counted, as a GPU would receive
            # them; the reference keeps its text encoder in fp32 (it trains the embedding matrix).
            for model in components[2:4] if args.variant == "reference" else components[1:4]:
                model.to(precision_dtype(args.mixed_precision))
        if args.variant == "flops":
            print("RESULT " + json.dumps(count_step_flops(args, components, device)))
            return
        runner = {"reference": run_reference, "floor": run_floor}.get(args.variant, run_ours)
        profiler = _profiler(device) if args.profile else None

        def after_warmup():
            memory.split()
            if profiler is not None:
                profiler.start()

        with PeakMemory(device, enabled=not args.no_memory) as memory:
            result = runner(args, components, device, after_warmup=after_warmup)
        result.update(memory.result())
        if profiler is not None:  # the timed steps' operators, most expensive first
            profiler.stop()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=key, row_limit=args.profile)
            print(f"PROFILE-BEGIN\n{table}\nPROFILE-END", file=sys.stderr)
    if device.type != "cuda":
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["device"] = str(device) if device.type != "cuda" else torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, mixed_precision="no")
    parser.add_argument("--images", type=int, default=5, help="training images (each is encoded in every size bin)")
    parser.add_argument("--device")
    parser.add_argument("--variants", default="ours,ours-ckpt,floor,reference",
                        help=f"comma-separated, from {', '.join(VARIANTS)} (ours-fast: channels-last + "
                             "torch.compile; floor: the irreducible work of a step, see run_floor)")
    parser.add_argument("--json", help="also write the settings and rows to this JSON file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print each variant's top N operators of the timed steps (torch.profiler) to stderr")
    parser.add_argument("--variant-timeout", type=float, help="seconds one variant may run (default: no limit)")
    parser.add_argument("--flops", action="store_true",
                        help="count one step's FLOPs (torch's FLOP counter) and report TFLOP/s and MFU per variant")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS)")
    parser.add_argument("--variant", choices=list(VARIANTS) + ["flops"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    rows, failed = {}, []
    variants = args.variants.split(",")
    for variant in (["flops"] if args.flops else []) + variants:
        if variant not in VARIANTS and variant != "flops":
            raise SystemExit(f"unknown variant {variant!r}")
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:]]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as timeout:
            partial = timeout.stdout.decode(errors="replace") if isinstance(timeout.stdout, bytes) else timeout.stdout
            output = f"timed out after {args.variant_timeout} s\n" + (partial or "")[-2000:]
        line = next((l for l in output.splitlines() if l.startswith("RESULT ")), None)
        if args.profile and "PROFILE-BEGIN" in output:
            table = output.split("PROFILE-BEGIN", 1)[1].split("PROFILE-END", 1)[0]
            sys.stderr.write(f"\n## {variant}: top {args.profile} operators of the timed steps{table}\n")
        if line is None:  # keep the other variants' rows; say what failed
            sys.stderr.write(output[-4000:])
            failed.append(variant)
            continue
        rows[variant] = json.loads(line[7:])
    settings = {key: getattr(args, key) for key in RUN_SETTINGS}
    flops = rows.pop("flops", None)
    if flops is not None:
        settings["step_flops"] = flops["step_flops"]
        if rows:
            settings["peak_tflops"] = args.peak_tflops or peak_tflops(next(iter(rows.values()))["device"],
                                                                      args.mixed_precision)
    table = markdown_table(settings, rows) if rows else ""  # adds each row's TFLOP/s and MFU
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows, "failed": failed}, indent=1))
    if rows:
        print(table)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def markdown_table(settings: dict, rows: dict[str, dict]) -> str:
    """One row per variant; ratios against the reference loop and the floor when they ran."""
    first = next(iter(rows.values()))
    ref, floor = rows.get("reference"), rows.get("floor")
    cuda = "peak_reserved_mib" in first
    cpu = "peak_rss_mib" in first
    lines = [f"model={settings['model']} resolution={settings['resolution']} batch={settings['batch_size']} "
             f"mixed_precision={settings['mixed_precision']} device={first['device']}"
             + (f" step={settings['step_flops'] / 1e12:.3f} TFLOP (torch's FLOP counter, the floor's step)"
                if settings.get("step_flops") else "")
             + (f" peak={settings['peak_tflops']:.0f} TFLOP/s" if settings.get("peak_tflops") else ""), ""]
    head = ["loop", "steps/s", "peak memory MiB", "peak in steady steps MiB", "allocated between steps MiB"]
    head += ["peak reserved MiB"] if cuda else []
    head += ["peak RSS MiB"] if cpu else []
    head += ["500 steps s", "speed vs reference", "memory vs reference", "speed vs floor"]
    flops, peak = settings.get("step_flops"), settings.get("peak_tflops")
    head += ["TFLOP/s"] if flops else []
    head += ["MFU"] if flops and peak else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name, f"{row['steps_per_s']:.3f}", f"{row['peak_memory_mib']:.0f}",
                 f"{row['peak_step_memory_mib']:.0f}", f"{row['resident_memory_mib']:.0f}"]
        cells += [f"{row['peak_reserved_mib']:.0f}"] if cuda else []
        cells += [f"{row['peak_rss_mib']:.0f}"] if cpu else []
        cells.append(f"{row['run_500_steps_s']:.1f}" if "run_500_steps_s" in row else "-")
        cells.append(f"{row['steps_per_s'] / ref['steps_per_s']:.2f}x" if ref else "-")
        cells.append(f"{row['peak_memory_mib'] / ref['peak_memory_mib']:.2f}" if ref and ref['peak_memory_mib'] else "-")
        cells.append(f"{row['steps_per_s'] / floor['steps_per_s']:.2f}" if floor else "-")
        if flops:
            achieved = flops * row["steps_per_s"] / 1e12
            row["tflops"] = achieved
            cells.append(f"{achieved:.1f}" if achieved >= 1 else f"{achieved:.3f}")
            if peak:
                row["mfu"] = achieved / peak
                cells.append(f"{100 * achieved / peak:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in rows.items():
        if "setup_and_first_step_s" in row:
            lines.append(f"({name}: one-off setup incl. encoding image variants and first step: "
                         f"{row['setup_and_first_step_s']:.1f}s)")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
