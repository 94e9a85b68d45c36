"""The ComfyUI host on an SDXL checkpoint against ComfyUI's own SDXL path, same weights and inputs.

Run with ComfyUI's Python from the ComfyUI folder:  python sdxl_host_check.py REPO CHECKPOINT OUT.json
The checkpoint (make_checkpoint.py --sdxl) is loaded by ComfyUI's CheckpointLoader code, which
detects its family by itself. The script writes, as JSON, what ComfyUI detected and the relative
differences between our trainable copies and ComfyUI's own computation:

- the text conditioning (CLIP-L and bigG penultimate features side by side, 2048 wide) and the
  pooled embedding (bigG's projection), for a plain prompt and for one with the trained token
  (ComfyUI: the CLIP as Load Concept K/V returns it; ours: the host's token vector);
- ε of the UNet with the pooled embedding and size ids as added conditioning (ComfyUI: its
  ``extra_conds`` → ``apply_model`` at σ; ours: ``predict_noise`` at the DDPM timestep);
- that a gradient reaches both halves of the token and every attn2 K/V delta.
"""

import json
import os
import sys

import torch

from host_parity_step import load_pack, relative  # this script's folder is on sys.path


def main(repo: str, checkpoint: str, out_path: str) -> None:
    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_base
    import comfy.sd

    comfy_host, comfy_glue, hosts_base = load_pack(repo, "nodes.comfy_host", "nodes.comfy_glue",
                                                   "classdiffusion.hosts.base")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    report = {"model_class": type(model.model).__name__, "config_class": type(model.model.model_config).__name__,
              "is_sdxl": isinstance(model.model, comfy.model_base.SDXL),
              "family": comfy_host.model_family(model).name, "clip_family": comfy_host.clip_family(clip).name}
    patcher = comfy_glue.training_patcher(model)
    host = comfy_host.ComfyHost(patcher, clip, vae, device=torch.device("cpu"), text_dtype=torch.float32)
    host.add_tokens(["<sks>"])
    torch.manual_seed(0)
    vector = host.word_embedding("dog") + 0.05 * torch.randn(2048)

    def comfy_encode(a_clip, text):
        cond, pooled = a_clip.encode_from_tokens(a_clip.tokenize(text), return_pooled=True)
        return cond.float(), pooled.float()

    with torch.no_grad():
        for name, prompt, tokens, a_clip in (
                ("plain", "a photo of a dog", {}, clip),
                ("token", "a photo of a <sks> dog", {"<sks>": vector},
                 comfy_glue.clip_with_tokens(clip, ["<sks>"], vector[None]))):
            ours = host.encode_text([prompt], tokens)
            context, pooled = host.family.unet_inputs(ours.context, 1280)
            theirs_context, theirs_pooled = comfy_encode(a_clip, prompt)
            report[f"context_{name}"] = relative(context, theirs_context)
            report[f"pooled_{name}"] = relative(pooled, theirs_pooled)
            report[f"context_shape_{name}"] = list(context.shape)

        # ε: ComfyUI's own conditioning path at σ vs ours at the DDPM timestep.
        latents = torch.randn(1, 4, 8, 8)
        t = 500
        alpha = host.alphas_cumprod()[t]
        sigma = ((1 - alpha) / alpha).sqrt()
        noisy = latents  # x_t; ComfyUI's x_σ = x_t / √ᾱ
        ours_eps = host.predict_noise(noisy, torch.tensor([t]), host.encode_text(["a photo of a dog"], {}).context)
        cond, pooled = comfy_encode(clip, "a photo of a dog")
        x_sigma = noisy / alpha.sqrt()
        # The size ComfyUI's samplers give extra_conds: the latent's ×8 (comfy.samplers.encode_model_conds).
        size = {"width": x_sigma.shape[3] * 8, "height": x_sigma.shape[2] * 8}
        conds = patcher.model.extra_conds(pooled_output=pooled, cross_attn=cond, noise=x_sigma,
                                          device=torch.device("cpu"), **size)
        kwargs = {key: value.cond for key, value in conds.items()}
        denoised = patcher.model.apply_model(x_sigma, sigma[None], c_crossattn=kwargs.pop("c_crossattn"), **kwargs)
        comfy_eps = (x_sigma - denoised) / sigma
        report["eps"] = relative(ours_eps.float(), comfy_eps.float())

    base = host.cross_attention_weights("kv")
    deltas = {name: torch.zeros_like(w, dtype=torch.float32, requires_grad=True) for name, w in base.items()}
    trained = vector.clone().requires_grad_(True)
    detach = host.attach_deltas(deltas)
    try:
        conditioning = host.encode_text(["a photo of a <sks> dog"], {"<sks>": trained}).context
        host.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([300]), conditioning).pow(2).mean().backward()
    finally:
        detach()
    report["attn2_layers"] = len({name.rsplit(".", 2)[0] for name in base})
    report["kv_grads_reached"] = all(d.grad is not None and float(d.grad.abs().sum()) > 0 for d in deltas.values())
    report["token_grad_clip_l"] = float(trained.grad[:768].abs().sum())
    report["token_grad_clip_g"] = float(trained.grad[768:].abs().sum())
    host.close()
    with open(out_path, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
