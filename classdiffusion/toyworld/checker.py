"""An independent checker for toy-world pictures: what a picture shows, read by means that share
nothing with the model under test (not the toy CLIP, not the UNet).

- **scene**: a rule on background pixels — the median colour of the top and bottom strips, nearest
  to each scene's (sky, ground) palette;
- **class, colour, pattern, add-on, instance**: a small CNN trained on rendered ground truth
  (:func:`train_checker`), every combination of the world included (the checker is not the base:
  it may see the held-out combinations and the instances);
- **a reject class**: the class head also learns "none" on blobs and partial, holed or squashed
  objects, and a read counts only when confident (:data:`CONFIDENT`), so a blob is not a star.

Its instance head gives the *instance-match score* — the probability that a picture shows a given
instance — the toy world's analogue of DINO-I.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from PIL import Image, ImageFilter

from .world import ADDONS, BROKEN, BROKEN_BOX, CLASSES, COLOURS, INSTANCES, PATTERNS, SCENES, World

INSTANCE_LABELS = ("none",) + tuple(inst.name for inst in INSTANCES)
#: "none" in the class head is the reject class; "two" / "half" are the two-half looks (instances
#: included), whose colours the instance head tells apart.
HEADS = {"cls": CLASSES + ("none",), "colour": tuple(COLOURS) + ("two",), "pattern": PATTERNS + ("half",),
         "addon": ADDONS, "instance": INSTANCE_LABELS}
#: A class or instance read counts only at this probability or more; below it the class reads "none".
CONFIDENT = 0.5
#: Label of a head that an example does not train (a broken object's colour and pattern).
IGNORE = -100


def scene_of(image: Image.Image) -> str:
    """The scene by background pixels: the median of the top and bottom 5 % of rows."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    rows = max(1, pixels.shape[0] // 20)
    top = np.median(pixels[:rows].reshape(-1, 3), axis=0)
    bottom = np.median(pixels[-rows:].reshape(-1, 3), axis=0)
    distance = {name: np.linalg.norm(top - np.array(sky)) + np.linalg.norm(bottom - np.array(ground))
                for name, (sky, ground, _, _) in SCENES.items()}
    return min(distance, key=distance.get)


class CheckerNet(nn.Module):
    """Four conv blocks (64 → 4 px) and one linear head per attribute; about 60 MFLOP a picture,
    so it trains in minutes on two CPU cores."""

    def __init__(self, width: int = 24):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(channels, len(labels)) for name, labels in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def to_tensor(images: Sequence[Image.Image], size: int = 64) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def labels_of(scene, broken: str | None = None) -> dict[str, int]:
    """The heads' labels for a rendered ``scene`` (``broken``: drawn broken — class "none", no
    colour or pattern label, not an instance)."""
    two = scene.instance is not None or scene.pattern == "half"
    if broken is not None:
        return {"cls": HEADS["cls"].index("none"), "colour": IGNORE, "pattern": IGNORE,
                "addon": ADDONS.index(scene.addon), "instance": 0}
    return {"cls": CLASSES.index(scene.cls),
            "colour": HEADS["colour"].index("two" if two else scene.colour),
            "pattern": HEADS["pattern"].index("half" if two else scene.pattern),
            "addon": ADDONS.index(scene.addon),
            "instance": INSTANCE_LABELS.index(scene.instance or "none")}


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a small diffusion model's picture may look like: a little blur and noise."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.5))))
    if rng.random() < 0.5:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 12), (image.height, image.width, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image


def example_scene(world: World, rng: np.random.Generator):
    """Training examples for the checker: ordinary scenes of every combination (a third of them
    in two halves of colours other than the instances'), instances (a quarter of the examples) in
    every scene with every add-on, and near misses (a tenth): an instance's class in two halves with
    one of its colours swapped for another — what tells red and yellow from orange and yellow."""
    draw = rng.random()
    if draw < 0.25:
        name = INSTANCES[rng.integers(len(INSTANCES))].name
        return world.instance_scene(name, rng, scene=list(SCENES)[rng.integers(len(SCENES))],
                                    addon=ADDONS[rng.integers(len(ADDONS))])
    if draw < 0.35:
        return near_miss(world, rng)
    return world.sample_scene(rng, held_out=bool(rng.random() < 1 / 7), two_colour_share=1 / 3)


def near_miss(world: World, rng: np.random.Generator):
    """An ordinary two-half object of an instance's class, one of the instance's colours kept and
    the other replaced (never another instance's look)."""
    from dataclasses import replace

    from .world import held_out_look

    inst = INSTANCES[rng.integers(len(INSTANCES))]
    kept = (inst.first, inst.second)[rng.integers(2)]
    others = [c for c in COLOURS if c not in (inst.first, inst.second) and not held_out_look(inst.cls, kept, c)]
    second = others[rng.integers(len(others))]
    pair = (kept, second) if rng.random() < 0.5 else (second, kept)
    scene = world.sample_scene(rng, two_colour_share=0.0)
    return replace(scene, cls=inst.cls, colour=pair[0], pattern="half", second=pair[1],
                   addon="hat" if scene.addon == "ball" and inst.cls == "ball" else scene.addon)


def broken_part(scene, rng: np.random.Generator) -> str:
    """A way to break ``scene``'s object (:data:`~.world.BROKEN`)."""
    parts = BROKEN_BOX if scene.cls == "box" else BROKEN
    return parts[rng.integers(len(parts))]


def rendered_examples(world: World, seed: int, count: int, degrade: bool = True, broken_share: float = 0.15):
    """``count`` rendered training pictures and their labels; ``broken_share`` of them drawn
    broken (the reject class's examples)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        scene = example_scene(world, rng)
        broken = broken_part(scene, rng) if rng.random() < broken_share else None
        image = world.render(scene, rng, part=broken)
        images.append(_degrade(image, rng) if degrade else image)
        labels.append(labels_of(scene, broken))
    return images, labels


def train_checker(*, steps: int = 3000, batch: int = 64, seed: int = 0, size: int = 64, log=print,
                  device: str = "cpu") -> CheckerNet:
    """The checker, trained from scratch on freshly rendered pictures (deterministic in ``seed``;
    ``device`` only says where the net computes, the pictures are the same)."""
    torch.manual_seed(seed)
    world = World(size=size, seed=seed)
    net = CheckerNet().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(steps):
        images, labels = rendered_examples(world, seed * 1_000_003 + step, batch)
        pixels = to_tensor(images, size).to(device)
        if step % 2:  # mirror images: position words are not checked, shapes are symmetric enough
            pixels = pixels.flip(-1)
        outputs = net(pixels)
        loss = sum(F.cross_entropy(outputs[name], torch.tensor([label[name] for label in labels], device=device),
                                   ignore_index=IGNORE) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"checker step {step}: loss {loss.item():.4f}")
    return net.cpu().eval()


class Checker:
    """Reads toy-world pictures: ``read(images)`` gives each picture's attributes and the
    probabilities behind them."""

    def __init__(self, net: CheckerNet, size: int = 64):
        self.net = net.eval()
        self.size = size

    @classmethod
    def load(cls, path: str | Path) -> "Checker":
        from safetensors.torch import load_file

        net = CheckerNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    def save(self, path: str | Path) -> None:
        from ..concept import atomic_save_file

        atomic_save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, Path(path),
                                 metadata={"what": "toy-world checker", "heads": str({k: list(v) for k, v in HEADS.items()})})

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        outputs = {}
        for start in range(0, len(images), 128):
            logits = self.net(to_tensor(images[start:start + 128], self.size))
            for name, value in logits.items():
                outputs.setdefault(name, []).append(value.softmax(-1))
        return {name: torch.cat(parts) for name, parts in outputs.items()}

    def read(self, images: Sequence[Image.Image]) -> list[dict]:
        """Each picture's attributes; the class is "none" unless read with :data:`CONFIDENT`
        probability (a blob or a broken object is no class), the instance "none" likewise."""
        probs = self.probabilities(images)
        out = []
        for k, image in enumerate(images):
            reading = {name: HEADS[name][int(probs[name][k].argmax())] for name in HEADS}
            for name in ("cls", "instance"):
                if float(probs[name][k].max()) < CONFIDENT:
                    reading[name] = "none"
            reading["scene"] = scene_of(image)
            out.append(reading)
        return out

    def instance_score(self, images: Sequence[Image.Image], instance: str) -> list[float]:
        """The probability that each picture shows ``instance`` (the DINO-I analogue)."""
        column = INSTANCE_LABELS.index(instance)
        return [float(p) for p in self.probabilities(images)["instance"][:, column]]


def agreement(checker: Checker, scenes: Sequence, images: Sequence[Image.Image],
              broken: Sequence[str | None] | None = None) -> dict[str, float]:
    """Per attribute, the share of ``images`` in which the checker reads what ``scenes`` (their
    ground truth; ``broken``: which were drawn broken) say; heads without a label are skipped."""
    readings = checker.read(images)
    broken = broken or [None] * len(scenes)
    labels = [labels_of(s, b) for s, b in zip(scenes, broken)]
    result = {name: float(np.mean([label[name] == HEADS[name].index(r[name])
                                   for label, r in zip(labels, readings) if label[name] != IGNORE]))
              for name in HEADS}
    result["scene"] = float(np.mean([r["scene"] == s.scene for s, r in zip(scenes, readings)]))
    return result


def accuracy(checker: Checker, world: World, seed: int, count: int = 500, degrade: bool = False) -> dict[str, float]:
    """The checker's accuracy per attribute on freshly rendered whole pictures (scene by its rule)."""
    rng = np.random.default_rng(seed)
    scenes = [example_scene(world, rng) for _ in range(count)]
    images = [world.render(scene, rng) for scene in scenes]
    if degrade:
        images = [_degrade(image, rng) for image in images]
    return agreement(checker, scenes, images)


def rejection(checker: Checker, world: World, seed: int, count: int = 300) -> float:
    """The share of broken objects (blobs, parts, holes, smears) whose class the checker refuses."""
    rng = np.random.default_rng(seed)
    scenes = [example_scene(world, rng) for _ in range(count)]
    images = [world.render(scene, rng, part=broken_part(scene, rng)) for scene in scenes]
    return float(np.mean([r["cls"] == "none" for r in checker.read(images)]))


__all__ = ["CONFIDENT", "Checker", "CheckerNet", "HEADS", "accuracy", "agreement", "rejection", "scene_of",
           "train_checker"]
