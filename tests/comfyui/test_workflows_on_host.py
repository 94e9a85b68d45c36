"""The shipped workflows in a real ComfyUI with AnimateDiff-Evolved and VideoHelperSuite: every
node and widget matches the host's /object_info, and each workflow runs (small sizes, few steps)
on a random SD1.5-architecture checkpoint (the SDXL ones on a small SDXL-family checkpoint); the video
one with a random motion module."""

from __future__ import annotations

import pytest
from PIL import Image

from comfy_server import ANIMATEDIFF_EVOLVED, MOTION_MODULE, VIDEOHELPERSUITE, error_message, unavailable_reason
from node_specs import pack_object_info
from workflow_tools import check_workflow, load_workflows, ui_to_api

_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")
VIDEO_PACKS_MISSING = (None if ANIMATEDIFF_EVOLVED and VIDEOHELPERSUITE else
                       "AnimateDiff-Evolved / VideoHelperSuite not found: set ANIMATEDIFF_EVOLVED_PATH and "
                       "VIDEOHELPERSUITE_PATH (or put them beside this repository)")
WORKFLOWS = load_workflows()
SMALL = {
    "ClassDiffusionTrainConcept": {"steps": 2, "resolution": 64},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "ADE_LoadAnimateDiffModel": {"model_name": MOTION_MODULE},
    "ClassDiffusionPickStep": {"steps": 2, "size": 64, "images_per_prompt": 1},
}


@pytest.fixture(scope="module")
def host(shared_server):
    """The session's ComfyUI (tests/comfyui/conftest.py), shared with the integration tests."""
    return shared_server, shared_server.get("/object_info")


def test_pack_schemas_seen_without_comfyui_match_the_host(host):
    _, info = host
    for node_id, spec in pack_object_info().items():
        live = info[node_id]
        for group in ("required", "optional"):
            assert list(spec["input"][group]) == list(live["input"].get(group, {})), (node_id, group)
            for name, (kind, options) in spec["input"][group].items():
                live_spec = live["input"][group][name]
                live_kind = "COMBO" if isinstance(live_spec[0], list) else live_spec[0]
                assert live_kind == kind, (node_id, name)
                if "default" in options:
                    assert live_spec[1].get("default") == options["default"], (node_id, name)
        assert live["output"] == spec["output"]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_node_and_widget_matches_the_host(host, name):
    _, info = host
    if name == "video_animatediff" and VIDEO_PACKS_MISSING:
        pytest.skip(VIDEO_PACKS_MISSING)
    assert check_workflow(WORKFLOWS[name], info) == []


def _run(server, info, name, overrides=None):
    small = {kind: {**SMALL.get(kind, {}), **(overrides or {}).get(kind, {})} for kind in {*SMALL, *(overrides or {})}}
    entry = server.run(ui_to_api(WORKFLOWS[name], info, small), timeout=900)
    assert entry["status"]["status_str"] == "success", error_message(entry)
    return entry


def test_train_use_and_multi_concept_workflows_run(host):
    server, info = host
    entry = _run(server, info, "train_concept")
    assert (server.base_dir / "models" / "classdiffusion" / "my_dog.safetensors").exists()
    assert any("images" in out for out in entry["outputs"].values())
    entry = _run(server, info, "use_concept")
    assert any("images" in out for out in entry["outputs"].values())
    _run(server, info, "multi_concept")
    from classdiffusion.concept import load_concept

    assert load_concept(server.base_dir / "models" / "classdiffusion" / "duo.safetensors").tokens == ["<my-dog>", "<my-cat>"]


def test_pick_workflow_picks_a_step_of_the_train_workflows_run(host):
    """train_concept (a step file every step here) leaves my_dog's step files; pick_concept_step
    scores them with the host's CLIP Vision loader and samples with the chosen one."""
    server, info = host
    _run(server, info, "train_concept", {"ClassDiffusionTrainConcept": {"save_every": 1}})
    folder = server.base_dir / "models" / "classdiffusion"
    assert (folder / "my_dog-step00001.safetensors").exists()
    entry = _run(server, info, "pick_concept_step")
    shown = next(out for out in entry["outputs"].values() if "text" in out)
    assert shown["images"] and shown["text"][0].splitlines()[0] in ("chosen: my_dog-step00001.safetensors",
                                                                     "chosen: my_dog.safetensors")
    assert any("images" in out and "text" not in out for out in entry["outputs"].values())  # the sample


def test_infusion_workflow_runs(host):
    server, info = host
    entry = _run(server, info, "train_infusion")
    from classdiffusion.concept import load_concept

    concept = load_concept(server.base_dir / "models" / "classdiffusion" / "my_dog_infusion.safetensors")
    assert concept.method == "infusion" and concept.tokens == [] and concept.class_words == ["dog"]
    assert any("images" in out for out in entry["outputs"].values())


def test_sdxl_workflows_run(host):
    """Train on the small SDXL-family checkpoint (ComfyUI detects it as SDXL), then use the concept."""
    server, info = host
    entry = _run(server, info, "train_concept_sdxl")
    from classdiffusion.concept import load_concept

    concept = load_concept(server.base_dir / "models" / "classdiffusion" / "my_dog_sdxl.safetensors")
    assert concept.family == "sdxl" and concept.token_vectors.shape[1] == 2048
    assert any("images" in out for out in entry["outputs"].values())
    entry = _run(server, info, "use_concept_sdxl")
    assert any("images" in out for out in entry["outputs"].values())


def test_video_workflow_writes_an_animation_with_every_frame(host):
    if VIDEO_PACKS_MISSING:
        pytest.skip(VIDEO_PACKS_MISSING)
    server, info = host
    if not (server.base_dir / "models" / "classdiffusion" / "my_dog.safetensors").exists():
        _run(server, info, "train_concept")
    entry = _run(server, info, "video_animatediff")
    frames_wanted = next(n for n in WORKFLOWS["video_animatediff"]["nodes"]
                         if n["type"] == "EmptyLatentImage")["widgets_values"][2]
    outputs = [item for out in entry["outputs"].values() for item in out.get("gifs", []) + out.get("images", [])]
    animations = [server.base_dir / "output" / o["subfolder"] / o["filename"] for o in outputs
                  if o["filename"].endswith((".gif", ".webp"))]
    assert len(animations) == 2
    for path in animations:
        with Image.open(path) as animation:
            assert animation.n_frames == frames_wanted == 16, path
