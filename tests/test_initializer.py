"""A new token starts where the official code starts it, checked on the real CLIP vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from classdiffusion.errors import InvalidInputError
from classdiffusion.model.text import TransformersTextEncoder

REAL_VOCABULARY = Path(__file__).resolve().parents[2] / "shared" / "comfyui" / "ComfyUI" / "comfy" / "sd1_tokenizer"


@pytest.fixture(scope="module")
def real_clip_text() -> TransformersTextEncoder:
    """The real CLIP-L tokenizer over a small random text model with the real vocabulary size."""
    if not (REAL_VOCABULARY / "vocab.json").is_file():
        pytest.skip(f"the real CLIP vocabulary is not at {REAL_VOCABULARY} (../shared beside the repository)")
    tokenizer = CLIPTokenizer.from_pretrained(str(REAL_VOCABULARY))
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                         eos_token_id=2))
    return TransformersTextEncoder(tokenizer, model.eval(), torch.device("cpu"))


def test_ktn_starts_from_its_one_vocabulary_piece(real_clip_text):
    """Official: ``tokenizer.encode(["ktn"])`` under transformers 4.x is [42170] (the piece "ktn");
    a prompt splits the word into ``k`` + ``tn</w>``, whose mean is what we used to start from."""
    assert real_clip_text.word_ids("ktn") == [74, 7248]
    assert real_clip_text.initializer_ids("ktn") == [42170]
    rows = real_clip_text.injector.base.weight
    assert torch.equal(real_clip_text.word_embedding("ktn"), rows[42170].float())
    assert not torch.allclose(real_clip_text.word_embedding("ktn"), rows[[74, 7248]].float().mean(0))


def test_a_word_that_is_not_one_piece_starts_from_the_mean_of_its_pieces(real_clip_text):
    assert "teddybear" not in real_clip_text.tokenizer.get_vocab()
    ids = real_clip_text.initializer_ids("teddy bear")
    assert ids == real_clip_text.word_ids("teddy bear") and len(ids) == 2
    rows = real_clip_text.injector.base.weight
    assert torch.allclose(real_clip_text.word_embedding("teddy bear"), rows[ids].float().mean(0))


def test_a_new_token_cannot_be_an_initializer(real_clip_text):
    real_clip_text.add_tokens(["<sks>"])
    with pytest.raises(InvalidInputError, match="itself a new token"):
        real_clip_text.word_embedding("<sks>")
