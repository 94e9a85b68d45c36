"""Pick a run's best step: every step file sampled on fixed prompts and seeds, scored for identity
and composition, and a documented rule that chooses — so nobody trains "flying blind".

Both seed papers show personalization's trade-off over training: identity rises with the steps
while composition (putting the concept in another scene, under a hat, …) falls. The picker samples
each step file of a run on

* the **identity prompt** ("a photo of a <sks> dog"): **identity** = CLIP-I (the image encoder's
  mean cosine to the reference pictures), and DINO-I beside it when a DINO model is given;
* a few **composition prompts** (default: the paper's prompt list for the class; editable):
  **composition** = CLIP-T (image–prompt cosine, the token removed) when the encoder has a text
  tower, otherwise the **context agreement** (below); both are reported where both can be computed.

**Context agreement** (for vision-only encoders, such as ComfyUI's CLIP Vision models): the base
model samples each composition prompt with the class word instead of the token, from the same
starting noise; a step's composition picture agrees with the base's when the *surroundings* are the
same — the asked scene, the added object — which is what concept-specific overfitting destroys (the
training pictures' background and pose come back in every scene). The middle of both pictures,
where the subject stands, is painted over with the surroundings' mean colour before encoding (``CONTEXT_MASK``),
so the subject's new look does not count against a step; the score is the mean cosine of the two
masked pictures' embeddings.

**The rule** (``pick``): among the steps whose composition keeps at least ``1 − tolerance`` of the
run's composition range (``composition ≥ max − tolerance × (max − min)``), the one with the highest
identity; ties go to the earlier step. Scale-free (CLIP-T and cosines of different encoders live on
different scales), and it always trades: it never returns a step that has lost more than
``tolerance`` of what the run loses in composition, and within that, the most learned one. The
default ``tolerance = 0.5`` was fixed before the toy-world validation (docs/evaluation.md) and
not tuned on it.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from PIL import Image, ImageStat

from ..errors import InvalidInputError
from .image_metrics import mean_pairwise_cosine, paired_cosine, replace_token

#: The fraction of the picture's width and height, centred, painted over for the context agreement.
CONTEXT_MASK = 0.5
#: Default composition tolerance of the rule (a fraction of the run's composition range).
TOLERANCE = 0.5
#: Composition prompt templates when none are given: the DreamBooth/ClassDiffusion list's scenes and
#: add-ons that mean something for any class ({0} the token, {1} the class word).
DEFAULT_COMPOSITION = (
    "a {0} {1} on the beach", "a {0} {1} in the snow", "a {0} {1} in the jungle",
    "a {0} {1} on a cobblestone street", "a {0} {1} wearing a red hat",
    "a {0} {1} with a city in the background",
)
IDENTITY_PROMPT = "a photo of a {0} {1}"


def default_prompts(token: str, class_word: str) -> list[str]:
    """The default composition prompts for a concept ("a <sks> dog on the beach", …)."""
    return [template.format(token, class_word) for template in DEFAULT_COMPOSITION]


class ImageEncoder(Protocol):
    """What the picker needs of an encoder: image embeddings, and text embeddings when it has a text tower."""

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


#: ``sample(concept_file or None, prompts, seeds) → pictures[prompt][seed]``; None = the base model.
Sampler = Callable[[Path | None, Sequence[str], Sequence[int]], list[list[Image.Image]]]


@dataclass
class StepScore:
    """One step file's scores (cosines; higher is better)."""

    step: int
    file: str
    identity: float  # CLIP-I of the identity prompt's pictures to the references (the encoder given)
    composition: float  # the measure the rule uses: clip_t with a text tower, else context
    clip_t: float | None = None
    context: float | None = None
    dino_i: float | None = None


@dataclass
class Pick:
    """The picker's result: every step's scores, the chosen step and why."""

    chosen_step: int
    chosen_file: str
    reason: str
    composition_measure: str
    tolerance: float
    steps: list[StepScore] = field(default_factory=list)
    prompts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "steps"},
                "steps": [asdict(s) for s in self.steps]}


def mask_middle(image: Image.Image, fraction: float = CONTEXT_MASK) -> Image.Image:
    """The picture with its centred ``fraction`` × ``fraction`` box painted in the mean colour of
    the rest of the picture (the surroundings): nothing of the subject's colours is left in it."""
    image = image.convert("RGB")
    if fraction <= 0:
        return image
    width, height = image.size
    box = (round(width * (1 - fraction) / 2), round(height * (1 - fraction) / 2),
           round(width * (1 + fraction) / 2), round(height * (1 + fraction) / 2))
    inside = Image.new("L", image.size, 0)
    inside.paste(255, box)
    outside = inside.point(lambda v: 255 - v)
    mean = tuple(round(c) for c in ImageStat.Stat(image, mask=outside).mean)
    masked = image.copy()
    masked.paste(mean, box)
    return masked


def context_agreement(encoder: ImageEncoder, pictures: Sequence[Image.Image], base_pictures: Sequence[Image.Image],
                      fraction: float = CONTEXT_MASK) -> float:
    """Mean cosine of each picture and the base's picture of the same prompt and seed, middles masked."""
    if len(pictures) != len(base_pictures) or not pictures:
        raise InvalidInputError("The context agreement needs one base picture per picture.")
    base = encoder.image_features([mask_middle(p, fraction) for p in base_pictures])
    return _context_agreement(encoder, pictures, base, fraction)


def _context_agreement(encoder: ImageEncoder, pictures: Sequence[Image.Image], base_features: torch.Tensor,
                       fraction: float = CONTEXT_MASK) -> float:
    tuned = encoder.image_features([mask_middle(p, fraction) for p in pictures])
    return float(paired_cosine(tuned, base_features).mean())


def _check_tolerance(tolerance: float) -> None:
    if not 0 <= tolerance <= 1:
        raise InvalidInputError(f"The tolerance is a fraction of the composition range, 0 to 1 (got {tolerance}).")


def pick(scores: Sequence[StepScore], tolerance: float = TOLERANCE) -> tuple[int, str]:
    """The index of the chosen step and the reason, by the module's rule."""
    if not scores:
        raise InvalidInputError("No step was scored: the run has no step files.")
    _check_tolerance(tolerance)
    best, worst = max(s.composition for s in scores), min(s.composition for s in scores)
    floor = best - tolerance * (best - worst)
    eligible = [i for i, s in enumerate(scores) if s.composition >= floor - 1e-12]
    chosen = max(eligible, key=lambda i: (scores[i].identity, -scores[i].step))
    s = scores[chosen]
    reason = (f"step {s.step}: the highest identity ({s.identity:.4f}) among the {len(eligible)} of {len(scores)} "
              f"steps whose composition keeps ≥ {1 - tolerance:.0%} of the run's range "
              f"(composition {s.composition:.4f} ≥ {floor:.4f}; best {best:.4f}, worst {worst:.4f})")
    return chosen, reason


def score_steps(
    files: Sequence[tuple[int, Path]],
    sample: Sampler,
    encoder: ImageEncoder,
    references: Sequence[Image.Image],
    *,
    token: str,
    class_word: str,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    dino: ImageEncoder | None = None,
    keep: dict | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[StepScore]:
    """Sample and score every ``(step, file)`` on the identity prompt and the composition ``prompts``
    (with the token written in; default ``default_prompts``). ``keep`` receives each step's pictures
    (``keep[step] = rows``) and the base's (``keep["base"]``); ``on_step(done, total)`` is called
    after each file (progress, cancel)."""
    if not files:
        raise InvalidInputError("The run has no step files: train with save_every (--save-every N) to pick a step.")
    if not references:
        raise InvalidInputError("The picker needs reference pictures of the concept (its training images).")
    prompts = [IDENTITY_PROMPT.format(token, class_word)] + list(prompts or default_prompts(token, class_word))
    prompts = [" ".join(p.split()) for p in prompts]
    if any(token not in p for p in prompts):
        raise InvalidInputError(f"Every composition prompt must contain the token {token} (got {prompts[1:]}).")
    without_token = [replace_token(p, [token]) for p in prompts[1:]]
    has_text = callable(getattr(encoder, "text_features", None))
    reference_features = encoder.image_features(list(references))
    dino_references = dino.image_features(list(references)) if dino is not None else None
    base_rows = sample(None, without_token, seeds)
    base_flat = [p for row in base_rows for p in row]
    base_context = encoder.image_features([mask_middle(p) for p in base_flat])  # once for every step
    if keep is not None:
        keep["base"] = base_rows
        keep["prompts"] = prompts
    text_features = encoder.text_features([p for p in without_token for _ in seeds]) if has_text else None
    scores = []
    for done, (step, path) in enumerate(files, start=1):
        rows = sample(Path(path), prompts, seeds)
        own, composed = rows[0], [p for row in rows[1:] for p in row]
        identity = mean_pairwise_cosine(encoder.image_features(own), reference_features)
        context = _context_agreement(encoder, composed, base_context)
        clip_t = float(paired_cosine(encoder.image_features(composed), text_features).mean()) if has_text else None
        dino_i = mean_pairwise_cosine(dino.image_features(own), dino_references) if dino is not None else None
        scores.append(StepScore(step=int(step), file=str(path), identity=identity,
                                composition=clip_t if clip_t is not None else context,
                                clip_t=clip_t, context=context, dino_i=dino_i))
        if keep is not None:
            keep[int(step)] = rows
        if on_step is not None:
            on_step(done, len(files))
    return scores


def pick_run(files: Sequence[tuple[int, Path]], sample: Sampler, encoder: ImageEncoder,
             references: Sequence[Image.Image], *, token: str, class_word: str, tolerance: float = TOLERANCE,
             **options) -> Pick:
    """Score every step file and choose (see the module docstring)."""
    _check_tolerance(tolerance)  # before the sampling, not after
    scores = score_steps(files, sample, encoder, references, token=token, class_word=class_word, **options)
    index, reason = pick(scores, tolerance)
    composition = list(options.get("prompts") or default_prompts(token, class_word))
    return Pick(chosen_step=scores[index].step, chosen_file=scores[index].file, reason=reason,
                composition_measure="clip_t" if scores[index].clip_t is not None else "context",
                tolerance=tolerance, steps=scores,
                prompts={"identity": IDENTITY_PROMPT.format(token, class_word),
                         "composition": composition})


def pick_on_base(
    run: str | Path,
    base: str | Path,
    *,
    references: Sequence[str | Path] | None = None,
    clip: str | Path | None = None,
    dino: str | Path | None = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int | None = None,
    guidance: float = 6.0,
    tolerance: float = TOLERANCE,
    base_config: str | Path | None = None,
    device: str | None = None,
    out: str | Path | None = None,
    strict: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> Pick:
    """The picker on a diffusers base: every step file of ``run`` (the final file or any step file;
    the final file counts as its last step) sampled and scored, and the choice. On the toy base the
    toy CLIP and the world's composition prompts are the defaults (``clip="toy"`` asks for it
    anywhere). With ``out``: ``pick.json``, ``plot.png`` and ``grid.png`` (the chosen step's pictures
    above the last step's)."""
    from ..run.data import load_images
    from ..concept.generate import build_pipeline, concept_sampler
    from ..hosts.diffusers_host import default_device
    from .report import _references, default_sampling_steps

    files, last = step_files_of(run)
    token, class_word = last.tokens[0], last.meta.concepts[0]["class_word"]
    toy = _is_toy_base(base)
    if clip is None and not toy:
        raise InvalidInputError("Give --clip PATH: a local CLIP folder (e.g. clip-vit-large-patch14) to score the "
                                "steps with (only the toy base has a default, its own toy CLIP).")
    reference_images = load_images(references, "reference") if references else _references([last], None)
    if not reference_images:
        raise InvalidInputError("The run's training images are gone: give --references DIR (the concept's photos).")
    device = device or default_device()
    encoder, dino_encoder = _scorers(clip, dino, toy, device)
    if prompts is None and toy:
        from ..toyworld.world import composition_prompts

        prompts = [template.format(f"{token} {class_word}") for template, _ in composition_prompts(class_word)]
    pipe = build_pipeline(base, base_config=base_config, device=device)
    sampler = concept_sampler(pipe, steps=steps or default_sampling_steps(pipe.unet), guidance=guidance, strict=strict)
    keep: dict = {}
    result = pick_run(files, sampler, encoder, reference_images, token=token, class_word=class_word,
                      tolerance=tolerance, prompts=prompts, seeds=seeds, dino=dino_encoder, keep=keep, on_step=on_step)
    if out is not None:
        write_pick(result, keep, out)
    return result


def _scorers(clip, dino, toy: bool, device) -> tuple[ImageEncoder, ImageEncoder | None]:
    """(the identity encoder: the toy CLIP on the toy base or when asked by "toy", else a local
    CLIP folder; a DINO encoder or None)."""
    if clip == "toy" or (clip is None and toy):
        from ..toyworld.base import ToyClip

        encoder: ImageEncoder = ToyClip(device=str(device))
    else:
        from .image_metrics import ClipScorer

        encoder = ClipScorer(clip, device)
    if not dino:
        return encoder, None
    from .image_metrics import DinoScorer

    return encoder, DinoScorer(dino, device)


def step_files_of(run: str | Path):
    """``([(step, file), …], last concept)`` of a run given any of its files: the step files and the
    final file as the last step. Refuses what the picker cannot choose among, saying what to do."""
    from ..concept import load_concept, run_files

    final, step_files = run_files(run)
    files = list(step_files)
    last = None
    if final.is_file():
        last = load_concept(final)
        if not files or last.step > files[-1][0]:
            files.append((last.step, final))
    elif files:
        last = load_concept(files[-1][1])
    if last is None:
        raise InvalidInputError(f"No file of the run {final.name} was found beside {final.parent}: give the final "
                                "concept file or one of its -stepNNNNN files.")
    if len(files) < 2:
        raise InvalidInputError(f"The run {final.name} has one file only: nothing to choose from. Train with "
                                "--save-every N (the Train node's save_every) to keep step files.")
    if not last.tokens:
        raise InvalidInputError("The picker scores token concepts (ClassDiffusion, Custom Diffusion, Textual "
                                "Inversion); an Infusion concept has no token to prompt.")
    return files, last


def _is_toy_base(base: str | Path) -> bool:
    from ..toyworld.base import WEIGHTS

    try:
        return Path(base).resolve() == (WEIGHTS / "base").resolve()
    except OSError:
        return False


def _drawable(text: str) -> str:
    """Text PIL's default bitmap font can draw (older Pillow encodes it as Latin-1)."""
    return text.encode("latin-1", "replace").decode("latin-1")


def write_pick(result: Pick, pictures: dict, out: str | Path) -> None:
    """``pick.json``, ``plot.png`` and ``grid.png`` (rows: the chosen step's identity-prompt and first
    composition-prompt pictures, then the last step's), each written whole."""
    import json

    from ..toyworld.evaluate import picture_grid
    from ..concept import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "pick.json", json.dumps(result.to_dict(), indent=2).encode() + b"\n")
    last = result.steps[-1].step
    rows, labels = [], []
    for step, name in ((result.chosen_step, "chosen"), (last, "last")):
        for k in (0, 1):
            rows.append(pictures[step][k])
            labels.append(_drawable(f"{name}: step {step}, {pictures['prompts'][k]}"))
    grid = picture_grid(rows, labels, scale=max(1, 256 // max(rows[0][0].width, 1)))
    for name, image in (("plot.png", plot_pick(result)), ("grid.png", grid)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write(out / name, buffer.getvalue())


def plot_pick(result: Pick, width: int = 720, height: int = 420) -> Image.Image:
    """Identity and composition against the step (each on its own scale), the chosen step marked."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    steps = [s.step for s in result.steps]
    series = {"identity": ([s.identity for s in result.steps], (31, 119, 180)),
              f"composition ({result.composition_measure})": ([s.composition for s in result.steps], (214, 39, 40))}
    left, right, top, bottom = 56, width - 16, 28, height - 36
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)

    def x_of(step: int) -> float:
        return left + (step - s0) / (s1 - s0) * (right - left)

    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    draw.text((left, 8), f"chosen: step {result.chosen_step}  (each curve on its own scale)", fill=(0, 0, 0), font=font)
    for row, (name, (values, color)) in enumerate(series.items()):
        lo, hi = min(values), max(values)
        span = hi - lo if hi - lo > 1e-12 else 1.0
        points = [(x_of(s), bottom - (v - lo) / span * (bottom - top - 10) - 5) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        draw.text((left + 6 + row * 260, bottom + 18), f"{name}: {lo:.3f} to {hi:.3f}", fill=color, font=font)
    x = x_of(result.chosen_step)
    for y in range(top, bottom, 6):
        draw.line([(x, y), (x, min(y + 3, bottom))], fill=(44, 160, 44), width=2)
    for s in steps:
        draw.text((x_of(s) - 8, bottom + 3), str(s), fill=(90, 90, 90), font=font)
    return image


__all__ = ["CONTEXT_MASK", "DEFAULT_COMPOSITION", "IDENTITY_PROMPT", "TOLERANCE", "ImageEncoder", "Pick",
           "StepScore", "context_agreement", "default_prompts", "mask_middle", "pick", "pick_on_base", "pick_run",
           "plot_pick", "score_steps", "step_files_of", "write_pick"]
