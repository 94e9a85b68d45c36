"""Adapters that let the training loop run on a concrete model stack.

``diffusers_host`` is the standalone one (diffusers + transformers); the ComfyUI adapter lives in
the node pack (``nodes/``), because this package never imports ComfyUI.
"""
