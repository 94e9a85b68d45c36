"""SPL equals 1 − cos of EOS features computed independently, and its gradient reaches only the token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from classdiffusion.model.losses import semantic_preservation_loss


def _independent_eos(base, prompt: str, token: str, vector: torch.Tensor) -> torch.Tensor:
    """The textbook way: a fresh text encoder whose embedding matrix gets the token as a new row,
    and the EOS feature taken at the first end-of-text position found by hand."""
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    tokenizer.add_tokens([token])
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = vector
    ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos_index = ids[0].tolist().index(tokenizer.eos_token_id)
    with torch.no_grad():
        return encoder(ids).last_hidden_state[0, eos_index]


def test_spl_equals_one_minus_cosine_of_independent_eos_features(host, tiny_base):
    host.add_tokens(["<sks>"])
    torch.manual_seed(0)
    vector = torch.randn(768) * 0.02
    with torch.no_grad():
        token_eos = host.encode_text(["a photo of a <sks> dog"], {"<sks>": vector}).eos
        class_eos = host.encode_text(["a photo of a dog"], {}).eos
    loss, cos = semantic_preservation_loss([token_eos], [class_eos])

    ref_token = _independent_eos(tiny_base, "a photo of a <sks> dog", "<sks>", vector)
    ref_class = _independent_eos(tiny_base, "a photo of a dog", "<sks>", vector)
    assert torch.allclose(token_eos[0], ref_token, atol=1e-5)
    assert torch.allclose(class_eos[0], ref_class, atol=1e-5)
    expected = 1 - F.cosine_similarity(ref_token, ref_class, dim=0)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert 0 < float(loss) < 1


def test_eos_position_is_the_end_of_text_not_the_new_token(host):
    """SD1.5's text config has eos_token_id=2, so transformers' pooler picks argmax(id) — which is a
    newly added token's id. SPL must use the real end-of-text position."""
    host.add_tokens(["<sks>"])
    ids, eos_pos, _, _ = host.text._tokenize(["a photo of a <sks> dog"])
    assert ids[0, eos_pos[0]] == host.tokenizer.eos_token_id
    assert ids[0].argmax() != eos_pos[0]


def test_spl_gradient_reaches_the_token_and_nothing_else_in_the_text_encoder(host):
    host.add_tokens(["<sks>"])
    vector = torch.nn.Parameter(host.word_embedding("ktn"))
    token_eos = host.encode_text(["a photo of a <sks> dog"], {"<sks>": vector}).eos
    with torch.no_grad():
        class_eos = host.encode_text(["a photo of a dog"], {}).eos
    loss, _ = semantic_preservation_loss([token_eos], [class_eos])
    loss.backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in host.text_encoder.parameters())


def test_class_phrase_features_do_not_depend_on_the_token(host):
    host.add_tokens(["<sks>"])
    with torch.no_grad():
        a = host.encode_text(["a photo of a dog"], {"<sks>": torch.zeros(768)}).eos
        b = host.encode_text(["a photo of a dog"], {"<sks>": torch.ones(768)}).eos
    assert torch.equal(a, b)


def test_eos_only_encoding_cuts_after_the_last_eos_and_gives_the_same_features(host):
    """Drift probes only need EOS features; CLIP's causal attention makes the positions after the
    last EOS irrelevant, so they are not computed."""
    host.add_tokens(["<sks>"])
    vector = host.word_embedding("ktn") + 0.1
    prompts = ["a dog", "a photo of a <sks> dog", "a shiny dog"]
    with torch.no_grad():
        full = host.encode_text(prompts, {"<sks>": vector})
        cut = host.encode_text(prompts, {"<sks>": vector}, eos_only=True)
    ids, eos_pos, _, length = host.text._tokenize(prompts)
    assert int(eos_pos.max()) < length < ids.shape[1] and length % 16 == 0
    assert cut.context.shape[1] == length
    assert torch.allclose(cut.eos, full.eos, atol=1e-5, rtol=1e-5)
