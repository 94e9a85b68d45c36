"""Make example_workflows/<name>.jpg, the template browser's card pictures: each shipped workflow
as ComfyUI's real frontend draws it, opened through Workflow → Open in headless Chromium.

    eval "$(bash tools/setup_comfyui_env.sh)"; python tools/make_thumbnails.py [NAME ...]

The test host (tests/comfyui) serves the frontend; the concept images in the Load Image nodes are
the demo's toy-world pictures, and the concept the use/video workflows load is trained first by
the train workflow (small settings), so no node shows a missing file. A card shows the workflow, not
a generated picture: on random test weights a generated picture would be noise.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "comfyui"), str(REPO / "tests"), str(REPO)]

#: The card picture's longest side.
WIDTH = 1200


def _toy_concept_images(input_dir: Path) -> None:
    """The demo's toy-world pictures in place of the test host's random-pixel concept images."""
    from PIL import Image

    from classdiffusion.toyworld.demo import DEMO_INSTANCE
    from classdiffusion.toyworld.evaluate import instance_pictures

    names = ["concept_01", "concept_02", "concept_03", "dog_01", "dog_02", "cat_01", "cat_02"]
    for picture, name in zip(instance_pictures(DEMO_INSTANCE, count=len(names)), names):
        picture.resize((256, 256), Image.NEAREST).save(input_dir / f"{name}.png")


def main(names: list[str]) -> None:
    """Every workflow's card, or only those named (e.g. a new template)."""
    from browser import Browser
    from comfy_server import MOTION_MODULE, error_message, start_server
    from frontend import graph_screenshot, open_comfyui, open_workflow, prepare_for_screenshot
    from workflow_tools import WORKFLOW_DIR, load_workflows, ui_to_api

    server = start_server(Path(tempfile.mkdtemp(prefix="thumbnails_")), workflows=True)
    try:
        _toy_concept_images(server.base_dir / "input")
        small = {"ClassDiffusionTrainConcept": {"steps": 2, "resolution": 64},
                 "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 1}}
        for trained_first in ("train_concept", "train_concept_sdxl"):  # the use workflows' concepts exist
            entry = server.run(ui_to_api(load_workflows()[trained_first], server.get("/object_info"), small),
                               timeout=1800)
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"{trained_first}: {error_message(entry)}")
        # The video workflow names the motion module users download; the picture shows it present.
        motion = server.base_dir / "models" / "animatediff_models"
        if (motion / MOTION_MODULE).exists():
            shutil.copyfile(motion / MOTION_MODULE, motion / "mm_sd_v15_v2.ckpt")
        with Browser(2000, 1500) as browser:
            open_comfyui(browser, server.url)
            for name in names or load_workflows():
                open_workflow(browser, WORKFLOW_DIR / f"{name}.json")
                prepare_for_screenshot(browser)
                print(graph_screenshot(browser, WORKFLOW_DIR / f"{name}.jpg", width=WIDTH))
    finally:
        server.stop()
        shutil.rmtree(server.base_dir, ignore_errors=True)  # its checkpoints take ~5 GB


if __name__ == "__main__":
    main(sys.argv[1:])
