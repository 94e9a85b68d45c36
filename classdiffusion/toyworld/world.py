"""The toy world: objects of a few classes with real class words, each with a colour, a pattern,
a size and a position, in one of a few scenes, optionally wearing a hat or standing next to a red
ball; every picture comes with the caption written from its attributes.

Everything is deterministic from a seed. What pretraining never sees is decided here too:

- **held-out combinations**: some (class, colour, scene) triples — prompts for them test whether a
  base composes what it learned separately;
- **instances**: objects with a look no ordinary object has (two colours of their own, a pattern
  of their own) — the concepts to personalize, e.g. "a photo of a <sks> star".

Pictures are drawn at 4× the target size and reduced with a box filter, so edges are smooth.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ball", "box", "star", "cup", "tree")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "yellow": (240, 210, 40), "purple": (140, 60, 190),
           "orange": (245, 140, 30), "pink": (245, 130, 190)}
PATTERNS = ("plain", "striped", "dotted")
SIZES = ("small", "big")
POSITIONS = ("left", "middle", "right")
#: Each scene: sky (top) colour, ground (bottom) colour, where the ground starts (share of height),
#: and the words that place an object in it.
SCENES = {
    "grass": ((135, 195, 240), (70, 160, 60), 0.55, "on the grass"),
    "beach": ((120, 200, 235), (230, 205, 140), 0.6, "on the beach"),
    "snow": ((200, 215, 230), (250, 250, 252), 0.5, "in the snow"),
    "night": ((15, 20, 60), (35, 40, 70), 0.7, "at night"),
    "table": ((225, 215, 200), (140, 90, 50), 0.55, "on a table"),
}
ADDONS = ("none", "hat", "ball")  # "ball": next to a red ball
ADDON_WORDS = {"none": "", "hat": " wearing a hat", "ball": " next to a red ball"}


@dataclass(frozen=True)
class Instance:
    """A look no ordinary object of the world has: the concept a user would personalize."""

    name: str
    cls: str
    body: tuple[int, int, int]
    accent: tuple[int, int, int]
    pattern: str  # "bands": two-colour bands; "ring": an accent ring; "half": two halves


#: The held-out instances: objects split in two halves of two palette colours, a look no ordinary
#: object has (ordinary objects are one colour, plain, striped or dotted) — "a pattern + colour
#: pair" never seen in pretraining. Halves rather than the finer looks of the random pictures the
#: VAE saw: at 8×8 latents the toy VAE reconstructs large areas of palette colours, but blurs bands
#: and rings and shifts colours outside the palette (measured: docs/toyworld.md).
INSTANCES = (
    Instance("red_blue_star", "star", COLOURS["red"], COLOURS["blue"], "half"),
    Instance("yellow_purple_ball", "ball", COLOURS["yellow"], COLOURS["purple"], "half"),
    Instance("pink_blue_box", "box", COLOURS["pink"], COLOURS["blue"], "half"),
    Instance("orange_purple_cup", "cup", COLOURS["orange"], COLOURS["purple"], "half"),
    Instance("blue_yellow_tree", "tree", COLOURS["blue"], COLOURS["yellow"], "half"),
    Instance("purple_orange_star", "star", COLOURS["purple"], COLOURS["orange"], "half"),
)


@dataclass(frozen=True)
class Scene:
    """Everything a picture shows; the renderer draws exactly this, the checker reads it back."""

    cls: str
    colour: str  # a COLOURS name, or an instance's name when ``instance`` is set
    pattern: str
    size: str
    position: str
    scene: str
    addon: str = "none"
    instance: str | None = None

    def caption(self, token: str | None = None) -> str:
        """The caption written from the attributes; with ``token``, the instance's personalization
        phrase ("a photo of a <sks> star on the beach")."""
        if self.instance is not None:
            subject = f"{token} {self.cls}" if token else self.cls
        else:
            words = [self.size] if self.size != "big" else []
            words += [] if self.pattern == "plain" else [self.pattern]
            subject = " ".join(words + [self.colour, self.cls])
        return f"a photo of a {subject} {SCENES[self.scene][3]}{ADDON_WORDS[self.addon]}"


def held_out_combination(cls: str, colour: str, scene: str) -> bool:
    """One (class, colour, scene) triple in seven never appears in pretraining, spread evenly so
    that every class, colour and scene is still seen with the others."""
    i, j, k = CLASSES.index(cls), list(COLOURS).index(colour), list(SCENES).index(scene)
    return (i + 2 * j + 3 * k) % 7 == 0


def held_out_triples() -> list[tuple[str, str, str]]:
    return [t for t in itertools.product(CLASSES, COLOURS, SCENES) if held_out_combination(*t)]


@dataclass
class World:
    """Draws pictures of scenes at ``size`` px; ``seed`` fixes every random choice."""

    size: int = 64
    seed: int = 0
    supersample: int = 4
    _instances: dict = field(init=False, repr=False)

    def __post_init__(self):
        self._instances = {inst.name: inst for inst in INSTANCES}

    def instance(self, name: str) -> Instance:
        return self._instances[name]

    # -- sampling ------------------------------------------------------------------------------
    def sample_scene(self, rng: np.random.Generator, *, held_out: bool = False,
                     addon_share: float = 0.3) -> Scene:
        """A random ordinary scene: from pretraining's combinations, or (``held_out``) from the
        held-out ones only."""
        while True:
            cls, colour, scene = (CLASSES[rng.integers(len(CLASSES))], list(COLOURS)[rng.integers(len(COLOURS))],
                                  list(SCENES)[rng.integers(len(SCENES))])
            if held_out_combination(cls, colour, scene) == held_out:
                break
        addon = "none" if rng.random() >= addon_share else ADDONS[1 + rng.integers(2)]
        if addon == "ball" and cls == "ball":
            addon = "hat"
        return Scene(cls, colour, PATTERNS[rng.integers(len(PATTERNS))], SIZES[rng.integers(len(SIZES))],
                     POSITIONS[rng.integers(len(POSITIONS))], scene, addon)

    def instance_scene(self, name: str, rng: np.random.Generator, scene: str = "table",
                       addon: str = "none") -> Scene:
        inst = self.instance(name)
        position = "middle" if addon == "ball" else POSITIONS[rng.integers(len(POSITIONS))]
        return Scene(inst.cls, name, "plain", "big", position, scene, addon, instance=name)

    def pretraining_batch(self, index: int, count: int) -> Iterator[tuple[Image.Image, Scene]]:
        """Pretraining example ``index``..``index+count``: each drawn from its own seed, so any
        example can be regenerated alone."""
        for k in range(index, index + count):
            rng = np.random.default_rng([self.seed, k])
            scene = self.sample_scene(rng)
            yield self.render(scene, rng), scene

    def codec_batch(self, index: int, count: int) -> Iterator[Image.Image]:
        """Pictures for the VAE, which is a generic codec (SD's saw every kind of picture, not only
        captioned ones): pretraining pictures, and every other one with its object repainted in
        random colours with any surface style (plain, striped, dotted, bands, ring, half). Without
        them the VAE learns the named palette only and cannot reconstruct a held-out instance's
        look (measured: 2 % of instance colours read back). No caption or instance name is
        involved, and no random look is an instance's own."""
        styles = PATTERNS + ("bands", "ring", "half")
        for k in range(index, index + count):
            rng = np.random.default_rng([self.seed, k, 1])
            scene = self.sample_scene(rng, held_out=bool(rng.random() < 1 / 7))
            look = None
            if k % 2:
                body, accent = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
                look = Instance("random", scene.cls, body, accent, styles[rng.integers(len(styles))])
            yield self.render(scene, rng, look=look)

    # -- drawing ------------------------------------------------------------------------------
    def render(self, scene: Scene, rng: np.random.Generator | None = None, *,
               look: Instance | None = None) -> Image.Image:
        """The picture of ``scene``; ``rng`` adds small jitter (placement, shading), None draws the
        canonical picture; ``look`` repaints the object (the VAE's random looks)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        s = self.size * self.supersample
        sky, ground, horizon, _ = SCENES[scene.scene]
        image = Image.new("RGB", (s, s), sky)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, int(horizon * s), s, s), fill=ground)
        self._scene_details(draw, scene.scene, s, rng)

        scale = (0.42 if scene.size == "big" else 0.27) * s * float(rng.uniform(0.93, 1.07))
        centre_x = {"left": 0.3, "middle": 0.5, "right": 0.7}[scene.position] * s
        centre_x += float(rng.uniform(-0.03, 0.03)) * s
        if scene.addon == "ball":  # the red ball stands beside the object, on the other side
            centre_x = (0.36 if scene.position != "right" else 0.64) * s
            scale = min(scale, 0.34 * s)
        base_y = (horizon + (1 - horizon) * 0.55) * s + float(rng.uniform(-0.02, 0.02)) * s
        box = (centre_x - scale / 2, base_y - scale, centre_x + scale / 2, base_y)
        if look is not None or scene.instance is not None:
            inst = look or self.instance(scene.instance)
            self._object(image, scene.cls, box, inst.body, inst.pattern, inst.accent)
        else:
            self._object(image, scene.cls, box, COLOURS[scene.colour], scene.pattern, None)
        if scene.addon == "hat":
            self._hat(draw, scene.cls, box)
        elif scene.addon == "ball":
            other_x = s - centre_x
            r = 0.11 * s
            draw.ellipse((other_x - r, base_y - 2 * r, other_x + r, base_y), fill=COLOURS["red"])
        return image.resize((self.size, self.size), Image.BOX)

    @staticmethod
    def _scene_details(draw: ImageDraw.ImageDraw, scene: str, s: int, rng) -> None:
        if scene == "night":  # stars and a moon
            for _ in range(14):
                x, y = rng.uniform(0, s), rng.uniform(0, 0.55 * s)
                draw.ellipse((x - s * 0.006, y - s * 0.006, x + s * 0.006, y + s * 0.006), fill=(250, 250, 210))
            draw.ellipse((0.78 * s, 0.06 * s, 0.9 * s, 0.18 * s), fill=(245, 240, 200))
        elif scene == "beach":  # the sea between sky and sand
            draw.rectangle((0, 0.48 * s, s, 0.6 * s), fill=(40, 120, 190))
        elif scene == "grass":  # a sun
            draw.ellipse((0.08 * s, 0.06 * s, 0.2 * s, 0.18 * s), fill=(255, 235, 120))
        elif scene == "table":  # the table's edge
            draw.rectangle((0, 0.55 * s, s, 0.58 * s), fill=(110, 70, 40))

    def _object(self, image: Image.Image, cls: str, box, body, pattern: str, accent) -> None:
        """The class's silhouette filled with its body colour and pattern."""
        s = image.size[0]
        mask = Image.new("L", image.size, 0)
        shape = ImageDraw.Draw(mask)
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        if cls == "ball":
            shape.ellipse(box, fill=255)
        elif cls == "box":
            shape.rectangle((x0 + 0.05 * w, y0 + 0.1 * h, x1 - 0.05 * w, y1), fill=255)
        elif cls == "star":
            cx, cy, r_out = (x0 + x1) / 2, (y0 + y1) / 2 + 0.04 * h, 0.52 * w
            points = []
            for k in range(10):
                r = r_out if k % 2 == 0 else r_out * 0.45
                angle = -np.pi / 2 + k * np.pi / 5
                points.append((cx + r * np.cos(angle), cy + r * np.sin(angle)))
            shape.polygon(points, fill=255)
        elif cls == "cup":
            shape.polygon([(x0 + 0.1 * w, y0 + 0.15 * h), (x1 - 0.25 * w, y0 + 0.15 * h),
                           (x1 - 0.32 * w, y1), (x0 + 0.17 * w, y1)], fill=255)
            shape.ellipse((x1 - 0.38 * w, y0 + 0.35 * h, x1 - 0.02 * w, y0 + 0.75 * h), fill=255)
            shape.ellipse((x1 - 0.28 * w, y0 + 0.45 * h, x1 - 0.12 * w, y0 + 0.65 * h), fill=0)
        elif cls == "tree":
            shape.polygon([((x0 + x1) / 2, y0), (x1, y1 - 0.25 * h), (x0, y1 - 0.25 * h)], fill=255)
            shape.rectangle(((x0 + x1) / 2 - 0.09 * w, y1 - 0.26 * h, (x0 + x1) / 2 + 0.09 * w, y1), fill=255)
        fill = Image.new("RGB", image.size, body)
        paint = ImageDraw.Draw(fill)
        stripe = max(2, int(0.06 * s))
        if pattern == "striped":
            for y in range(int(y0), int(y1), 2 * stripe):
                paint.rectangle((0, y, s, y + stripe // 2), fill=(255, 255, 255))
        elif pattern == "dotted":
            step = 2 * stripe
            for yy in range(int(y0) + stripe // 2, int(y1), step):
                for xx in range(int(x0) + stripe // 2, int(x1), step):
                    paint.ellipse((xx, yy, xx + stripe * 0.8, yy + stripe * 0.8), fill=(255, 255, 255))
        elif pattern == "bands":
            for y in range(int(y0), int(y1), 2 * stripe):
                paint.rectangle((0, y + stripe, s, y + 2 * stripe), fill=accent)
        elif pattern == "ring":
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            r = 0.3 * min(w, h)
            paint.ellipse((cx - r, cy - r, cx + r, cy + r), fill=accent)
            paint.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=body)
        elif pattern == "half":
            paint.rectangle(((x0 + x1) / 2, 0, s, s), fill=accent)
        image.paste(fill, (0, 0), mask)

    @staticmethod
    def _hat(draw: ImageDraw.ImageDraw, cls: str, box) -> None:
        x0, y0, x1, y1 = box
        w = x1 - x0
        top = y0 + (0.1 * (y1 - y0) if cls in ("box", "cup") else 0.0)
        cx = (x0 + x1) / 2
        draw.rectangle((cx - 0.36 * w, top - 0.05 * w, cx + 0.36 * w, top + 0.02 * w), fill=(25, 25, 25))
        draw.rectangle((cx - 0.2 * w, top - 0.33 * w, cx + 0.2 * w, top - 0.04 * w), fill=(25, 25, 25))
        draw.rectangle((cx - 0.2 * w, top - 0.1 * w, cx + 0.2 * w, top - 0.06 * w), fill=(200, 30, 30))


def composition_prompts(cls: str) -> list[tuple[str, dict]]:
    """Paper-style composition prompts for an instance of ``cls`` ({} = "<token> cls" phrase):
    another scene, an add-on, a second object; each with what a checker should find."""
    return [
        ("a photo of a {} on the beach", {"scene": "beach"}),
        ("a photo of a {} in the snow", {"scene": "snow"}),
        ("a photo of a {} at night", {"scene": "night"}),
        ("a photo of a {} on the grass wearing a hat", {"scene": "grass", "addon": "hat"}),
        ("a photo of a {} on a table next to a red ball", {"scene": "table", "addon": "ball"}),
    ]


def sample_grid(columns: int = 8, rows: int = 3, seed: int = 0, scale: int = 2) -> Image.Image:
    """Pretraining pictures (top rows) and the instances in their plain scene (last row): what
    the world looks like, for the documentation."""
    world = World(seed=seed)
    tiles = [image for image, _ in world.pretraining_batch(0, columns * (rows - 1))]
    rng = np.random.default_rng(seed)
    tiles += [world.render(world.instance_scene(inst.name, rng), rng) for inst in INSTANCES][:columns]
    size = world.size * scale
    grid = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
    for k, tile in enumerate(tiles):
        grid.paste(tile.resize((size, size), Image.NEAREST), ((k % columns) * size, (k // columns) * size))
    return grid
