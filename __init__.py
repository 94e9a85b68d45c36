"""ClassDiffusion for ComfyUI: registers the node pack (V3 schema API) when ComfyUI loads it.

Outside ComfyUI (pytest, pip installs of the trainer) this file does nothing, so the trainer
package ``classdiffusion`` stays importable on its own.
"""

try:
    from comfy_api.latest import ComfyExtension as _ComfyExtension  # noqa: F401
except ImportError:  # not running inside ComfyUI
    _IN_COMFYUI = False
else:
    _IN_COMFYUI = True

if _IN_COMFYUI and __package__:
    from .nodes.nodes import comfy_entrypoint  # noqa: F401
