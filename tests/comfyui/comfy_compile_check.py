"""ComfyUI's SD1.5 UNet with the fused K/V layers attached, traced by torch.compile's frontend.

Run with ComfyUI's Python from the ComfyUI folder:  python comfy_compile_check.py REPO OUT.json
With ComfyUI's PyTorch attention (its choice on GPUs with a recent PyTorch) the whole forward —
ComfyUI's openaimodel, its comfy.ops casting and the trained deltas — must trace as one graph.
Writes the graph and graph-break counts (and where breaks happened) as JSON.
"""

import json
import os
import sys

import torch


def main(repo: str, out_path: str) -> None:
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.sd
    from diffusers import UNet2DConditionModel
    from host_parity_step import load_pack

    kv, comfy_host = load_pack(repo, "classdiffusion.model.kv", "nodes.comfy_host")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    patcher = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in unet.state_dict().items()})
    model = patcher.model.diffusion_model.to(torch.float32)
    names = comfy_host.diffusers_to_comfy_map(patcher)
    modules = dict(model.named_modules())
    wanted = kv.trained_names(names, "kv")
    deltas = {name: torch.zeros(tuple(unet.get_parameter(name).shape), requires_grad=True) for name in wanted}
    layers = {name.rpartition(".")[0]: modules[names[name].rpartition(".")[0]] for name in wanted}
    detach = kv.attach_fused_deltas(layers, deltas, read_weights=comfy_host.comfy_weights)
    try:
        explanation = torch._dynamo.explain(model)(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]),
                                                   context=torch.randn(2, 77, 768))
    finally:
        detach()
    report = {"layers": len(layers), "graph_count": explanation.graph_count,
              "graph_break_count": explanation.graph_break_count,
              "breaks": [str(reason.user_stack[-1]) for reason in explanation.break_reasons][:10]}
    with open(out_path, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
