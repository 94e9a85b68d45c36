"""The built wheel holds the whole trainer: a non-editable install must work.

An editable install (what development and CI's main leg use) imports straight from the source
tree, so a package left out of the wheel goes unnoticed there; this builds the wheel and the sdist
from a copy of the tracked files and compares their contents with the source tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def source_modules(root: Path) -> set[str]:
    """Every module of the trainer package and the data it ships (the toy world's weights), as
    paths inside an installed tree."""
    package = root / "classdiffusion"
    files = list(package.rglob("*.py")) + [p for p in package.glob("toyworld/weights/**/*") if p.is_file()]
    return {path.relative_to(root).as_posix() for path in files if "__pycache__" not in path.parts}


def _tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (what a clean clone holds), without build leftovers."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = dest / name
        if (REPO / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)
    return dest


def build(source: Path, out: Path, kind: str) -> Path:
    """``kind`` "wheel" or "sdist", built by setuptools' PEP 517 backend as pip and build do."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in ("build", "comfyui_classdiffusion.egg-info"):  # setuptools reuses build/lib
        shutil.rmtree(source / leftover, ignore_errors=True)
    code = (
        "import sys, setuptools.build_meta as backend;"
        f"print(backend.build_{kind}(sys.argv[1]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files are what a wheel is built from)")
    return _tracked_copy(tmp_path_factory.mktemp("clone") / "repo")


def test_every_trainer_module_is_in_the_wheel(source, tmp_path):
    wheel = build(source, tmp_path / "dist", "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        console = archive.read(entry_points).decode()
    expected = source_modules(source)
    assert "classdiffusion/methods/__init__.py" in expected  # the package once left out
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    # Only the trainer goes into the wheel: ComfyUI's glue (nodes/) and the tests do not.
    assert not [n for n in names if n.startswith(("nodes/", "tests/", "benchmarks/"))]
    assert "classdiffusion = classdiffusion.cli:main" in console


def test_wheel_content_check_fails_when_a_package_is_left_out(source, tmp_path):
    """The check above is not vacuous: a hand list that forgets a subpackage is caught."""
    pyproject = source / "pyproject.toml"
    original = pyproject.read_text()
    broken = original.replace('include = ["classdiffusion", "classdiffusion.*"]',
                              'include = ["classdiffusion", "classdiffusion.*"]\n'
                              'exclude = ["classdiffusion.methods"]')
    assert broken != original, "pyproject.toml no longer finds packages as this test expects"
    pyproject.write_text(broken)
    try:
        wheel = build(source, tmp_path / "dist", "wheel")
    finally:
        pyproject.write_text(original)
    with zipfile.ZipFile(wheel) as archive:
        missing = source_modules(source) - set(archive.namelist())
    assert "classdiffusion/methods/base.py" in missing


def test_sdist_builds_the_same_wheel_contents(source, tmp_path):
    """pip installs from the sdist when no wheel fits: it must carry every module too."""
    sdist = build(source, tmp_path / "dist", "sdist")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert source_modules(source) <= names
    assert {"pyproject.toml", "README.md", "LICENSE"} <= names
