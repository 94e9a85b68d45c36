"""Each training setting is described once, on its TrainConfig field (config.setting): the CLI's
options and the Train node's inputs are generated from it and must say the same thing."""

from __future__ import annotations

import dataclasses

from classdiffusion.cli import build_parser
from classdiffusion.config import TrainConfig

from node_specs import pack_object_info

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_every_setting_has_help_and_the_cli_option_uses_it():
    options = {action.dest: action for action in _train_parser()._actions}
    for name, f in FIELDS.items():
        assert f.metadata.get("help"), f"{name} has no help text"
        if not f.metadata.get("cli"):
            continue
        action = options[name]
        assert f.metadata["cli"] in action.option_strings
        assert action.help.startswith(f.metadata["help"])
        assert action.default is None  # unset: the config's default, or the checkpoint's when resuming
        if f.metadata.get("choices"):
            assert list(action.choices) == list(f.metadata["choices"])


def test_cli_options_set_the_config_fields():
    from classdiffusion.cli import setting_overrides

    args = _train_parser().parse_args(["--base", "b", "--out", "o.safetensors", "--steps", "7", "--lr", "3e-5",
                                       "--no-hflip", "--compile", "--spl-feature", "official"])
    assert setting_overrides(args) == {"steps": 7, "learning_rate": 3e-5, "hflip": False, "compile": True,
                                       "spl_feature": "official"}
    assert TrainConfig.from_dict(setting_overrides(args)).hflip is False


def test_train_node_inputs_match_the_config_fields():
    node = pack_object_info()["ClassDiffusionTrainConcept"]["input"]
    inputs = {**node["required"], **node.get("optional", {})}
    # the node adds "auto" to mixed_precision, defaults memory to "auto" (the CLI: "check") and takes the
    # validation prompts as lines of text (the config: a list)
    shared = [name for name in inputs if name in FIELDS
              and name not in ("mixed_precision", "memory", "validation_prompts")]
    assert {"steps", "learning_rate", "spl_weight", "batch_size", "seed", "resolution", "gradient_checkpointing",
            "spl_feature"} <= set(shared)
    for name in shared:
        _, options = inputs[name]
        meta = FIELDS[name].metadata
        assert options["tooltip"] == meta["help"], name
        assert options["default"] == FIELDS[name].default, name
        for key in ("min", "max", "step"):
            if key in options or key in meta:
                assert options.get(key) == meta.get(key), (name, key)
        if "choices" in meta:
            assert options["options"] == list(meta["choices"]), name
    assert inputs["mixed_precision"][1]["tooltip"].startswith(FIELDS["mixed_precision"].metadata["help"])
    assert inputs["memory"][1]["tooltip"].startswith(FIELDS["memory"].metadata["help"])
    assert inputs["memory"][1]["default"] == "auto"
    assert inputs["validation_prompts"][1]["tooltip"] == FIELDS["validation_prompts"].metadata["help"]


def test_every_declared_range_and_choice_is_enforced_by_the_config():
    """TrainConfig refuses what a setting() declares out of range, so the CLI, the node and a
    resumed file meet the same limits; each default lies inside its own range."""
    import pytest

    from classdiffusion.errors import InvalidInputError

    checked = 0
    for name, f in FIELDS.items():
        info, default = f.metadata, f.default
        assert "min" not in info or default >= info["min"], name
        assert "max" not in info or default <= info["max"], name
        bad = []
        if "choices" in info:
            bad.append("no-such-choice")
        if "min" in info:
            bad.append(type(default)(info["min"] - (1 if isinstance(default, int) else max(abs(info["min"]), 1e-6))))
        if "max" in info:
            bad.append(type(default)(info["max"] * 2 + 1))
        for value in bad:
            with pytest.raises(InvalidInputError, match=name):
                TrainConfig(**{name: value})
            checked += 1
    assert checked >= 30
