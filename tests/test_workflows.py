"""The shipped example workflows: this pack's nodes and their widget values match the nodes'
schemas (no ComfyUI needed). Core, AnimateDiff-Evolved and VideoHelperSuite nodes are checked
against a real host in tests/comfyui/test_workflows_on_host.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_specs import pack_object_info
from workflow_tools import FRONTEND_ONLY, check_workflow, load_workflows, ui_to_api

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = load_workflows()
PACK = pack_object_info()


def test_the_workflows_ship():
    assert set(WORKFLOWS) == {"train_concept", "train_infusion", "use_concept", "multi_concept", "video_animatediff",
                              "train_concept_sdxl", "use_concept_sdxl", "pick_concept_step"}


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_pack_nodes_and_widgets_match_their_schemas(name):
    workflow = WORKFLOWS[name]
    ours = {n["type"] for n in workflow["nodes"] if n["type"].startswith("ClassDiffusion")}
    assert ours, "every workflow uses the pack"
    assert check_workflow(workflow, PACK, types=set(PACK)) == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_workflow_explains_itself_and_credits_its_packs(name):
    workflow = WORKFLOWS[name]
    notes = [n for n in workflow["nodes"] if n["type"] in FRONTEND_ONLY]
    assert notes and len(notes[0]["widgets_values"][0]) > 200
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        cnr = node["properties"]["cnr_id"]
        if node["type"].startswith("ClassDiffusion"):
            assert cnr == "comfyui-classdiffusion"
        elif node["type"].startswith("ADE_"):
            assert cnr == "comfyui-animatediff-evolved"
        elif node["type"].startswith("VHS_"):
            assert cnr == "comfyui-videohelpersuite"
        else:
            assert cnr == "comfy-core"


def test_train_workflow_uses_paper_settings():
    workflow = WORKFLOWS["train_concept"]
    train = next(n for n in workflow["nodes"] if n["type"] == "ClassDiffusionTrainConcept")
    inputs = ui_to_api({"nodes": [train], "links": workflow["links"]}, PACK)[str(train["id"])]["inputs"]
    assert inputs["steps"] == 500 and inputs["spl_weight"] == 1.0 and inputs["batch_size"] == 2
    assert inputs["learning_rate"] == 1e-5 and inputs["seed"] == 0
    multi_wf = WORKFLOWS["multi_concept"]
    multi = next(n for n in multi_wf["nodes"] if n["type"] == "ClassDiffusionTrainConcept")
    assert ui_to_api({"nodes": [multi], "links": multi_wf["links"]}, PACK)[str(multi["id"])]["inputs"]["steps"] == 800


def test_pick_workflow_reads_the_train_workflows_step_files():
    """train_concept keeps a step file every 100 steps; pick_concept_step picks among that run's files
    with a CLIP Vision model, the photos wired as its references, and samples with what it returns."""
    def inputs_of(name, node_type):
        workflow = WORKFLOWS[name]
        node = next(n for n in workflow["nodes"] if n["type"] == node_type)
        return ui_to_api({"nodes": [node], "links": workflow["links"]}, PACK)[str(node["id"])]["inputs"], node

    train, _ = inputs_of("train_concept", "ClassDiffusionTrainConcept")
    assert train["save_every"] == 100 and train["steps"] % train["save_every"] == 0
    pick, node = inputs_of("pick_concept_step", "ClassDiffusionPickStep")
    assert pick["concept_name"] == f"{train['save_name']}.safetensors" and pick["tolerance"] == 0.5
    wired = {item["name"] for item in node["inputs"] if item.get("link") is not None}
    assert {"model", "clip", "vae", "references", "clip_vision"} <= wired
    workflow = WORKFLOWS["pick_concept_step"]
    sources = {link[0]: link[1] for link in workflow["links"]}
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    model_link = next(item["link"] for item in sampler["inputs"] if item["name"] == "model")
    assert sources[model_link] == node["id"]  # the sampler's MODEL is the chosen step's


def test_sdxl_workflows_use_an_sdxl_checkpoint_at_1024():
    for name in ("train_concept_sdxl", "use_concept_sdxl"):
        workflow = WORKFLOWS[name]
        loader = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
        assert loader["widgets_values"][0] == "sd_xl_base_1.0.safetensors"
        latent = next(n for n in workflow["nodes"] if n["type"] == "EmptyLatentImage")
        assert latent["widgets_values"][:2] == [1024, 1024]
    train_wf = WORKFLOWS["train_concept_sdxl"]
    train = next(n for n in train_wf["nodes"] if n["type"] == "ClassDiffusionTrainConcept")
    inputs = ui_to_api({"nodes": [train], "links": train_wf["links"]}, PACK)[str(train["id"])]["inputs"]
    assert inputs["resolution"] == 1024 and inputs["save_name"] == "my_dog_sdxl" and inputs["spl_encoders"] == "concat"
    load = next(n for n in WORKFLOWS["use_concept_sdxl"]["nodes"] if n["type"] == "ClassDiffusionLoadConcept")
    assert load["widgets_values"][0] == "my_dog_sdxl.safetensors"


def test_infusion_workflow_uses_its_recipe():
    workflow = WORKFLOWS["train_infusion"]
    train = next(n for n in workflow["nodes"] if n["type"] == "ClassDiffusionTrainConcept")
    inputs = ui_to_api({"nodes": [train], "links": workflow["links"]}, PACK)[str(train["id"])]["inputs"]
    assert inputs["method"] == "infusion" and inputs["batch_size"] == 4 and inputs["steps"] == 500
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"][2:4] == [50, 8.0]  # steps, guidance as in Infusion's inference
    prompt = next(n for n in workflow["nodes"] if n.get("title") == "Prompt")
    assert "dog" in prompt["widgets_values"][0] and "<" not in prompt["widgets_values"][0]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_layout_has_no_overlaps_no_stored_view_and_a_thumbnail(name):
    import sys

    from PIL import Image

    sys.path.insert(0, str(REPO / "tools"))
    from build_workflows import boxes_overlap

    workflow = WORKFLOWS[name]
    nodes = workflow["nodes"]
    overlapping = [(a["id"], b["id"]) for i, a in enumerate(nodes) for b in nodes[i + 1:] if boxes_overlap(a, b)]
    assert overlapping == []
    assert "ds" not in workflow.get("extra", {})  # ComfyUI fits the graph to the window instead
    assert not any(node["type"] == "ImageBatch" for node in nodes)  # "Batch Images (DEPRECATED)"
    sources = {link[1] for link in workflow["links"]}
    targets = {link[3] for link in workflow["links"]}
    by_id = {node["id"]: node for node in nodes}
    for _, source, _, target, _, _ in workflow["links"]:  # left to right
        assert by_id[source]["pos"][0] < by_id[target]["pos"][0], (by_id[source]["type"], by_id[target]["type"])
    assert sources and targets
    with Image.open(REPO / "example_workflows" / f"{name}.jpg") as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128


def test_a_changed_node_input_is_caught():
    """If a node gains a widget, the shipped workflows stop matching: the check must say so."""
    import copy

    changed = copy.deepcopy(PACK)
    changed["ClassDiffusionTrainConcept"]["input"]["required"] = {
        "extra_widget": ["INT", {"default": 1}], **changed["ClassDiffusionTrainConcept"]["input"]["required"]}
    problems = check_workflow(WORKFLOWS["train_concept"], changed, types=set(changed))
    assert any("widget values" in p for p in problems)
