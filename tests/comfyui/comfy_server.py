"""Start a real headless ComfyUI with this pack installed, and talk to it over HTTP.

ComfyUI is found through COMFYUI_PATH (default: a ComfyUI checkout beside this repository,
../ComfyUI). The server runs with COMFYUI_PYTHON (default: the Python running pytest), which
must have ComfyUI's requirements installed; see README "Testing against ComfyUI".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", REPO.parent / "ComfyUI")).resolve()
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK_NAME = "comfyui-classdiffusion"


def find_pack(env: str, folder: str) -> Path | None:
    """Another node pack the workflows use: $ENV, else beside this repository, else in
    ComfyUI's own custom_nodes."""
    candidates = [os.environ.get(env), REPO.parent / folder, COMFYUI_PATH / "custom_nodes" / folder]
    for candidate in candidates:
        if candidate and (Path(candidate) / "__init__.py").exists():
            return Path(candidate).resolve()
    return None


ANIMATEDIFF_EVOLVED = find_pack("ANIMATEDIFF_EVOLVED_PATH", "ComfyUI-AnimateDiff-Evolved")
VIDEOHELPERSUITE = find_pack("VIDEOHELPERSUITE_PATH", "ComfyUI-VideoHelperSuite")


def unavailable_reason() -> str | None:
    """None when the real host can run here; else why the integration tests skip."""
    if not (COMFYUI_PATH / "main.py").exists():
        return (f"ComfyUI not found at {COMFYUI_PATH}: run eval \"$(bash tools/setup_comfyui_env.sh)\" "
                "first, or set COMFYUI_PATH to a ComfyUI checkout (see README, 'Testing against ComfyUI')")
    probe = subprocess.run([COMFYUI_PYTHON, "-c", "import torch, torchvision, torchaudio, aiohttp, comfy_api"],
                           cwd=COMFYUI_PATH, capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"{COMFYUI_PYTHON} cannot import ComfyUI's requirements "
                f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'unknown error'}); "
                "set COMFYUI_PYTHON to ComfyUI's environment")
    return None


def comfyui_commit() -> str:
    """The checkout's git commit, or its comfyui_version.py version when it has no .git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=COMFYUI_PATH, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    if commit:
        return commit
    version_file = COMFYUI_PATH / "comfyui_version.py"
    if version_file.exists():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return "version " + line.split("=", 1)[1].strip().strip('"')
    return "unknown"


def make_checkpoint(path: Path, seed: int = 0, full: bool = False, sdxl: bool = False) -> Path:
    """``full``: SD1.5's whole UNet architecture (1.7 GB in fp16), for packs that inject into it;
    ``sdxl``: a small SDXL-family checkpoint with SDXL's full-size text encoders (2 GB in fp16)."""
    args = [COMFYUI_PYTHON, str(Path(__file__).with_name("make_checkpoint.py")), str(path), str(seed)]
    args += (["--full"] if full else []) + (["--sdxl"] if sdxl else [])
    subprocess.run(args, cwd=COMFYUI_PATH, check=True, capture_output=True)
    return path


def make_motion_module(path: Path) -> Path:
    subprocess.run([COMFYUI_PYTHON, str(Path(__file__).with_name("make_motion_module.py")), str(path),
                    str(ANIMATEDIFF_EVOLVED)], cwd=COMFYUI_PATH, check=True, capture_output=True)
    return path


BASE = "tiny_sd15.safetensors"  #: small random SD1.5-shaped checkpoint (seed 0)
OTHER = "other_sd15.safetensors"  #: the same architecture, other weights ("another checkpoint")
FULL = "v1-5-pruned-emaonly.safetensors"  #: SD1.5's whole architecture, the workflows' checkpoint
SDXL = "sd_xl_base_1.0.safetensors"  #: small SDXL-family random checkpoint, the SDXL workflows' name
MOTION_MODULE = "mm_test.safetensors"
#: A random CLIP ViT-L/14 vision model under the name the pick workflow uses (the user's download there).
CLIP_VISION = "clip_vision_vit_l.safetensors"


def _random_images(folder: Path, names, size) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{name}.png")


def write_random_clip_vision(path: Path) -> None:
    """A CLIP ViT-L/14 vision model with random weights (fp16, transformers layout, 0.6 GB): what
    ComfyUI's CLIPVisionLoader detects and loads as its clip_vision_config_vitl."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionModelWithProjection(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if "norm" in name:
            tensors[name] = (torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)).half()
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def start_server(base_dir: Path, extra_args: tuple[str, ...] = (), *, workflows: bool = False) -> "ComfyServer":
    """A started ComfyUI with two small random checkpoints and three random concept images; with
    ``workflows`` also what the example workflows need: a full-architecture SD1.5 checkpoint, a small
    SDXL-family one, the other two node packs with a random motion module, and their images."""
    checkpoints = base_dir / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    make_checkpoint(checkpoints / BASE, seed=0)
    make_checkpoint(checkpoints / OTHER, seed=1)
    _random_images(base_dir / "input", [f"concept_{i}" for i in range(3)], (112, 96))
    packs: tuple = ()
    if workflows:
        make_checkpoint(checkpoints / FULL, full=True)
        make_checkpoint(checkpoints / SDXL, sdxl=True)
        write_random_clip_vision(base_dir / "models" / "clip_vision" / CLIP_VISION)
        _random_images(base_dir / "input", ["concept_01", "concept_02", "concept_03", "dog_01", "dog_02",
                                            "cat_01", "cat_02"], (96, 80))
        if ANIMATEDIFF_EVOLVED and VIDEOHELPERSUITE:
            (base_dir / "models" / "animatediff_models").mkdir(parents=True)
            make_motion_module(base_dir / "models" / "animatediff_models" / MOTION_MODULE)
            packs = (ANIMATEDIFF_EVOLVED, VIDEOHELPERSUITE)
    server = ComfyServer(base_dir, extra_packs=packs, extra_args=extra_args)
    server.start()
    return server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, extra_packs: tuple[Path, ...] = (), extra_args: tuple[str, ...] = ()):
        """``extra_args``: more of ComfyUI's command-line options (e.g. ``--fp16-unet``)."""
        self.base_dir = base_dir
        self.extra_args = list(extra_args)
        self.extra_packs = [p for p in extra_packs if p is not None]
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        nodes = self.base_dir / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        for name, target in [(PACK_NAME, REPO)] + [(p.name, p) for p in self.extra_packs]:
            link = nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base_dir), "--disable-auto-launch", *self.extra_args],
            cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in {timeout}s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, data: dict | None = None):
        body = json.dumps(data or {}).encode()
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as error:
            return json.loads(error.read() or b"{}")

    def queue(self, prompt: dict) -> str:
        reply = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if "prompt_id" not in reply:
            raise AssertionError(f"prompt rejected: {json.dumps(reply)[:2000]}")
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def is_running(self, prompt_id: str) -> bool:
        running = self.get("/queue").get("queue_running", [])
        return any(item[1] == prompt_id for item in running)


def error_message(entry: dict) -> str | None:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return data.get("exception_message", "")
    return None


def was_interrupted(entry: dict) -> bool:
    return any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
