"""Estimate the GPU memory of one SD1.5 training step without a GPU: the bytes of every tensor
autograd keeps for the backward pass (counted once per storage, with torch's saved-tensor hooks),
plus the frozen weights in half precision and the trained tensors with their AdamW state.

    python benchmarks/memory_estimate.py [--resolution 512] [--batch-size 2] [--gradient-checkpointing]

It runs one forward of the real loop's computation (text encoder with the injected token, UNet with
K/V delta hooks, ε-MSE + SPL) on the CPU in bf16 autocast, on a random SD1.5-shaped UNet + CLIP-L +
VAE. The CPU's SDPA (flash attention for CPU) keeps O(N) statistics per head, as CUDA's flash /
memory-efficient kernels do, so the saved bytes carry over; kernel workspaces and allocator
fragmentation do not, so treat the total as a lower bound to confirm with bench_train.py on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    from bench_train import build_models
    from classdiffusion.hosts.diffusers_host import DiffusersHost
    from classdiffusion.kv import zero_deltas
    from classdiffusion.losses import semantic_preservation_loss
    from classdiffusion.tiny import build_tokenizer

    torch.manual_seed(0)
    tokenizer, text_encoder, unet, vae, scheduler = build_models(
        "sd15", build_tokenizer(Path(tempfile.mkdtemp()) / "tok"), torch.float32)
    for model in (text_encoder, unet, vae):
        model.to(torch.bfloat16)
    host = DiffusersHost(tokenizer, text_encoder, unet, vae, scheduler, "cpu")
    host.add_tokens(["<sks>"])
    deltas = zero_deltas(host.cross_attention_weights("kv"), host.device)
    token = torch.nn.Parameter(host.word_embedding("ktn").float())
    host.configure_training(args.gradient_checkpointing, "sdpa")
    detach = host.attach_deltas(deltas)

    frozen = {p.untyped_storage().data_ptr() for m in (text_encoder, unet, vae) for p in m.parameters()}
    frozen |= {b.untyped_storage().data_ptr() for m in (text_encoder, unet, vae) for b in m.buffers()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    b, side = args.batch_size, args.resolution // 8
    latents = torch.randn(b, 4, side, side)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (b,))
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        class_eos = host.encode_text(["a photo of a dog"], {}).eos.detach().float()
        text = host.encode_text(["a photo of a <sks> dog"] * b + ["a photo of a <sks> dog"], {"<sks>": token})
        pred = host.predict_noise(latents, timesteps, text.context[:b])
        spl, _ = semantic_preservation_loss([text.eos[b:]], [class_eos])
        loss = F.mse_loss(pred.float(), noise) + spl
    forward_s = time.perf_counter() - start
    loss.backward()
    detach()
    reached = sum(int(d.grad is not None) for d in deltas.values())

    weights = sum(p.numel() * p.element_size() for m in (text_encoder, unet, vae) for p in m.parameters())
    trained = sum(d.numel() for d in deltas.values()) + token.numel()
    state = trained * 4 * 4  # fp32 value, gradient, AdamW exp_avg and exp_avg_sq
    activations = sum(saved.values())
    print(f"SD1.5-shaped, {args.resolution}×{args.resolution}, batch {b}, bf16 autocast, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} "
          f"(forward {forward_s:.0f} s on CPU; gradients reached {reached}/{len(deltas)} deltas)")
    print("| part | MiB |")
    print("|---|---|")
    print(f"| frozen UNet + CLIP-L + VAE (bf16) | {weights / MIB:.0f} |")
    print(f"| trained K/V deltas + token, fp32, with grads and AdamW state | {state / MIB:.0f} |")
    print(f"| activations kept for backward | {activations / MIB:.0f} |")
    print(f"| total (lower bound of the peak) | {(weights + state + activations) / MIB:.0f} |")


if __name__ == "__main__":
    main()
