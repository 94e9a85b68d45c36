"""The toy world: deterministic pictures and captions, what pretraining never sees, and an
independent checker that reads pictures back (its committed weights built by the committed script)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dataclasses import replace

from classdiffusion.toyworld.checker import Checker, accuracy, rejection, scene_of
from classdiffusion.toyworld.world import (ADDONS, CAPTION_FORMS, CLASSES, COLOURS, INSTANCES, PATTERNS, SCENES, Scene,
                                           World, composition_prompts, held_out_combination, held_out_triples)

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


def test_captions_are_written_from_the_attributes_they_name():
    scene = Scene("star", "pink", "striped", "small", "left", "table", "hat")
    assert scene.caption() == "a photo of a small striped pink star on a table wearing a hat"
    assert replace(scene, named=("colour",)).caption() == "a photo of a pink star"
    assert replace(scene, named=("scene",), form="a close-up photo of a {}").caption() == \
        "a close-up photo of a star on a table"
    assert replace(scene, named=("addon",), form="A {} shown in a photo ").caption() == \
        "a star shown in a photo wearing a hat"
    # Two-half looks have no name: the caption says the class only.
    halves = Scene("cup", "red", "half", "big", "left", "beach", second="blue")
    assert halves.caption() == "a photo of a cup on the beach"
    # Unless the pretraining names them (tools/pretrain_toyworld.py unet --name-halves): both
    # colours, left first, when the caption names a colour at all.
    assert halves.caption(name_halves=True) == "a photo of a red blue cup on the beach"
    assert replace(halves, named=("scene",)).caption(name_halves=True) == "a photo of a cup on the beach"
    instance = World().instance_scene(INSTANCES[0].name, np.random.default_rng(0), scene="beach", addon="hat")
    assert instance.caption("<sks>") == "a photo of a <sks> star on the beach wearing a hat"


def test_pretraining_captions_are_written_as_people_write_them():
    """Attributes are left out at random and the prefixes vary, so the evaluation's prompt forms
    ("a photo of a star", "a photo of a star on the beach", "... wearing a hat") are ordinary."""
    scenes = [scene for _, scene in World(seed=0).pretraining_batch(0, 3000)]
    captions = [s.caption() for s in scenes]
    for attribute in ("colour", "scene", "addon", "size", "pattern"):
        share = np.mean([attribute not in s.named for s in scenes])
        assert 0.2 <= share <= 0.5, (attribute, share)
    for cls in CLASSES:
        assert f"a photo of a {cls}" in captions
        assert f"a photo of a {cls} on the beach" in captions, cls
    assert any(c.startswith("a photo of a ") and c.endswith(" wearing a hat") and len(c.split()) == 8 for c in captions)
    forms = {s.form for s in scenes}
    assert forms == set(CAPTION_FORMS), set(CAPTION_FORMS) - forms
    assert 0.45 <= np.mean([s.form == "a photo of a {}" for s in scenes]) <= 0.6


def test_every_method_prompt_is_made_of_whole_world_words(tmp_path):
    """No template of a registered method, and no prompt of the evaluation, splits a word into
    pieces in the world tokenizer; the committed base's tokenizer is this one."""
    from transformers import CLIPTokenizer

    from classdiffusion.methods.infusion.method import INFUSION_TEMPLATES
    from classdiffusion.methods.textual_inversion.method import TEMPLATES
    from classdiffusion.toyworld.base import build_world_tokenizer, world_words

    tokenizer = CLIPTokenizer.from_pretrained(str(build_world_tokenizer(tmp_path)))
    prompts = [t.format("star") for t in TEMPLATES + INFUSION_TEMPLATES + CAPTION_FORMS]
    prompts += [t.format("star") for t, _ in composition_prompts("star")]
    prompts += [s.caption(name_halves=halves) for _, s in World(seed=1).pretraining_batch(0, 500) for halves in (False, True)]
    vocabulary = {w + "</w>" for w in world_words()}
    for prompt in prompts:
        pieces = tokenizer.tokenize(prompt)
        assert set(pieces) <= vocabulary, (prompt, sorted(set(pieces) - vocabulary))
    committed = CLIPTokenizer.from_pretrained(str(WEIGHTS / "base" / "tokenizer"))
    assert committed.get_vocab() == tokenizer.get_vocab()


def test_tokenizer_build_is_the_same_under_any_hash_seed(tmp_path):
    """The Hugging Face BPE trainer broke ties by hash order (CI rebuilt a tokenizer with two ids
    swapped); ours must give the same merges in processes with different hash seeds."""
    import os
    import subprocess
    import sys

    code = ("import sys; from classdiffusion.toyworld.base import build_world_tokenizer; "
            "print(open(build_world_tokenizer(sys.argv[1]) / 'merges.txt').read())")
    outputs = []
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], env=env,
                             capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0].strip() == (WEIGHTS / "base" / "tokenizer" / "merges.txt").read_text().strip()


def test_pretraining_never_shows_a_held_out_combination_or_an_instance_look():
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
    two = [s for s in scenes if s.pattern == "half"]
    looks = {(i.cls, i.pair) for i in INSTANCES}
    assert not [s for s in two if (s.cls, frozenset((s.colour, s.second))) in looks]
    captions = {s.caption(name_halves=halves) for s in scenes for halves in (False, True)}
    assert not any(inst.name in caption for inst in INSTANCES for caption in captions)
    # Named halves never name an instance's own pair on its class (the look is never drawn).
    named = {s.caption(name_halves=True) for s in two}
    assert not any(f"{i.first} {i.second} {i.cls}" in c or f"{i.second} {i.first} {i.cls}" in c
                   for i in INSTANCES for c in named)


def test_two_colour_looks_are_drawn_anywhere_but_never_named():
    """Pretraining has objects in two halves in every scene and with every add-on, for every class,
    captioned by class only; an instance's exact look is not among them."""
    scenes = [scene for _, scene in World(seed=0).pretraining_batch(0, 3000)]
    two = [s for s in scenes if s.pattern == "half"]
    assert 0.2 <= len(two) / len(scenes) <= 0.4
    for cls in CLASSES:
        mine = [s for s in two if s.cls == cls]
        addons = {s.addon for s in mine}
        assert {s.scene for s in mine} == set(SCENES) and addons == set(ADDONS) - ({"ball"} if cls == "ball" else set())
    for s in two:
        caption = s.caption().replace(" next to a red ball", "")
        assert not any(word in caption.split() for word in list(COLOURS) + list(PATTERNS)), caption


def test_ten_instances_spread_over_the_classes():
    assert len(INSTANCES) >= 10 and len({i.name for i in INSTANCES}) == len(INSTANCES)
    for cls in CLASSES:
        assert len([i for i in INSTANCES if i.cls == cls]) >= 2, cls
    assert len({(i.cls, i.pair) for i in INSTANCES}) == len(INSTANCES)
    world = World()
    pictures = [world.render(world.instance_scene(inst.name, np.random.default_rng(0))) for inst in INSTANCES]
    assert len({np.asarray(p).tobytes() for p in pictures}) == len(INSTANCES)


def test_composition_prompts_name_what_the_checker_can_verify():
    for prompt, expected in composition_prompts("star"):
        assert prompt.count("{}") == 1
        assert expected["scene"] in SCENES


def test_training_pictures_take_their_scenes_in_turn():
    """The recipe search trains on pictures in several scenes; one scene stays the default."""
    from classdiffusion.toyworld.evaluate import instance_pictures

    assert [scene_of(p) for p in instance_pictures("red_blue_star")] == ["table"] * 5
    mixed = instance_pictures("red_blue_star", scene=("table", "beach", "snow"))
    assert [scene_of(p) for p in mixed] == ["table", "beach", "snow", "table", "beach"]


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
    """Every instance in every scene scores high; ordinary objects, two-half objects of other colour
    pairs (of the same class too) and the other instances score low."""
    world = World(seed=1)
    rng = np.random.default_rng(3)
    for target in INSTANCES:
        own = [world.render(world.instance_scene(target.name, rng, scene=s), rng) for s in SCENES]
        ordinary = [world.render(world.sample_scene(rng), rng) for _ in range(6)]
        same_class_two = []
        while len(same_class_two) < 6:
            scene = world.sample_scene(rng, two_colour_share=1.0)
            if scene.cls == target.cls:
                same_class_two.append(world.render(scene, rng))
        others = [world.render(world.instance_scene(inst.name, rng), rng) for inst in INSTANCES if inst != target]
        assert min(checker.instance_score(own, target.name)) > 0.8, target.name
        assert max(checker.instance_score(ordinary + same_class_two + others, target.name)) < 0.2, target.name


def test_checker_says_no_to_blobs_and_broken_objects(checker):
    """The reject class: blobs, parts, holed and squashed objects are read as no class."""
    assert rejection(checker, World(seed=2024), seed=99, count=300) >= 0.9


@pytest.mark.slow  # three stages, a few steps each (~20 s)
def test_pretraining_stages_run_end_to_end_and_the_host_loads_the_base(tmp_path):
    """tools/pretrain_toyworld.py's vae → clip → unet, a few steps each, write a base that the
    trainer's diffusers host loads (the stages' real runs are documented in docs/toyworld.md)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "tools" / "pretrain_toyworld.py"
    for stage, extra in (("vae", []), ("clip", []), ("unet", ["--pool", "128", "--device", "cpu"])):
        done = subprocess.run([sys.executable, str(script), stage, "--steps", "2", "--out", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert set(manifest) == {"vae", "clip", "unet"}
    assert not (tmp_path / "resume").exists() or not list((tmp_path / "resume").iterdir())
    assert set(manifest["vae"]["settings"]["checker_on_reconstructions"]) >= {"cls", "colour", "scene"}

    from classdiffusion.hosts.diffusers_host import load_host

    host = load_host(tmp_path / "base", device="cpu")
    assert host.text_dim == 768
    assert host.initializer_ids("star") and len(host.word_ids("star")) == 1  # a world word is one token


def test_pretraining_refuses_a_gpu_this_machine_does_not_have(tmp_path):
    """--device cuda on a machine without CUDA: one clear line, before anything is built."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    script = Path(__file__).resolve().parents[1] / "tools" / "pretrain_toyworld.py"
    done = subprocess.run([sys.executable, str(script), "unet", "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "sees no CUDA GPU" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_pretraining_stage_continues_where_it_stopped(tmp_path, monkeypatch):
    """tools/pretrain_toyworld.py's stages are resumable: a run stopped after a resume point
    continues from it, and ends where an unbroken run ends (every draw comes from the step)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import pretrain_toyworld as pretrain

    monkeypatch.setattr(pretrain, "OUT", tmp_path)
    monkeypatch.setattr(pretrain, "SAVE_EVERY", 2)

    steps_run = []

    def run(stop_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)

        def loss_at(step):
            steps_run.append(step)
            if step == stop_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
            return model(x).square().mean()

        pretrain.optimize("toy", model.parameters(), 6, 1e-2, loss_at, model=model)
        return model

    unbroken = run()
    assert not (tmp_path / "resume" / "toy.pt").exists()  # removed when a stage ends
    with pytest.raises(KeyboardInterrupt):
        run(stop_at=3)
    assert torch.load(tmp_path / "resume" / "toy.pt", weights_only=True)["step"] == 2
    steps_run.clear()
    resumed = run()
    assert steps_run == [2, 3, 4, 5]  # continued, not restarted
    for a, b in zip(unbroken.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
