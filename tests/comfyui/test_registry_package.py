"""The registry's own checks, and the pack installed the way the registry installs it.

``comfy node validate`` and ``comfy node pack`` (comfy-cli) run on this repository; the packed zip is
unpacked into a fresh ``custom_nodes/`` under its registry id, its requirements.txt is installed
the way ComfyUI-Manager does it (line by line into ComfyUI's Python, never torch), ComfyUI starts,
and every node must register from the zip — so a file left out by ``.comfyignore`` or
``[tool.comfy] includes``, or a dependency missing from requirements.txt, fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from comfy_server import COMFYUI_PYTHON, PACK_NAME, REPO, ComfyServer, unavailable_reason

_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

NODE_IDS = {"ClassDiffusionTrainConcept", "ClassDiffusionConcept", "ClassDiffusionLoadConcept",
            "ClassDiffusionLossMonitor", "ClassDiffusionDriftReport", "ClassDiffusionExportDiff"}
NEVER_INSTALLED = re.compile(r"^(torch|torchvision|torchaudio|torchsde)([^A-Za-z0-9_.-]|$)")


def comfy_cli() -> list[str]:
    """comfy-cli from $COMFY_CLI, else beside ComfyUI's Python, else on PATH."""
    candidates = [os.environ.get("COMFY_CLI"), str(Path(COMFYUI_PYTHON).with_name("comfy")), shutil.which("comfy")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return [candidate, "--skip-prompt"]
    pytest.fail("comfy-cli not found: run tools/setup_comfyui_env.sh (it installs comfy-cli) or set COMFY_CLI")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run(comfy_cli() + list(args), cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"comfy {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def install_like_manager(requirements: Path) -> list[str]:
    """ComfyUI-Manager's way: one ``pip install`` per line, skipping the torch family."""
    installed = []
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or NEVER_INSTALLED.match(line):
            continue
        subprocess.run([COMFYUI_PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", line],
                       check=True, capture_output=True, timeout=600)
        installed.append(line)
    return installed


@pytest.fixture(scope="module")
def packed_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("registry") / "node.zip"
    zip_in_repo = REPO / "node.zip"
    try:
        run_cli("node", "pack", cwd=REPO)
        shutil.move(zip_in_repo, out)
    finally:
        zip_in_repo.unlink(missing_ok=True)
    return out


def test_comfy_node_validate_passes():
    result = run_cli("node", "validate", cwd=REPO)
    assert "Security warnings found" not in result.stdout, result.stdout


def test_the_zip_holds_the_pack_and_nothing_else(packed_zip):
    names = set(zipfile.ZipFile(packed_zip).namelist())
    for required in ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "icon.png",
                     "nodes/nodes.py", "classdiffusion/run/train.py", "example_workflows/train_concept.json"):
        assert required in names, required
    assert not any(name.startswith(("tests/", "benchmarks/", "tools/", ".ci/")) for name in names)


def test_nodes_register_from_the_packed_zip(packed_zip, tmp_path):
    pack_dir = tmp_path / "custom_nodes" / PACK_NAME  # the registry installs under its id
    zipfile.ZipFile(packed_zip).extractall(pack_dir)
    assert install_like_manager(pack_dir / "requirements.txt")
    server = ComfyServer(tmp_path)
    server.start()
    try:
        info = server.get("/object_info")
        assert NODE_IDS <= set(info), sorted(NODE_IDS - set(info))
        assert "Import failed" not in server.log() and "IMPORT FAILED" not in server.log()
    finally:
        server.stop()
    assert (pack_dir / "__init__.py").exists() and not (pack_dir / "__init__.py").is_symlink()
