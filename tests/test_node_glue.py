"""The node pack's pure helpers (no ComfyUI needed): prompt rewriting, LoRA-style export, names."""

from __future__ import annotations

import pytest
import torch

from nodes.glue import TOKEN_MARKER, diff_file_tensors, rewrite_prompt, sanitize_name


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
