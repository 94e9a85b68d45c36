"""Write a random AnimateDiff v2-style SD1.5 motion module that AnimateDiff-Evolved loads.

Run with ComfyUI's Python from the ComfyUI folder:
    python make_motion_module.py OUT.safetensors ANIMATEDIFF_EVOLVED_DIR
The module is built by AnimateDiff-Evolved's own AnimateDiffModel (so keys and shapes are what it
expects: 4 down, 4 up blocks and a mid block, 32-frame position encoding) and given random weights.
"""

import os
import sys

import torch


def main(out_path: str, ade_dir: str, seed: int = 0) -> None:
    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.utils

    sys.path.insert(0, os.path.dirname(os.path.abspath(ade_dir)))
    package = os.path.basename(os.path.abspath(ade_dir)).replace("-", "_")
    import importlib.util

    spec = importlib.util.spec_from_file_location(package, os.path.join(ade_dir, "__init__.py"),
                                                  submodule_search_locations=[ade_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    motion = importlib.import_module(f"{package}.animatediff.motion_module_ad")

    pe = "temporal_transformer.transformer_blocks.0.attention_blocks.{}.pos_encoder.pe"
    probe = {}
    for block, channels in (("down_blocks.0", 320), ("up_blocks.0", 1280), ("mid_block", 1280)):
        for attn in (0, 1):
            probe[f"{block}.motion_modules.0.{pe.format(attn)}"] = torch.zeros(1, 32, channels)
    info = motion.AnimateDiffInfo(sd_type=motion.ModelTypeSD.SD1_5, mm_format=motion.AnimateDiffFormat.ANIMATEDIFF,
                                  mm_version=motion.AnimateDiffVersion.V2, mm_name="random_test_module")
    model = motion.AnimateDiffModel(probe, info)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name and param.ndim == 1:
                param.fill_(1.0)
            elif name.endswith("proj_out.weight"):
                param.zero_()  # AnimateDiff's zero-initialised output: the module starts as identity
            else:
                param.normal_(0.0, (param[0].numel() if param.ndim > 1 else 1) ** -0.5)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if not k.endswith("pos_encoder.pe")}
    for key, value in model.state_dict().items():
        if key.endswith("pos_encoder.pe"):
            state[key] = value.half().contiguous()
    comfy.utils.save_torch_file(state, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
