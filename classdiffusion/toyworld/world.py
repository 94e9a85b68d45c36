"""The toy world (v2): objects of a few classes with real class words, each with a look (one colour
with a pattern, or two halves of two colours), a size and a position, in one of a few scenes,
optionally wearing a hat or standing next to a red ball; every picture comes with a caption as
people write them — a prefix from a handful of forms, and only some of the attributes named.

Everything is deterministic from a seed. What pretraining never sees is decided here too:

- **held-out combinations**: some (class, colour, scene) triples — prompts for them test whether a
  base composes what it learned separately;
- **instances**: ten (class, colour pair) looks of two halves — the concepts to personalize, e.g.
  "a photo of a <sks> star". Pretraining shows two-half objects of every other colour pair, in
  every scene and with every add-on, captioned by class only ("a photo of a star on the grass"):
  the base learns that an unnamed star may look many ways and can draw such looks anywhere, but
  never sees an instance's own look.

Pictures are drawn at 4× the target size and reduced with a box filter, so edges are smooth.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
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
    """A held-out look: a class drawn in two halves of two palette colours (``first`` on the left).
    Its identity is the unordered pair on its class — a mirrored picture shows the same instance."""

    name: str
    cls: str
    first: str  # a COLOURS name
    second: str

    @property
    def pair(self) -> frozenset:
        return frozenset((self.first, self.second))


def _instance(cls: str, first: str, second: str) -> Instance:
    return Instance(f"{first}_{second}_{cls}", cls, first, second)


#: The held-out instances, two per class (the first six are v1's). Two halves of palette colours:
#: a look the ×8 toy VAE can keep (finer looks — bands, rings — it blurs: docs/toyworld.md).
INSTANCES = (
    _instance("star", "red", "blue"),
    _instance("ball", "yellow", "purple"),
    _instance("box", "pink", "blue"),
    _instance("cup", "orange", "purple"),
    _instance("tree", "blue", "yellow"),
    _instance("star", "purple", "orange"),
    _instance("ball", "blue", "orange"),
    _instance("box", "red", "yellow"),
    _instance("cup", "yellow", "pink"),
    _instance("tree", "red", "purple"),
)


def held_out_look(cls: str, first: str, second: str) -> bool:
    """Whether a two-half look (in either order) is an instance's own: pretraining never draws it."""
    pair = frozenset((first, second))
    return any(inst.cls == cls and inst.pair == pair for inst in INSTANCES)


#: Caption prefixes, the subject in the {}: the world's own forms and every template of the methods
#: in the registry (Textual Inversion's ``imagenet_templates_small``, Infusion's dataset templates),
#: so no method prompts a form the base never read. "a photo of a {}" is half of all captions.
PREFIXES = (
    "a photo of a {}", "a rendering of a {}", "a picture of a {}", "a close-up photo of a {}", "an image of a {}",
    "a photo of the {}", "a good photo of a {}",
)


def _method_templates() -> tuple[str, ...]:
    """Every registered method's prompt templates, the last registered first (the order the
    committed base was captioned with)."""
    from ..methods import METHOD_CLASSES

    return tuple(t for cls in reversed(list(METHOD_CLASSES.values())) for t in cls.prompt_templates)


CAPTION_FORMS = tuple(dict.fromkeys(PREFIXES + _method_templates()))
#: How often pretraining captions leave an attribute out (each independently).
DROP = {"colour": 0.35, "pattern": 0.35, "size": 0.4, "scene": 0.3, "addon": 0.3}
#: The share of ordinary objects drawn in two halves (captioned by class only).
TWO_COLOUR_SHARE = 0.3


@dataclass(frozen=True)
class Scene:
    """Everything a picture shows; the renderer draws exactly this, the checker reads it back.
    ``named`` lists the attributes the caption names and ``form`` its prefix (pretraining captions
    name only some); the defaults name everything in the plain form."""

    cls: str
    colour: str  # a COLOURS name (a two-half look's left half), or an instance's name
    pattern: str  # PATTERNS, or "half" for two halves
    size: str
    position: str
    scene: str
    addon: str = "none"
    instance: str | None = None
    second: str | None = None  # a two-half look's right half
    named: tuple = ("colour", "pattern", "size", "scene", "addon")
    form: str = "a photo of a {}"

    def caption(self, token: str | None = None, *, name_halves: bool = False) -> str:
        """The caption written from the attributes it names; with ``token``, the instance's
        personalization phrase ("a photo of a <sks> star on the beach"). Two-half looks have no
        name (their captions say the class only) unless ``name_halves``: then, when the colour is
        named, both halves' colours are, left first ("a photo of a red blue star")."""
        if self.instance is not None:
            subject = f"{token} {self.cls}" if token else self.cls
        else:
            words = [self.size] if self.size != "big" and "size" in self.named else []
            if self.pattern != "half":
                words += [self.pattern] if self.pattern != "plain" and "pattern" in self.named else []
                words += [self.colour] if "colour" in self.named else []
            elif name_halves and "colour" in self.named:
                words += [self.colour, self.second]
            subject = " ".join(words + [self.cls])
        text = self.form.format(subject).strip().lower()
        if "scene" in self.named:
            text += " " + SCENES[self.scene][3]
        if "addon" in self.named:
            text += ADDON_WORDS[self.addon]
        return text


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
                     addon_share: float = 0.3, two_colour_share: float = 0.0) -> Scene:
        """A random ordinary scene, fully named: from pretraining's combinations, or (``held_out``)
        from the held-out ones only; ``two_colour_share`` of them in two halves of two colours
        (never an instance's pair on its class)."""
        while True:
            cls, colour, scene = (CLASSES[rng.integers(len(CLASSES))], list(COLOURS)[rng.integers(len(COLOURS))],
                                  list(SCENES)[rng.integers(len(SCENES))])
            if held_out_combination(cls, colour, scene) == held_out:
                break
        addon = "none" if rng.random() >= addon_share else ADDONS[1 + rng.integers(2)]
        if addon == "ball" and cls == "ball":
            addon = "hat"
        pattern, second = PATTERNS[rng.integers(len(PATTERNS))], None
        if rng.random() < two_colour_share:
            others = [c for c in COLOURS if c != colour and not held_out_look(cls, colour, c)]
            pattern, second = "half", others[rng.integers(len(others))]
        return Scene(cls, colour, pattern, SIZES[rng.integers(len(SIZES))],
                     POSITIONS[rng.integers(len(POSITIONS))], scene, addon, second=second)

    def captioned_scene(self, rng: np.random.Generator) -> Scene:
        """A pretraining example: an ordinary scene (a share in two halves) whose caption names
        each attribute with the probabilities of ``DROP`` and takes a random form (half of them
        "a photo of a {}"); forms that name a size ("the small {}", "the large {}") draw it."""
        scene = self.sample_scene(rng, two_colour_share=TWO_COLOUR_SHARE)
        form = "a photo of a {}" if rng.random() < 0.5 else CAPTION_FORMS[rng.integers(len(CAPTION_FORMS))]
        named = tuple(name for name in DROP if rng.random() >= DROP[name])
        if " small {}" in form or " large {}" in form:
            scene = replace(scene, size="small" if " small {}" in form else "big")
            named = tuple(name for name in named if name != "size")
        return replace(scene, named=named, form=form)

    def instance_scene(self, name: str, rng: np.random.Generator, scene: str = "table",
                       addon: str = "none") -> Scene:
        inst = self.instance(name)
        position = "middle" if addon == "ball" else POSITIONS[rng.integers(len(POSITIONS))]
        return Scene(inst.cls, name, "half", "big", position, scene, addon, instance=name)

    def pretraining_batch(self, index: int, count: int) -> Iterator[tuple[Image.Image, Scene]]:
        """Pretraining example ``index``..``index+count``: each drawn from its own seed, so any
        example can be regenerated alone."""
        for k in range(index, index + count):
            rng = np.random.default_rng([self.seed, k])
            scene = self.captioned_scene(rng)
            yield self.render(scene, rng), scene

    def codec_batch(self, index: int, count: int) -> Iterator[Image.Image]:
        """Pictures for the VAE, which is a generic codec (SD's saw every kind of picture, not only
        captioned ones): pretraining pictures, and every other one with its object repainted in
        random colours with any surface style (plain, striped, dotted, bands, ring, half). Without
        them the VAE learns the named palette only. No caption or instance name is involved, and
        no look is an instance's own."""
        styles = PATTERNS + ("bands", "ring", "half")
        for k in range(index, index + count):
            rng = np.random.default_rng([self.seed, k, 1])
            scene = self.sample_scene(rng, held_out=bool(rng.random() < 1 / 7), two_colour_share=TWO_COLOUR_SHARE)
            look = None
            if k % 2:
                body, accent = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
                look = (body, accent, styles[rng.integers(len(styles))])
            yield self.render(scene, rng, look=look)

    # -- drawing ------------------------------------------------------------------------------
    def render(self, scene: Scene, rng: np.random.Generator | None = None, *,
               look: tuple | None = None, part: str | None = None) -> Image.Image:
        """The picture of ``scene``; ``rng`` adds small jitter (placement, shading), None draws the
        canonical picture; ``look`` = (body, accent, style) repaints the object (the VAE's random
        looks); ``part`` draws a broken object instead (:data:`BROKEN`: what the checker must
        refuse to call a class)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        s = self.size * self.supersample
        sky, ground, horizon, _ = SCENES[scene.scene]
        image = Image.new("RGB", (s, s), sky)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, int(horizon * s), s, s), fill=ground)
        self._scene_details(draw, scene.scene, s, rng)

        scale = (0.52 if scene.size == "big" else 0.32) * s * float(rng.uniform(0.93, 1.07))
        centre_x = {"left": 0.3, "middle": 0.5, "right": 0.7}[scene.position] * s
        centre_x += float(rng.uniform(-0.03, 0.03)) * s
        if scene.addon == "ball":  # the red ball stands beside the object, on the other side
            centre_x = (0.36 if scene.position != "right" else 0.64) * s
            scale = min(scale, 0.34 * s)
        base_y = (horizon + (1 - horizon) * 0.55) * s + float(rng.uniform(-0.02, 0.02)) * s
        box = (centre_x - scale / 2, base_y - scale, centre_x + scale / 2, base_y)
        if look is not None:
            self._object(image, scene.cls, box, look[0], look[2], look[1], part=part, rng=rng)
        elif scene.instance is not None:
            inst = self.instance(scene.instance)
            self._object(image, scene.cls, box, COLOURS[inst.first], "half", COLOURS[inst.second], part=part, rng=rng)
        else:
            accent = COLOURS[scene.second] if scene.second else None
            self._object(image, scene.cls, box, COLOURS[scene.colour], scene.pattern, accent, part=part, rng=rng)
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

    def _object(self, image: Image.Image, cls: str, box, body, pattern: str, accent, *,
                part: str | None = None, rng=None) -> None:
        """The class's silhouette filled with its body colour and pattern; ``part`` breaks it."""
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
        if part is not None:
            mask = _broken(mask, part, box, rng if rng is not None else np.random.default_rng(0))
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


#: Ways a drawn object can fail to be an object of its class: the checker's reject examples. A
#: box keeps its rectangles whole (a part of a rectangle is a rectangle: it would still read "box").
BROKEN = ("blob", "top", "bottom", "side", "holes", "smear")
BROKEN_BOX = ("blob", "holes")


def _broken(mask: Image.Image, part: str, box, rng: np.random.Generator) -> Image.Image:
    """``mask`` (the class's silhouette) broken: a shapeless blob in its place, only a part of it,
    holes punched through it, or smeared out of shape."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    out = Image.new("L", mask.size, 0)
    draw = ImageDraw.Draw(out)
    if part == "blob":  # a lumpy ellipse cluster, no class's outline
        for _ in range(int(rng.integers(2, 5))):
            cx, cy = x0 + w * rng.uniform(0.25, 0.75), y0 + h * rng.uniform(0.3, 0.8)
            rx, ry = w * rng.uniform(0.15, 0.35), h * rng.uniform(0.12, 0.3)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
        return out
    if part == "smear":  # the silhouette squashed to a flat lump
        squashed = mask.crop((int(x0), int(y0), int(x1), int(y1))).resize(
            (max(1, int(w * 1.3)), max(1, int(h * rng.uniform(0.25, 0.4)))), Image.BILINEAR)
        out.paste(squashed, (int(x0 - 0.15 * w), int(y1 - squashed.height)))
        return out
    keep = Image.new("L", mask.size, 0)
    draw = ImageDraw.Draw(keep)
    if part == "top":
        draw.rectangle((x0, y0, x1, y0 + h * rng.uniform(0.3, 0.5)), fill=255)
    elif part == "bottom":
        draw.rectangle((x0, y1 - h * rng.uniform(0.3, 0.5), x1, y1), fill=255)
    elif part == "side":
        cut = x0 + w * rng.uniform(0.3, 0.45)
        draw.rectangle((x0, y0, cut, y1) if rng.random() < 0.5 else (x1 - (cut - x0), y0, x1, y1), fill=255)
    else:  # holes
        draw.rectangle(box, fill=255)
        for _ in range(int(rng.integers(4, 8))):
            cx, cy, r = x0 + w * rng.uniform(0, 1), y0 + h * rng.uniform(0, 1), w * rng.uniform(0.1, 0.2)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    return Image.fromarray(np.minimum(np.asarray(mask), np.asarray(keep)))


def composition_prompts(cls: str) -> list[tuple[str, dict]]:
    """Paper-style composition prompts for an instance of ``cls`` ({} = "<token> cls" phrase):
    another scene, an add-on, a second object, and both at once; each with what a checker should
    find (the scene and the add-on; joint composition adds the class and the instance's look)."""
    return [
        ("a photo of a {} on the beach", {"scene": "beach"}),
        ("a photo of a {} in the snow", {"scene": "snow"}),
        ("a photo of a {} at night", {"scene": "night"}),
        ("a photo of a {} on the grass wearing a hat", {"scene": "grass", "addon": "hat"}),
        ("a photo of a {} on a table next to a red ball", {"scene": "table", "addon": "ball"}),
        ("a photo of a {} in the snow wearing a hat", {"scene": "snow", "addon": "hat"}),
    ]


def sample_grid(columns: int = 10, rows: int = 3, seed: int = 0, scale: int = 2) -> Image.Image:
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
