"""The node pack's pure helpers (no ComfyUI needed): prompt rewriting, LoRA-style export, names."""

from __future__ import annotations

import pytest
import torch

from classdiffusion.model.precision import precision_dtype
from nodes.glue import TOKEN_MARKER, diff_file_tensors, rewrite_prompt, sanitize_name, training_precision


def test_rewrite_prompt_replaces_whole_tokens_only():
    text = "a photo of a <sks> dog, (<sks>:1.2) and x<sks>y and <sks2>"
    out = rewrite_prompt(text, ["<sks>"])
    assert out.count(f"embedding:{TOKEN_MARKER}0") == 2
    assert "x<sks>y" in out and "<sks2>" in out


def test_rewrite_prompt_numbers_stacked_tokens():
    out = rewrite_prompt("a <a1> and a <b2>", ["<a1>", "<b2>"], marker_offset=3)
    assert f"embedding:{TOKEN_MARKER}3" in out and f"embedding:{TOKEN_MARKER}4" in out


def test_diff_file_uses_comfy_lora_keys():
    deltas = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.ones(2, 3),
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias": torch.ones(2)}
    mapping = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight":
               "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
               "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias":
               "middle_block.1.transformer_blocks.0.attn2.to_out.0.bias"}
    out = diff_file_tensors(deltas, mapping, strength=0.5)
    assert set(out) == {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.diff",
                        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.diff_b"}
    assert torch.equal(out["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.diff"], torch.full((2, 3), 0.5))


def test_sanitize_name():
    assert sanitize_name(" my dog/../x ") == "my_dog_.._x"
    with pytest.raises(ValueError, match="empty"):
        sanitize_name(" / ")


@pytest.mark.parametrize("unet_dtype, bf16_supported, expected", [
    (torch.float16, True, "fp16"), (torch.bfloat16, True, "bf16"),
    (torch.float32, True, "bf16"), (torch.float32, False, "fp16"),
])
def test_auto_precision_computes_in_the_dtype_comfyui_loaded_the_unet_in(unet_dtype, bf16_supported, expected):
    assert training_precision("auto", "cuda", unet_dtype, bf16_supported) == expected
    assert training_precision("auto", "cpu", unet_dtype, bf16_supported) == "no"
    assert training_precision("bf16", "cuda", torch.float16, True) == "bf16"  # an explicit choice stays


@pytest.mark.parametrize("unet_dtype", [torch.float16, torch.bfloat16])
def test_matching_autocast_keeps_no_converted_weight_copies_for_backward(unet_dtype):
    """Why "auto" follows the UNet's dtype: with any other autocast dtype, the backward pass
    holds a converted copy of every frozen weight."""
    layer = torch.nn.Linear(64, 64).to(unet_dtype).requires_grad_(False)
    x = torch.randn(4, 64, requires_grad=True)  # stands for activations that need gradients
    other = torch.float16 if unet_dtype == torch.bfloat16 else torch.bfloat16
    weight_storage = layer.weight.untyped_storage().data_ptr()
    for autocast_dtype, copies_expected in ((precision_dtype(training_precision("auto", "cuda", unet_dtype, True)), 0),
                                            (other, 1)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=autocast_dtype):
            layer(x.to(unet_dtype))
        weight_like = [t for t in saved if t.shape == layer.weight.shape]
        copies = [t for t in weight_like if t.untyped_storage().data_ptr() != weight_storage]
        assert len(weight_like) == 1 and len(copies) == copies_expected
