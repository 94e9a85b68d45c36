"""One ClassDiffusion loss step on the ComfyUI host and on the diffusers host, same weights and inputs.

Run with ComfyUI's Python from the ComfyUI folder:  python host_parity_step.py REPO OUT.json
A random UNet with SD1.5's architecture is built by diffusers and converted by ComfyUI's own loader
(``load_diffusion_model_state_dict``); the CLIP-L text model is handed to ComfyUI through its own
``load_text_encoder_state_dicts`` (which stores it in fp16, so its weights are made
fp16-representable first) and its tokenizer is ComfyUI's SD1 tokenizer. Both hosts then
compute recon + SPL with the same trained deltas, token vector, noisy latents, timesteps, noise
and mask; the script writes their losses' and gradients' relative differences as JSON.
"""

import importlib
import json
import os
import sys
import types

import torch


def load_pack(repo: str, *modules: str):
    """The named modules of this repository (e.g. ``"nodes.comfy_host"``), imported as a package
    (their relative imports need one) without running its top-level ``__init__`` (which registers
    the nodes). Also used by sdxl_host_check.py."""
    package = types.ModuleType("classdiffusion_pack")
    package.__path__ = [repo]
    sys.modules["classdiffusion_pack"] = package
    return tuple(importlib.import_module(f"classdiffusion_pack.{name}") for name in modules)


def step(host, deltas, vector, noisy, timesteps, noise, mask, losses):
    """recon + SPL, reduced as the trainer reduces them; returns (values, K/V grads, token grad)."""
    host.add_tokens(["<sks>"])
    deltas = {name: d.clone().requires_grad_(True) for name, d in deltas.items()}
    vector = vector.clone().requires_grad_(True)
    with torch.no_grad():
        class_eos = host.encode_text(["a photo of a dog"], {}).eos.float()
    detach = host.attach_deltas(deltas)
    try:
        text = host.encode_text(["a photo of a <sks> dog", "close up a photo of a <sks> dog",
                                 "a photo of a <sks> dog"], {"<sks>": vector})
        pred = host.predict_noise(noisy, timesteps, text.context[:2])
        recon = losses.masked_mse(pred.float(), noise, mask)
        spl, _ = losses.semantic_preservation_loss([text.eos[2:]], [class_eos])
        total = recon + spl
        total.backward()
    finally:
        detach()
    values = {"recon": recon.detach(), "spl": spl.detach(), "total": total.detach()}
    return values, {name: d.grad for name, d in deltas.items()}, vector.grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main(repo: str, out_path: str) -> None:
    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.sd
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    comfy_host, diffusers_host, losses, config = load_pack(
        repo, "nodes.comfy_host", "classdiffusion.hosts.diffusers_host", "classdiffusion.model.losses", "classdiffusion.config")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    clip_config = json.load(open(os.path.join("comfy", "sd1_clip_config.json")))
    clip_config.pop("architectures", None)
    text = CLIPTextModel(CLIPTextConfig(**clip_config))
    with torch.no_grad():  # random but sane: ComfyUI's and transformers' inits differ, values must not
        for module in (unet, text):
            for name, param in module.named_parameters():
                if param.ndim > 1 and "embedding" not in name:
                    param.normal_(0.0, param[0].numel() ** -0.5)
        for param in text.parameters():  # ComfyUI keeps text encoders in fp16, even on the CPU:
            param.copy_(param.half().float())  # give both hosts weights that fp16 holds exactly
    patcher = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in unet.state_dict().items()})
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v.clone() for k, v in text.state_dict().items()}
    clip = comfy.sd.load_text_encoder_state_dicts([text_sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    patcher.model.diffusion_model.to(torch.float32)

    ours_comfy = comfy_host.ComfyHost(patcher, clip, None, device=torch.device("cpu"), text_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join("comfy", "sd1_tokenizer"))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    ours_diffusers = diffusers_host.DiffusersHost(tokenizer, text, unet, vae, scheduler, "cpu")
    ours_diffusers.configure_training(config.TrainConfig(attention="sdpa"))

    base = ours_diffusers.cross_attention_weights("kv")
    comfy_base = ours_comfy.cross_attention_weights("kv")
    torch.manual_seed(1)
    deltas = {name: torch.randn(w.shape) * 0.02 for name, w in base.items()}
    vector = ours_diffusers.word_embedding("ktn") + torch.randn(768) * 0.05
    noisy, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([100, 700])
    mask = torch.ones(2, 1, 8, 8)
    mask[1, :, :, 5:] = 0

    results = {}
    for label, host in (("comfy", ours_comfy), ("diffusers", ours_diffusers)):
        results[label] = step(host, deltas, vector, noisy, timesteps, noise, mask, losses)
    # The noise floor: the same diffusers host with its other attention implementation — the
    # same math, only summed in another order. Differences of that size are float32 rounding,
    # amplified by the deep random network.
    ours_diffusers.configure_training(config.TrainConfig(attention="eager"))
    ev, eg, et = step(ours_diffusers, deltas, vector, noisy, timesteps, noise, mask, losses)
    (cv, cg, ct), (dv, dg, dt) = results["comfy"], results["diffusers"]
    floor = {
        **{name: relative(ev[name], dv[name]) for name in dv},
        "kv_grad": max(relative(eg[name], dg[name]) for name in dg),
        "token_grad": relative(et, dt),
    }
    report = {
        "noise_floor": floor,
        "same_layers": sorted(base) == sorted(comfy_base),
        "base_weights": max(relative(comfy_base[n].float(), base[n].float()) for n in base),
        "alphas_cumprod": relative(ours_comfy.alphas_cumprod(), ours_diffusers.alphas_cumprod()),
        **{name: relative(cv[name], dv[name]) for name in cv},
        "kv_grad": max(relative(cg[name], dg[name]) for name in dg),
        "kv_grad_reached": all(float(cg[name].abs().sum()) > 0 for name in cg),
        "token_grad": relative(ct, dt),
        "total_value": float(dv["total"]),
    }
    with open(out_path, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
