"""What the registry and installers read: dependencies, their tested floors, icon and license."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _lines(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def test_requirements_txt_equals_pyproject_dependencies():
    """comfy-cli reads [project].dependencies, ComfyUI-Manager requirements.txt: keep them equal."""
    assert _lines(REPO / "requirements.txt") == PYPROJECT["project"]["dependencies"]


def test_declared_floors_are_the_versions_the_floor_leg_tests():
    floors = dict(line.split("==") for line in _lines(REPO / "tools" / "floor-requirements.txt"))
    declared = {}
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        if match:
            declared[match.group(1).lower()] = match.group(2)
        else:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+", requirement), f"{requirement}: only lower bounds, no caps"
    assert set(declared) == set(floors)
    for name, version in declared.items():
        padded = lambda v: tuple(int(p) for p in v.split(".")) + (0,) * (3 - len(v.split(".")))  # noqa: E731
        assert padded(version) == padded(floors[name]), (name, version, floors[name])
    assert "torch" not in declared  # ComfyUI brings torch; the pack never installs it


def test_registry_icon_and_license_ship_with_the_pack():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["Icon"].endswith("/icon.png") and comfy["PublisherId"] and comfy["DisplayName"]
    with Image.open(REPO / "icon.png") as icon:
        assert icon.size[0] == icon.size[1] and icon.size[0] <= 800
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    assert "Apache License" in (REPO / "LICENSE").read_text()
    ignored = _lines(REPO / ".comfyignore")
    assert not any(entry.rstrip("/") in ("icon.png", "LICENSE") for entry in ignored)


def test_no_import_cycle_inside_the_trainer():
    """classdiffusion/ imports form a tree (module-level and function-level relative imports)."""
    import ast

    root = REPO / "classdiffusion"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
                deps |= {m for m in [target] + [f"{target}.{a.name}" for a in node.names] if m in modules}
        graph[name] = deps - {name}
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for dep in graph[name]:
            assert state.get(dep) != "open", "import cycle: " + " → ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert "classdiffusion.run.train" in graph and graph["classdiffusion.run.train"]


def test_methods_never_read_the_run_and_the_shared_code_names_no_method():
    """A method gets a MethodContext, never the run; the loop, progress and nodes speak of loss
    terms, not of a method (#24)."""
    import re

    import classdiffusion.methods as methods

    for path in Path(methods.__file__).parent.rglob("*.py"):
        found = re.findall(r"run\._|run\.scaler|\.run\b", path.read_text())
        assert not found, (path.name, found)
    names = [cls.name for cls in methods.METHOD_CLASSES.values()] + ["<unused>"]
    shared = ["classdiffusion/run/progress.py", "classdiffusion/run/train.py", "classdiffusion/config.py",
              "classdiffusion/concept/meta.py",
              *(str(p.relative_to(REPO)) for p in sorted((REPO / "classdiffusion" / "cli").glob("*.py"))),
              *(f"nodes/{m}.py" for m in ("nodes", "inputs", "training_nodes", "concept_nodes", "report_nodes",
                                          "comfy_glue"))]
    for relative in shared:
        text = re.sub(r'getLogger\("classdiffusion"\)|prog="classdiffusion"|CONCEPT_FOLDER = "classdiffusion"', "",
                      (REPO / relative).read_text())  # the package's own name, not the method's
        quoted = [name for name in names if f'"{name}"' in text or f"'{name}'" in text]
        assert not quoted, (relative, quoted)
