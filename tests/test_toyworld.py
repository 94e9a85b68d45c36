"""The toy world: deterministic pictures and captions, what pretraining never sees, and an
independent checker that reads pictures back (its committed weights built by the committed script)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from classdiffusion.toyworld.checker import Checker, accuracy, scene_of
from classdiffusion.toyworld.world import (CLASSES, COLOURS, INSTANCES, PATTERNS, SCENES, World, composition_prompts,
                                           held_out_combination, held_out_triples)

WEIGHTS = Path(__file__).resolve().parents[1] / "classdiffusion" / "toyworld" / "weights"


def test_pictures_and_captions_are_deterministic_from_the_seed():
    first = [(np.asarray(image).tobytes(), scene) for image, scene in World(seed=3).pretraining_batch(10, 6)]
    again = [(np.asarray(image).tobytes(), scene) for image, scene in World(seed=3).pretraining_batch(10, 6)]
    other = [(np.asarray(image).tobytes(), scene) for image, scene in World(seed=4).pretraining_batch(10, 6)]
    assert first == again
    assert first != other
    # Any example regenerates alone: example 12 is the same inside a batch and on its own.
    alone = next(World(seed=3).pretraining_batch(12, 1))
    assert np.asarray(alone[0]).tobytes() == first[2][0] and alone[1] == first[2][1]


def test_captions_are_written_from_the_attributes():
    image, scene = next(World(seed=0).pretraining_batch(0, 1))
    caption = scene.caption()
    assert image.size == (64, 64)
    assert caption.startswith("a photo of a ") and scene.cls in caption and scene.colour in caption
    assert SCENES[scene.scene][3] in caption
    instance = World().instance_scene(INSTANCES[0].name, np.random.default_rng(0), scene="beach", addon="hat")
    assert instance.caption("<sks>") == "a photo of a <sks> star on the beach wearing a hat"


def test_pretraining_never_shows_a_held_out_combination_or_an_instance():
    triples = held_out_triples()
    assert 0 < len(triples) < len(CLASSES) * len(COLOURS) * len(SCENES) / 5
    # Every class, colour and scene is still seen in pretraining, in other combinations.
    every = [(c, k, s) for c in CLASSES for k in COLOURS for s in SCENES]
    for index, values in enumerate((CLASSES, list(COLOURS), list(SCENES))):
        for value in values:
            assert [t for t in every if t[index] == value and not held_out_combination(*t)], value
    scenes = [scene for _, scene in World(seed=0).pretraining_batch(0, 3000)]
    assert not [s for s in scenes if held_out_combination(s.cls, s.colour, s.scene)]
    assert not [s for s in scenes if s.instance is not None]
    captions = {s.caption() for s in scenes}
    assert not any(inst.name in caption for inst in INSTANCES for caption in captions)


def test_every_instance_looks_unlike_any_ordinary_object():
    world = World()
    for inst in INSTANCES:
        assert inst.cls in CLASSES
        # Two colours in a pattern no ordinary object has (ordinary objects: one colour, PATTERNS).
        assert tuple(inst.body) != tuple(inst.accent) and inst.pattern not in PATTERNS
    pictures = [world.render(world.instance_scene(inst.name, np.random.default_rng(0))) for inst in INSTANCES]
    assert len({np.asarray(p).tobytes() for p in pictures}) == len(INSTANCES)


def test_composition_prompts_name_what_the_checker_can_verify():
    for prompt, expected in composition_prompts("star"):
        assert prompt.count("{}") == 1
        assert expected["scene"] in SCENES


def test_scene_rule_reads_every_rendered_scene():
    world = World(seed=5)
    rng = np.random.default_rng(7)
    scenes = [world.sample_scene(rng, held_out=bool(k % 2)) for k in range(300)]
    assert all(scene_of(world.render(s, rng)) == s.scene for s in scenes)


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker.load(WEIGHTS / "checker.safetensors")


def test_checker_weights_are_what_the_committed_script_wrote():
    manifest = json.loads((WEIGHTS / "MANIFEST.json").read_text())["checker"]
    data = (WEIGHTS / manifest["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    assert manifest["command"] == "python tools/pretrain_toyworld.py checker"


def test_checker_reads_fresh_pictures_with_at_least_95_percent_accuracy(checker):
    """Pictures it never saw (another world seed, another sampling seed), every attribute."""
    result = accuracy(checker, World(seed=2024), seed=777, count=400)
    assert min(result.values()) >= 0.95, result


def test_instance_score_tells_the_instance_from_its_class(checker):
    world = World(seed=1)
    rng = np.random.default_rng(3)
    target = INSTANCES[0]
    own = [world.render(world.instance_scene(target.name, rng, scene=s), rng) for s in SCENES]
    ordinary = [world.render(world.sample_scene(rng), rng) for _ in range(10)]
    others = [world.render(world.instance_scene(inst.name, rng), rng) for inst in INSTANCES[1:]]
    assert min(checker.instance_score(own, target.name)) > 0.8
    assert max(checker.instance_score(ordinary + others, target.name)) < 0.2


@pytest.mark.slow  # three stages, a few steps each (~20 s)
def test_pretraining_stages_run_end_to_end_and_the_host_loads_the_base(tmp_path):
    """tools/pretrain_toyworld.py's vae → clip → unet, a few steps each, write a base that the
    trainer's diffusers host loads (the stages' real runs are documented in docs/toyworld.md)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "tools" / "pretrain_toyworld.py"
    for stage, extra in (("vae", []), ("clip", []), ("unet", ["--pool", "128"])):
        done = subprocess.run([sys.executable, str(script), stage, "--steps", "2", "--out", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert set(manifest) == {"vae", "clip", "unet"}
    assert set(manifest["vae"]["settings"]["checker_on_reconstructions"]) >= {"cls", "colour", "scene"}

    from classdiffusion.hosts.diffusers_host import load_host

    host = load_host(tmp_path / "base", device="cpu")
    assert host.text_dim == 768
    assert host.initializer_ids("star") and len(host.word_ids("star")) == 1  # a world word is one token
