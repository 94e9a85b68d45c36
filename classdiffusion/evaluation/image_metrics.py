"""The field's image metrics for personalization (DreamBooth, Custom Diffusion, ClassDiffusion §4.1):

* CLIP-T — cosine similarity of CLIP image and text embeddings of each generated image and its
  prompt, with the concept token replaced by the class word ("a <sks> dog in the snow" → "a dog
  in the snow");
* CLIP-I — cosine similarity of CLIP image embeddings of generated and reference (training) images,
  averaged over all pairs;
* DINO-I — the same with the CLS embedding of a self-supervised ViT-S/16 DINO model.

Values are plain cosines in [−1, 1] (some papers print CLIP-T ×100 or ×2.5). Models load from
local folders in Hugging Face layout (e.g. ``openai/clip-vit-large-patch14``,
``facebook/dino-vits16``) with ``local_files_only``; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InvalidInputError
from ..model.text import replace_token

#: DreamBooth benchmark (Ruiz et al. 2023, dataset/prompts_and_classes.txt): 25 prompts for objects
#: and 25 for live subjects; {0} is the unique token, {1} the class word.
_SHARED = (
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street", "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
)
_ATTRIBUTES = ("a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}")
OBJECT_PROMPTS: tuple[str, ...] = _SHARED + (
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug",
) + _ATTRIBUTES
LIVE_PROMPTS: tuple[str, ...] = _SHARED + (
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit",
) + _ATTRIBUTES
#: Class words the DreamBooth benchmark treats as live subjects (its dogs and cats), plus people.
LIVE_CLASSES = {"dog", "cat", "puppy", "kitten", "person", "man", "woman", "boy", "girl", "child", "baby"}

#: Prompts that mention no concept, for the concept-agnostic metric (everyday COCO-style scenes).
GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a sofa", "a city street at night with cars", "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise", "a red bicycle leaning against a wall", "a painting of a ship in a storm",
    "a person riding a horse on the beach", "a cup of coffee next to a laptop",
)


def dreambooth_prompts(token: str, class_word: str, kind: str = "auto") -> list[str]:
    """The 25 DreamBooth evaluation prompts for a concept; ``kind`` is "live", "object" or "auto"
    (live for animals and people)."""
    if kind == "auto":
        kind = "live" if class_word.lower() in LIVE_CLASSES else "object"
    if kind not in ("live", "object"):
        raise InvalidInputError("The prompt set must be 'live', 'object' or 'auto'.")
    templates = LIVE_PROMPTS if kind == "live" else OBJECT_PROMPTS
    return [t.format(token, class_word) for t in templates]


def _check_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(f"The {what} model folder {path} does not exist; give a local folder in Hugging Face layout.")
    return path


def _images(images: Sequence[Image.Image]) -> list[Image.Image]:
    if not images:
        raise InvalidInputError("No images to score.")
    return [img.convert("RGB") for img in images]


class ClipScorer:
    """CLIP image/text embeddings (transformers CLIPModel + CLIPProcessor from a local folder)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        path = _check_folder(path, "CLIP")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=_images(images), return_tensors="pt")["pixel_values"].to(self.device)
        return _as_tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        batch = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        return _as_tensor(self.model.get_text_features(**batch)).float().cpu()


class DinoScorer:
    """CLS embeddings of a DINO ViT (transformers ViTModel + image processor from a local folder)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoImageProcessor, ViTModel

        path = _check_folder(path, "DINO")
        self.device = torch.device(device)
        self.model = ViTModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=_images(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu()


def _as_tensor(output) -> torch.Tensor:
    """transformers ≥ 5 may return a model output where 4.x returned the tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"Unexpected CLIP output {type(output).__name__}")


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of a[i] and b[i] ([N, D] each) → [N]."""
    if a.shape != b.shape:
        raise InvalidInputError(f"Need one prompt per image: {a.shape[0]} images, {b.shape[0]} prompts.")
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs (a[i], b[j]) — CLIP-I / DINO-I between generated and reference sets."""
    return float((F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).mean())


def clip_t(scorer: ClipScorer, images: Sequence[Image.Image], prompts: Sequence[str], tokens: Sequence[str]) -> float:
    """CLIP-T: mean image–prompt cosine, the tokens dropped from the prompts."""
    texts = [replace_token(p, tokens) for p in prompts]
    return float(paired_cosine(scorer.image_features(images), scorer.text_features(texts)).mean())


def image_similarity(scorer, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """CLIP-I or DINO-I (depending on the scorer): mean generated × reference cosine."""
    return mean_pairwise_cosine(scorer.image_features(images), scorer.image_features(references))
