"""Scores of a concept on the toy base, read by the independent checker and the toy CLIP.

What the paper measures on DreamBench, here with ground truth: identity (the checker's
instance score, the DINO-I analogue; toy CLIP-I against the training pictures), and whether the
concept still composes — **jointly**: a composition picture counts only if the asked scene and
add-on, the class (read confidently) *and* the instance's look are all in it. The older, looser
column (scene and add-on only) and toy CLIP-T with the token removed stay beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .world import INSTANCES, World, composition_prompts

#: Sampling settings of every toy-world score (the validity gate uses the same).
SAMPLING = {"steps": 25, "guidance": 5.0}


def instance_pictures(name: str, count: int = 5, seed: int = 0,
                      scene: str | Sequence[str] = "table") -> list[Image.Image]:
    """``count`` training pictures of a held-out instance (as a user's 4–6 photos), in one plain
    scene or, given several, in each in turn."""
    world = World(seed=seed)
    scenes = [scene] if isinstance(scene, str) else list(scene)
    rng = np.random.default_rng([seed, INSTANCES.index(world.instance(name))])
    return [world.render(world.instance_scene(name, rng, scene=scenes[k % len(scenes)]), rng) for k in range(count)]


def sample(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = SAMPLING["steps"],
           guidance: float = SAMPLING["guidance"], tea: float = 0.0, tokens: Sequence[str] = ()
           ) -> list[list[Image.Image]]:
    """Pictures of each prompt (outer list) at each seed (inner list); seed ``s`` gives every
    prompt the same starting noise, so rows are comparable. ``tea``: TEA's rho on ``tokens``."""
    from ..concept.generate import sample_rows

    return sample_rows(pipe, prompts, seeds, steps=steps, guidance=guidance, tea=tea, tokens=tokens)


@dataclass
class ConceptScores:
    """What one concept (or the base on the class prompt) achieves, over the sampled seeds."""

    identity: float  # checker instance score on "a photo of a <token> CLASS"
    clip_i: float  # toy CLIP image cosine, generated × training pictures
    composition: float  # share of composition pictures with the asked scene and add-on
    composition_identity: float  # checker instance score on the composition pictures
    clip_t: float  # toy CLIP-T of the composition pictures, token removed
    composition_joint: float = 0.0  # share with scene, add-on, class and the instance's look all right
    composition_class: float = 0.0  # share whose class the checker reads confidently as the asked one

    def to_dict(self) -> dict:
        return {k: round(float(v), 4) for k, v in self.__dict__.items()}


def score(pipe, checker, clip, instance: str, phrase: str, references: Sequence[Image.Image],
          seeds: Sequence[int], *, keep: dict | None = None, tea: float = 0.0) -> ConceptScores:
    """Scores of ``phrase`` (e.g. "<sks> star", or "star" for the base) standing for ``instance``;
    ``keep`` receives the pictures ({"concept": [...], "composition": [...]}) when given; ``tea``:
    sampled with TEA (the phrase's token turned towards the class, rho = tea)."""
    from ..evaluation.image_metrics import clip_t, image_similarity

    cls = World().instance(instance).cls
    composition = composition_prompts(cls)
    prompts = [f"a photo of a {phrase}"] + [template.format(phrase) for template, _ in composition]
    rows = sample(pipe, prompts, seeds, tea=tea, tokens=phrase.split()[:-1])
    own, others = rows[0], rows[1:]
    readings = [checker.read(row) for row in others]
    composed = [all(reading.get(name) == value for name, value in expected.items())
                for (_, expected), row in zip(composition, readings) for reading in row]
    flat_readings = [reading for row in readings for reading in row]
    right_class = [reading["cls"] == cls for reading in flat_readings]
    joint = [c and k and reading["instance"] == instance
             for c, k, reading in zip(composed, right_class, flat_readings)]
    flat = [image for row in others for image in row]
    flat_prompts = [prompt for prompt, row in zip(prompts[1:], others) for _ in row]
    tokens = phrase.split()[:-1]  # the concept's token(s); CLIP-T reads the prompt without them
    if keep is not None:
        keep.update(concept=own, composition=others, prompts=prompts)
    return ConceptScores(
        identity=float(np.mean(checker.instance_score(own, instance))),
        clip_i=image_similarity(clip, own, references),
        composition=float(np.mean(composed)),
        composition_identity=float(np.mean(checker.instance_score(flat, instance))),
        clip_t=clip_t(clip, flat, flat_prompts, tokens),
        composition_joint=float(np.mean(joint)),
        composition_class=float(np.mean(right_class)),
    )


def picture_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], scale: int = 2) -> Image.Image:
    """Rows of pictures with a label above each row (nearest-neighbour upscaled: 64 px is small)."""
    from PIL import ImageDraw

    tile = max(image.width for row in rows for image in row) * scale
    label_height = 14
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * tile, len(rows) * (tile + label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = r * (tile + label_height)
        draw.text((3, top + 1), label, fill=(0, 0, 0))
        for c, image in enumerate(row):
            grid.paste(image.resize((tile, tile), Image.NEAREST), (c * tile, top + label_height))
    return grid


__all__ = ["SAMPLING", "ConceptScores", "instance_pictures", "picture_grid", "sample", "score"]
