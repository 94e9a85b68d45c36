"""The shipped workflows in a real ComfyUI with AnimateDiff-Evolved and VideoHelperSuite: every
node and widget matches the host's /object_info, and each workflow runs (small sizes, few steps)
on a random SD1.5-architecture checkpoint; the video one with a random motion module."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from comfy_server import (
    ANIMATEDIFF_EVOLVED, VIDEOHELPERSUITE, ComfyServer, error_message, make_checkpoint, make_motion_module,
    unavailable_reason,
)
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
    "ADE_LoadAnimateDiffModel": {"model_name": "mm_test.safetensors"},
}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("comfy_workflows")
    checkpoints = base_dir / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    make_checkpoint(checkpoints / "v1-5-pruned-emaonly.safetensors", full=True)
    if not VIDEO_PACKS_MISSING:
        (base_dir / "models" / "animatediff_models").mkdir(parents=True)
        make_motion_module(base_dir / "models" / "animatediff_models" / "mm_test.safetensors")
    (base_dir / "input").mkdir()
    rng = np.random.default_rng(0)
    for name in ("concept_01", "concept_02", "concept_03", "dog_01", "dog_02", "cat_01", "cat_02"):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(base_dir / "input" / f"{name}.png")
    server = ComfyServer(base_dir, extra_packs=(ANIMATEDIFF_EVOLVED, VIDEOHELPERSUITE))
    server.start()
    yield server, server.get("/object_info")
    server.stop()


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


def _run(server, info, name):
    entry = server.run(ui_to_api(WORKFLOWS[name], info, SMALL), timeout=900)
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
