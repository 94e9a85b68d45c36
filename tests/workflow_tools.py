"""Reading ComfyUI UI-format workflows: checking them against node definitions and converting
them to the API format that /prompt accepts (the editor does this conversion in the browser)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
#: Combo widgets whose options are the user's files: only the type is checked.
FILE_WIDGETS = {"ckpt_name", "concept_name", "model_name", "image", "lora_name", "vae_name"}


def load_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(WORKFLOW_DIR.glob("*.json"))}


def _type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_choices(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else list(_options(spec).get("options", []))


def widget_inputs(node_info: dict, linked: set[str] = frozenset()) -> list[tuple[str, list]]:
    out = []
    for group in ("required", "optional"):
        for name, spec in node_info["input"].get(group, {}).items():
            if _type(spec) in WIDGET_TYPES and name not in linked:
                out.append((name, spec))
    return out


def _linked_inputs(node: dict) -> set[str]:
    return {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}


def frontend_widget_count(spec: list) -> int:
    """Values the frontend saves after an input's own: the seed's control ("fixed") and an image
    input's upload button ("image")."""
    options = _options(spec)
    return int(bool(options.get("control_after_generate"))) + int(bool(options.get("image_upload")))


def widget_values(node: dict, node_info: dict) -> dict:
    """{widget name: value} in the host's widget order (skipping the seed's control value)."""
    values = node.get("widgets_values", [])
    widgets = widget_inputs(node_info, _linked_inputs(node))
    if isinstance(values, dict):  # VideoHelperSuite stores its widgets by name
        return {name: values[name] for name, _ in widgets if name in values}
    out, position = {}, 0
    for name, spec in widgets:
        if position >= len(values):
            break
        out[name] = values[position]
        position += 1
        position += frontend_widget_count(spec)
    return out


def check_node(node: dict, node_info: dict) -> list[str]:
    """Problems of one node against its definition: widget count, order and value types."""
    problems = []
    label = f"node {node['id']} ({node['type']})"
    values = node.get("widgets_values", [])
    widgets = widget_inputs(node_info, _linked_inputs(node))
    if isinstance(values, list):
        expected = sum(1 + frontend_widget_count(spec) for _, spec in widgets)
        if len(values) != expected:
            problems.append(f"{label}: {len(values)} widget values, the node has {expected} "
                            f"({[name for name, _ in widgets]})")
    else:
        missing = [name for name, _ in widgets if name not in values]
        if missing:
            problems.append(f"{label}: widget values lack {missing}")
    for name, value in widget_values(node, node_info).items():
        spec = dict(widgets)[name]
        kind, options = _type(spec), _options(spec)
        ok = {
            "INT": isinstance(value, int) and not isinstance(value, bool),
            "FLOAT": isinstance(value, (int, float)) and not isinstance(value, bool),
            "STRING": isinstance(value, str),
            "BOOLEAN": isinstance(value, bool),
            "COMBO": isinstance(value, str),
        }[kind]
        if not ok:
            problems.append(f"{label}: {name}={value!r} is not a {kind}")
            continue
        if kind in ("INT", "FLOAT"):
            if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
                problems.append(f"{label}: {name}={value} outside [{options.get('min')}, {options.get('max')}]")
        if kind == "COMBO" and name not in FILE_WIDGETS:
            choices = _combo_choices(spec)
            if choices and value not in choices:
                problems.append(f"{label}: {name}={value!r} is not one of {choices[:8]}")
    for item in node.get("inputs", []):
        known = {**node_info["input"].get("required", {}), **node_info["input"].get("optional", {})}
        if item["name"] not in known:
            problems.append(f"{label}: the node has no input {item['name']!r}")
    return problems


def check_workflow(workflow: dict, object_info: dict, types: set[str] | None = None) -> list[str]:
    """Problems of every node (of ``types`` if given) and every link of a UI workflow."""
    problems = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or (types is not None and node["type"] not in types):
            continue
        if node["type"] not in object_info:
            problems.append(f"node {node['id']}: unknown node type {node['type']!r}")
            continue
        if object_info[node["type"]].get("deprecated"):
            problems.append(f"node {node['id']}: {node['type']} is deprecated on this host")
        problems += check_node(node, object_info[node["type"]])
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        src, dst = nodes[source], nodes[target]
        if src["type"] in object_info and (types is None or src["type"] in types):
            outputs = object_info[src["type"]]["output"]
            if source_slot >= len(outputs) or outputs[source_slot] != link_type:
                problems.append(f"link {link_id}: {src['type']} output {source_slot} is not {link_type}")
        if dst["type"] in object_info and (types is None or dst["type"] in types):
            name = dst["inputs"][target_slot]["name"]
            known = {**object_info[dst["type"]]["input"].get("required", {}),
                     **object_info[dst["type"]]["input"].get("optional", {})}
            if name in known and _type(known[name]) != link_type and _type(known[name]) != "*":
                problems.append(f"link {link_id}: {dst['type']}.{name} takes {_type(known[name])}, gets {link_type}")
    return problems


def ui_to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """The API-format prompt of a UI workflow; ``overrides[class_type][input] = value`` for tests."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) == 4:  # notes; bypassed nodes
            continue
        inputs = dict(widget_values(node, object_info[node["type"]]))
        for item in node.get("inputs", []):
            if item.get("link") is not None:
                _, source, slot, *_ = links[item["link"]]
                inputs[item["name"]] = [str(source), slot]
        inputs.update((overrides or {}).get(node["type"], {}))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
