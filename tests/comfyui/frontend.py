"""ComfyUI's real frontend in a real browser: open it, open a workflow as a user does (Workflow →
Open, a file picked in the file chooser), read back what the frontend made of it, and check that
against the server's /object_info. Used by tests/comfyui/test_workflows_in_browser.py and by
tools/make_thumbnails.py (the template cards are screenshots of the workflows in this frontend)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from browser import Browser
from workflow_tools import check_node

#: Widgets the frontend adds to a node beside its schema's inputs.
FRONTEND_WIDGETS = {"control_after_generate", "control_before_generate", "upload"}

_GRAPH_JS = """(() => app.graph.nodes.map(n => ({
  id: n.id, type: n.type,
  registered: n.type in LiteGraph.registered_node_types,
  widgets: (n.widgets || []).filter(w => w.serialize !== false && !(w.options && w.options.serialize === false))
      .map(w => ({name: w.name, value: w.value, type: w.type,
                  options: Array.isArray(w.options && w.options.values) ? w.options.values : null})),
  widgets_values: n.serialize().widgets_values || null,
})))()"""


def open_comfyui(browser: Browser, url: str, timeout: float = 180) -> None:
    """Load the frontend and wait until the app, its node definitions and the canvas are ready."""
    browser.goto(url)
    browser.wait_for("window.app && app.graph && app.canvas && window.LiteGraph && "
                     "Object.keys(LiteGraph.registered_node_types).length > 0 && "
                     "app.extensionManager && app.extensionManager.command ? 'ready' : ''", timeout=timeout)
    browser.send("Page.setInterceptFileChooserDialog", enabled=True)
    # A new browser profile is a first visit: the frontend opens its template browser by itself.
    browser.evaluate("app.extensionManager.setting.set('Comfy.TutorialCompleted', true).then(() => true)")
    close_dialogs(browser)


CLOSE_BUTTONS = ("[role=dialog] button[aria-label=Close], [role=dialog] .p-dialog-close-button, "
                 "[role=dialog] button[aria-label=close]")


def close_dialogs(browser: Browser, timeout: float = 30) -> None:
    """Escape, as a user closes a dialog, until none is open; a dialog that ignores Escape gets
    its close button clicked (a busy machine may open one late, or one that wants a click)."""
    deadline = time.time() + timeout
    attempt = 0
    while browser.evaluate("document.querySelectorAll('[role=dialog]').length") and time.time() < deadline:
        attempt += 1
        if attempt % 4 == 0:
            browser.evaluate(f"(() => {{ document.querySelectorAll({json.dumps(CLOSE_BUTTONS)})"
                             ".forEach(b => b.click()); return true; }})()")
        else:
            for kind in ("keyDown", "keyUp"):
                browser.send("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape",
                             windowsVirtualKeyCode=27)
        time.sleep(0.5)
    if browser.evaluate("document.querySelectorAll('[role=dialog]').length"):
        text = browser.evaluate("Array.from(document.querySelectorAll('[role=dialog]'))"
                                ".map(d => d.innerText.slice(0, 200)).join(' | ')")
        raise RuntimeError(f"a dialog of the frontend does not close: {text!r}")


def run_command(browser: Browser, command: str) -> None:
    """A frontend command, as its menu item or keybinding runs it."""
    browser.evaluate(f"app.extensionManager.command.execute({json.dumps(command)}).then(() => true)")


def open_workflow(browser: Browser, path: Path, timeout: float = 60) -> list[dict]:
    """Workflow → Open: the frontend's file chooser, answered with ``path``; returns the loaded
    graph's nodes (id, type, whether the type is registered, widgets, serialized widget values)."""
    expected = len(json.loads(Path(path).read_text())["nodes"])
    browser.evaluate("app.graph.clear(), true")
    run_command(browser, "Comfy.OpenWorkflow")
    chooser = browser.wait_event("Page.fileChooserOpened", timeout=30)
    browser.send("DOM.setFileInputFiles", files=[str(Path(path).resolve())], backendNodeId=chooser["backendNodeId"])
    browser.wait_for(f"app.graph.nodes.length === {expected}", timeout=timeout)
    time.sleep(0.5)  # widgets settle (combo refresh, image previews)
    return browser.evaluate(_GRAPH_JS)


def check_loaded_workflow(workflow: dict, loaded: list[dict], object_info: dict) -> list[str]:
    """What a user would see wrong after opening ``workflow``: missing node types, nodes the
    frontend dropped, widget values it shifted or changed on load, and values /object_info
    refuses (a combo value not offered, a number out of range, a widget the node does not have)."""
    problems = []
    by_id = {str(node["id"]): node for node in loaded}  # the frontend may return ids as text
    for node in workflow["nodes"]:
        live = by_id.get(str(node["id"]))
        label = f"node {node['id']} ({node['type']})"
        if live is None or live["type"] != node["type"]:
            problems.append(f"{label}: not in the loaded graph")
            continue
        if not live["registered"]:
            problems.append(f"{label}: missing node type (the frontend does not know it)")
            continue
        saved = node.get("widgets_values")
        if isinstance(saved, list) and (live["widgets_values"] or []) != saved:
            problems.append(f"{label}: widget values changed on load: {saved} → {live['widgets_values']}")
        spec = object_info.get(node["type"])
        if spec is None:
            continue  # a frontend-only node (Note, MarkdownNote, Reroute, PrimitiveNode)
        # Count, order, types and ranges of the values as loaded: the static check's rules.
        problems += check_node({**node, "widgets_values": live["widgets_values"] or []}, spec)
        # What only a live frontend shows: widgets the node lacks here, files this server lacks.
        inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for widget in live["widgets"]:
            name, value = widget["name"], widget["value"]
            if name in FRONTEND_WIDGETS:
                continue
            if name not in inputs:
                problems.append(f"{label}: widget {name!r} is not an input of the node on this server")
            elif widget["options"] is not None and value not in widget["options"]:
                problems.append(f"{label}: {name} = {value!r} is not offered (choices: {widget['options'][:8]})")
    return problems


def listed_templates(browser: Browser, pack: str, timeout: float = 60) -> list[str]:
    """Workflow → Browse Templates, the pack's entry under Extensions: the template titles shown."""
    run_command(browser, "Comfy.BrowseTemplates")
    entry = ("Array.from(document.querySelectorAll('[role=dialog] *')).filter(e => e.children.length === 0 && "
             f"e.textContent.trim() === {json.dumps(pack)})[0]")
    browser.wait_for(f"!!({entry})", timeout=timeout)
    browser.evaluate(f"({entry}).click(), true")
    browser.wait_for("document.querySelector('[role=dialog]').innerText.includes('Showing')", timeout=timeout)
    text = browser.evaluate("document.querySelector('[role=dialog]').innerText")
    close_dialogs(browser)
    return [line.strip() for line in text.splitlines() if line.strip()]


def prepare_for_screenshot(browser: Browser) -> None:
    """Only the graph: focus mode, no minimap, canvas menu or info, full-quality rendering at any
    zoom, the view fitted to the nodes."""
    browser.evaluate("""(async () => {
      const settings = app.extensionManager.setting;
      for (const [key, value] of [['Comfy.Minimap.Visible', false], ['Comfy.Graph.CanvasMenu', false],
                                  ['Comfy.Graph.CanvasInfo', false],
                                  ['LiteGraph.Canvas.LowQualityRenderingZoomThreshold', 0.05],
                                  ['LiteGraph.Canvas.MinFontSizeForLOD', 1]]) {
        try { await settings.set(key, value) } catch (e) {}
      }
      try { app.extensionManager.toast.removeAll() } catch (e) {}
      return true })()""")
    close_dialogs(browser)
    if not browser.evaluate("app.extensionManager.focusMode"):
        run_command(browser, "Workspace.ToggleFocusMode")
    run_command(browser, "Comfy.Canvas.FitView")
    browser.evaluate("app.canvas.setDirty(true, true), true")
    time.sleep(1.0)
    browser.wait_for("app.canvas.low_quality === false", timeout=20)  # text drawn, not grey bars


def graph_screenshot(browser: Browser, out: Path, *, width: int = 1200, quality: int = 88) -> Path:
    """The fitted graph cropped to its nodes (plus a margin) and saved as JPEG ``width`` wide."""
    import base64

    from PIL import Image

    png = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    # The nodes' bounding box on the screen (graph coordinates through the canvas' offset and scale).
    left, top, right, bottom = browser.evaluate("""(() => {
      const ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const n of app.graph.nodes) {
        if (![n.pos[0], n.pos[1], n.size[0], n.size[1]].every(Number.isFinite)) continue;
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      return [x0, y0, x1, y1].map((v, i) => (v + ds.offset[i % 2]) * ds.scale) })()""")
    margin = 16
    shot = shot.crop((max(0, int(left) - margin), max(0, int(top) - margin),
                      min(shot.width, int(right) + margin), min(shot.height, int(bottom) + margin)))
    if shot.width > width:
        shot = shot.resize((width, round(shot.height * width / shot.width)), Image.LANCZOS)
    shot.save(out, "JPEG", quality=quality, optimize=True)
    return out
