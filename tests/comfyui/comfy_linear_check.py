"""The fused K/V linear on a ComfyUI layer: weights read through ComfyUI's own casting.

Run with ComfyUI's Python from the ComfyUI folder:  python comfy_linear_check.py REPO OUT.json
A ``comfy.ops.manual_cast.Linear`` stores fp16 weights and computes in the input's dtype; a weight
function (what ComfyUI applies at cast time, e.g. a LoRA in low-VRAM mode) doubles the weight. With
a trained ΔW attached the layer must compute ``x·(2W + ΔW)ᵀ + b`` in fp32, send ΔW the gradient
without the start position, and give its own forward back when detached. Writes the differences
to the expected values as JSON.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F


def main(repo: str, out_path: str) -> None:
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops
    from host_parity_step import load_pack

    comfy_host, kv = load_pack(repo, "nodes.comfy_host", "classdiffusion.model.kv")
    torch.manual_seed(0)
    layer = comfy.ops.manual_cast.Linear(16, 8, bias=True, dtype=torch.float16)
    layer.weight = torch.nn.Parameter(torch.randn(8, 16).half(), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(8).half(), requires_grad=False)
    layer.weight_function = [lambda weight: weight * 2]
    delta = (0.01 * torch.randn(8, 16)).requires_grad_(True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    upstream = torch.randn(2, 5, 8)

    detach = kv.attach_fused_deltas({"mid.attn2.to_k": layer}, {"mid.attn2.to_k.weight": delta},
                                    read_weights=comfy_host.comfy_weights)
    try:
        out = layer(x)
        grad_x, grad_delta = torch.autograd.grad(out, (x, delta), upstream)
    finally:
        detach()
    effective = 2 * layer.weight.float() + delta.detach()
    expected = F.linear(x.detach(), effective, layer.bias.float())
    expected_grad_delta = torch.einsum("blo,bli->oi", upstream[:, 1:], x.detach()[:, 1:])
    plain = layer(x.detach())  # ComfyUI's own forward again: x·(2W)ᵀ + b
    report = {
        "out_dtype": str(out.dtype),
        "value": float((out.detach() - expected).abs().max()),
        "grad_x": float((grad_x - upstream @ effective).abs().max()),
        "grad_delta": float((grad_delta - expected_grad_delta).abs().max()),
        "restored": "forward" not in layer.__dict__,
        "plain": float((plain - F.linear(x.detach(), 2 * layer.weight.float(), layer.bias.float())).abs().max()),
    }
    with open(out_path, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
