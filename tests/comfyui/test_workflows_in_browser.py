"""The shipped workflows in ComfyUI's real frontend, in a real (headless) Chromium, as a user meets
them: each opened through Workflow → Open loads with no missing node and every widget as saved and
as the server's /object_info allows; the pack's templates are in the template browser; queueing
use_concept.json from the page reaches the server's first progress message.

Needs Debian's Chromium (`apt-get install -y chromium`, as .ci/run does) and websocket-client.
Outside CI a machine without them skips these tests, saying so; in CI they must run."""

from __future__ import annotations

import copy
import json
import time

import pytest

from browser import Browser, unavailable_reason as browser_unavailable
from comfy_fixtures import host_required
from comfy_server import PACK_NAME, error_message, unavailable_reason as host_unavailable
from frontend import check_loaded_workflow, listed_templates, open_comfyui, open_workflow, run_command
from workflow_tools import WORKFLOW_DIR, load_workflows, ui_to_api

_host_reason = host_unavailable()
pytestmark = pytest.mark.skipif(_host_reason is not None, reason=_host_reason or "")
WORKFLOWS = load_workflows()
#: Model files the user downloads (README: the AnimateDiff motion module); the test host has a random
#: motion module under another name, so the frontend rightly lists this one as missing.
USER_DOWNLOADS = {"mm_sd_v15_v2.ckpt"}
#: The concepts the use/video workflows load, trained on the host first by the train workflows (small).
SMALL_TRAINING = {"ClassDiffusionTrainConcept": {"steps": 2, "resolution": 64},
                  "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 1}}


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's ComfyUI with the concepts the workflows name (models/classdiffusion/my_dog and
    my_dog_sdxl), each trained by its train workflow if an earlier test has not."""
    for train, name in (("train_concept", "my_dog"), ("train_concept_sdxl", "my_dog_sdxl")):
        concept = shared_server.base_dir / "models" / "classdiffusion" / f"{name}.safetensors"
        if not concept.exists():
            info = shared_server.get("/object_info")
            entry = shared_server.run(ui_to_api(WORKFLOWS[train], info, SMALL_TRAINING), timeout=1800)
            assert entry["status"]["status_str"] == "success", error_message(entry)
        assert concept.exists()
    return shared_server


@pytest.fixture(scope="module")
def page(server):
    reason = browser_unavailable()
    if reason is not None:
        if host_required():
            pytest.fail(f"The browser tests must run in CI but cannot: {reason}")
        pytest.skip(reason + " — then the browser tests run")
    with Browser() as browser:
        open_comfyui(browser, server.url)
        yield browser


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _problems(workflow: dict, loaded: list[dict], object_info: dict) -> list[str]:
    return [p for p in check_loaded_workflow(workflow, loaded, object_info)
            if not any(f"{name!r} is not offered" in p for name in USER_DOWNLOADS)]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_opens_with_every_node_and_widget(page, object_info, name):
    loaded = open_workflow(page, WORKFLOW_DIR / f"{name}.json")
    assert _problems(WORKFLOWS[name], loaded, object_info) == []


def test_a_node_type_that_does_not_exist_is_caught(page, object_info, tmp_path):
    """The check above is not vacuous: a workflow naming an unknown node type fails it."""
    workflow = copy.deepcopy(WORKFLOWS["train_concept"])
    trainer = next(node for node in workflow["nodes"] if node["type"] == "ClassDiffusionTrainConcept")
    trainer["type"] = "ClassDiffusionNoSuchNode"
    path = tmp_path / "mutated.json"
    path.write_text(json.dumps(workflow))
    problems = _problems(workflow, open_workflow(page, path), object_info)
    assert problems == [f"node {trainer['id']} (ClassDiffusionNoSuchNode): missing node type (the frontend does not know it)"]


def test_the_templates_are_in_the_template_browser(page):
    shown = listed_templates(page, PACK_NAME)
    assert f"Showing {len(WORKFLOWS)} of {len(WORKFLOWS)} templates" in shown
    assert set(WORKFLOWS) <= set(shown)


def test_queueing_use_concept_reaches_the_first_progress_message(page, server):
    open_workflow(page, WORKFLOW_DIR / "use_concept.json")
    # As a user would for a quick look on a CPU: a small image (the graph is otherwise as shipped).
    page.evaluate("""(() => { const latent = app.graph.nodes.find(n => n.type === 'EmptyLatentImage');
        latent.widgets.find(w => w.name === 'width').value = 64;
        latent.widgets.find(w => w.name === 'height').value = 64; return true })()""")
    page.evaluate("""(() => { window.__progress = []; window.__errors = [];
        app.api.addEventListener('progress', e => window.__progress.push(e.detail));
        app.api.addEventListener('execution_error', e => window.__errors.push(e.detail));
        return true })()""")
    run_command(page, "Comfy.QueuePrompt")
    try:
        deadline = time.time() + 600
        progress = None
        while time.time() < deadline and not progress:
            progress, errors = page.evaluate("[window.__progress[0] || null, window.__errors]")
            assert not errors, errors
            time.sleep(0.5)
        assert progress, f"no progress message within 600 s; server log: {server.log()[-2000:]}"
        assert progress["max"] == 100 and progress["value"] >= 1  # the KSampler's 100 DDIM steps
    finally:
        server.post("/interrupt")
        server.post("/queue", {"clear": True})
        for _ in range(120):
            if not server.get("/queue")["queue_running"]:
                break
            time.sleep(0.5)
