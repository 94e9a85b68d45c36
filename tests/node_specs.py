"""This pack's node schemas as ComfyUI's /object_info would list them, without ComfyUI.

The pack is imported against a minimal stand-in of ``comfy_api.latest`` (and the few ComfyUI
modules it imports) that records what ``define_schema`` declares. The integration tests check
that this matches the real host's /object_info, so CI's workflow checks see the true inputs.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class _Input:
    def __init__(self, io_type, name, optional=False, options=None, **kwargs):
        self.io_type, self.name, self.optional, self.kwargs = io_type, name, optional, kwargs
        self.options = options


class _Output:
    def __init__(self, io_type, display_name=None, **kwargs):
        self.io_type, self.display_name = io_type, display_name


def _io_type(type_name):
    class IoType:
        @staticmethod
        def Input(name, **kwargs):
            return _Input(type_name, name, **kwargs)

        @staticmethod
        def Output(**kwargs):
            return _Output(type_name, **kwargs)
    return IoType


class _Schema:
    def __init__(self, node_id, display_name=None, category="sd", inputs=(), outputs=(), is_output_node=False,
                 **kwargs):
        self.node_id, self.display_name, self.category = node_id, display_name, category
        self.inputs, self.outputs, self.is_output_node = list(inputs), list(outputs), is_output_node


def _stub_modules() -> dict[str, types.ModuleType]:
    io = types.SimpleNamespace(
        Schema=_Schema, ComfyNode=object, NodeOutput=lambda *a, **k: (a, k), Custom=_io_type,
        Hidden=types.SimpleNamespace(unique_id="UNIQUE_ID", prompt="PROMPT", extra_pnginfo="EXTRA_PNGINFO"),
        **{name: _io_type(t) for name, t in {
            "Image": "IMAGE", "Mask": "MASK", "Model": "MODEL", "Clip": "CLIP", "Vae": "VAE", "String": "STRING",
            "Int": "INT", "Float": "FLOAT", "Boolean": "BOOLEAN", "Combo": "COMBO",
            "ClipVision": "CLIP_VISION"}.items()},
    )
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, types.SimpleNamespace(), object
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: []
    folder_paths.models_dir, folder_paths.folder_names_and_paths = "/nonexistent", {}
    modules = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "folder_paths": folder_paths,
               "comfy": types.ModuleType("comfy")}
    for name in ("model_management", "model_sampling", "utils", "samplers"):
        modules[f"comfy.{name}"] = types.ModuleType(f"comfy.{name}")
        setattr(modules["comfy"], name, modules[f"comfy.{name}"])
    modules["comfy.samplers"].KSampler = types.SimpleNamespace(SAMPLERS=["euler", "ddim"],
                                                               SCHEDULERS=["normal", "ddim_uniform"])
    return modules


def load_pack_with_stubs():
    """Import the pack (as package ``classdiffusion_pack_stubbed``) against the stand-ins."""
    saved = {name: sys.modules.get(name) for name in _stub_modules()}
    sys.modules.update(_stub_modules())
    try:
        spec = importlib.util.spec_from_file_location(
            "classdiffusion_pack_stubbed", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package
        spec.loader.exec_module(package)
        return importlib.import_module(f"{spec.name}.nodes.nodes")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def pack_object_info() -> dict:
    """{node_id: {"input": {"required": {...}, "optional": {...}}, "output": [...], ...}}"""
    nodes_module = load_pack_with_stubs()
    info = {}
    for cls in (nodes_module.TrainConceptNode, nodes_module.ConceptSpecNode, nodes_module.LoadConceptNode,
                nodes_module.LossMonitorNode, nodes_module.DriftReportNode, nodes_module.ExportDiffNode,
                nodes_module.CompareConceptStepsNode, nodes_module.ConceptImagesNode, nodes_module.PickConceptStepNode):
        schema = cls.define_schema()
        entry = {"required": {}, "optional": {}}
        for item in schema.inputs:
            options = dict(item.kwargs)
            if item.io_type == "COMBO":
                options["options"] = list(item.options or [])
            entry["optional" if item.optional else "required"][item.name] = [item.io_type, options]
        info[schema.node_id] = {
            "input": entry, "input_order": {k: list(v) for k, v in entry.items()},
            "output": [o.io_type for o in schema.outputs], "category": schema.category,
            "display_name": schema.display_name, "output_node": schema.is_output_node,
        }
    return info
