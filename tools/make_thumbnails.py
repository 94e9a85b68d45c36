"""Make example_workflows/<name>.jpg, the template browser's thumbnails, from each workflow's own
output: every shipped workflow runs on the test host (tests/comfyui: random SD1.5-architecture
checkpoint, small sizes and few steps) and its first saved image becomes the card's picture.

    eval "$(bash tools/setup_comfyui_env.sh)"; python tools/make_thumbnails.py

Random weights draw noise-like pictures: what a card shows is the workflow's real output path.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "comfyui"), str(REPO / "tests"), str(REPO)]

THUMBNAIL = 256


def first_image(server, entry) -> Image.Image:
    for output in entry["outputs"].values():
        for key in ("images", "gifs"):
            for item in output.get(key, []):
                if item.get("type") != "output":
                    continue
                path = server.base_dir / "output" / item.get("subfolder", "") / item["filename"]
                if path.suffix.lower() in (".png", ".jpg", ".webp", ".gif"):
                    with Image.open(path) as image:
                        return image.convert("RGB")
    raise RuntimeError("the workflow saved no image")


def main() -> None:
    from comfy_server import error_message, start_server
    from test_workflows_on_host import SMALL
    from workflow_tools import load_workflows, ui_to_api

    server = start_server(Path(tempfile.mkdtemp(prefix="thumbnails_")), workflows=True)
    try:
        info = server.get("/object_info")
        for name, workflow in load_workflows().items():
            if name == "use_concept" or name == "video_animatediff":  # they load train_concept's file
                continue
            _make(server, info, name, workflow, SMALL, error_message, ui_to_api)
        for name in ("use_concept", "video_animatediff"):
            _make(server, info, name, load_workflows()[name], SMALL, error_message, ui_to_api)
    finally:
        server.stop()


def _make(server, info, name, workflow, small, error_message, ui_to_api) -> None:
    entry = server.run(ui_to_api(workflow, info, small), timeout=900)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"{name}: {error_message(entry)}")
    picture = first_image(server, entry).resize((THUMBNAIL, THUMBNAIL), Image.BICUBIC)
    path = REPO / "example_workflows" / f"{name}.jpg"
    picture.save(path, quality=88)
    print(path)


if __name__ == "__main__":
    main()
