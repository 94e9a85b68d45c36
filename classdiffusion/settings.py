"""How a setting is declared: once, with its help, range, choices, command-line flag and place on
the Train node. ``config.TrainConfig`` holds the shared settings and each method folder its own
(``methods/<name>/settings.py``); the CLI and the nodes read the declarations, never a copy."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, help: str, *, cli: str | None = None, node: str | None = None, **limits: Any):
    """A TrainConfig field with its help, range (min/max/step), choices and command-line flag:
    written once, read by the CLI (``cli.common.setting_arguments``) and the nodes' inputs
    (peft's ``field(metadata={"help": ...})`` style). ``cli`` "--no-x" turns a True default off.

    ``node`` places a method's setting on the Train node: "after:NAME" (a required input after the
    input NAME) or "optional-after:NAME" / "advanced-after:NAME" (an optional, or folded-away,
    input after NAME). The shared settings' node inputs are written out in ``nodes/nodes.py``."""
    return field(default=default, metadata={"help": help, "cli": cli, "node": node, **limits})


class MethodSetting:
    """A method's own setting: a TrainConfig field declared in the method's folder, inserted into
    TrainConfig after the shared field ``after`` (so the settings' order, the flags' order and the
    JSON a concept file holds stay as they were)."""

    def __init__(self, name: str, annotation: str, declared, *, after: str):
        self.name, self.annotation, self.declared, self.after = name, annotation, declared, after
