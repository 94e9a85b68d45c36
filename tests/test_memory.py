"""The memory planner: its estimate against the measured live-tensor peak of real steps, and
``memory="auto"`` on a simulated small device (a memory limit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from classdiffusion.config import TrainConfig
from classdiffusion.errors import InvalidInputError
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.run.memory import HEADROOM, MIB, estimate
from classdiffusion.methods import ClassDiffusionMethod, InfusionMethod
from classdiffusion.run.train import TrainingRun, train
from helpers import dog, make_images

REPO = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("CLASSDIFFUSION_SLOW") == "1"

#: Run in a fresh process, so the live-tensor count holds the run's tensors only.
MEASURE = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import torch
torch.manual_seed(0)
from classdiffusion.config import ConceptSpec, TrainConfig
from classdiffusion.run.train import TrainingRun
model, resolution, base, method = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
if model == "tiny":
    from classdiffusion.hosts.diffusers_host import load_host
    host = load_host(base, device="cpu")
else:
    from pathlib import Path
    from bench_train import build_models
    from classdiffusion.hosts.diffusers_host import DiffusersHost
    from classdiffusion.model.tiny import build_tokenizer
    host = DiffusersHost(*build_models("sd15", build_tokenizer(Path(base) / "tok"), torch.float32), device="cpu")
from PIL import Image
import numpy as np
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(3)]
config = TrainConfig.for_method(method, steps=3, resolution=resolution, batch_size=2, gradient_accumulation=1, **extra)
run = TrainingRun(host, [ConceptSpec(token="<sks>", class_word="dog")], config, images=[images])
from classdiffusion.run.memory import LiveBytes
detach = run.method.attach()
run.step(0)  # AdamW's state exists from the first step on: measure a steady step
# What is resident: every storage of the models, the latent bank, the trained tensors and AdamW's state.
tensors = [t for m in (host.unet, host.text.model, host.vae) for t in list(m.parameters()) + list(m.buffers())]
tensors += [t for pair in run.bank.variants.values() for t in pair] + list(run.bank.canvas)
tensors += run.params + [v for state in run.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
with LiveBytes(known=tensors) as live:  # and the step's own peak above that (activations, gradients, ...)
    start = live.current
    run.step(1)
detach()
measured = sum(resident.values()) + live.peak - start
print("RESULT " + json.dumps({"estimate": run.memory_plan.estimate.total, "measured": measured,
                              "parts": run.memory_plan.estimate.__dict__}))
"""


def _measure(model: str, resolution: int, base: Path, method: str = "classdiffusion", **settings) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(REPO), model, str(resolution), str(base), method,
                          json.dumps(settings)],
                         capture_output=True, text=True, timeout=900)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert line, out.stderr[-3000:]
    return json.loads(line[7:])


# The quick run (-m "not slow") keeps the smallest case; the larger ones take 15-45 s each.
CASES = [("tiny", 128)] + [pytest.param(*case, marks=pytest.mark.slow)
                           for case in [("tiny", 256), ("tiny", 512), ("sd15", 128)]] + (
    [("sd15", 256), ("sd15", 512)] if SLOW else [])


@pytest.mark.parametrize("model,resolution", CASES)
def test_estimate_is_within_15_percent_of_the_measured_peak(model, resolution, tiny_base, tmp_path):
    result = _measure(model, resolution, tiny_base if model == "tiny" else tmp_path)
    error = abs(result["estimate"] - result["measured"]) / result["measured"]
    print(f"\n{model} {resolution}px: estimate {result['estimate'] / MIB:.0f} MiB, measured "
          f"{result['measured'] / MIB:.0f} MiB ({error:+.1%}) {result['parts']}")
    assert error <= 0.15


@pytest.mark.parametrize("method", ["infusion", "textual-inversion"])
def test_estimate_for_the_other_methods_is_within_15_percent(tiny_base, method):
    """Each method says what a step trains and attaches (``memory_needs``); the planner dry-runs
    that, e.g. no K/V hooks for Textual Inversion (with them its estimate was 16 % high)."""
    result = _measure("tiny", 256, tiny_base, method)
    assert abs(result["estimate"] - result["measured"]) / result["measured"] <= 0.15


def test_estimate_for_output_preservation_is_within_15_percent(tiny_base):
    """Output preservation's class-prompt rows join the step's UNet batch (``MemoryNeeds.unet_rows``),
    and its teacher's forward runs without gradient: the planner dry-runs the bigger batch."""
    result = _measure("tiny", 256, tiny_base, preservation="output")
    plain = _measure("tiny", 256, tiny_base)
    assert result["measured"] > plain["measured"] and result["estimate"] > plain["estimate"]
    assert abs(result["estimate"] - result["measured"]) / result["measured"] <= 0.15


def _limit_for(total: int) -> int:
    """The smallest limit (MiB) under which an estimate of ``total`` bytes fits."""
    return int(total / HEADROOM / MIB) + 1


@pytest.mark.slow  # plans and trains twice (~16 s)
def test_auto_picks_checkpointing_then_accumulation_and_still_trains(tiny_base, tmp_path):
    host = load_host(tiny_base, device="cpu")
    base = TrainConfig(steps=2, resolution=256, batch_size=2)

    def total(**changes):
        config = TrainConfig.from_dict({**base.to_dict(), **changes})
        return estimate(host, config, ClassDiffusionMethod, images=4, class_images=0, concepts=1).total

    plain, checkpointed = total(), total(gradient_checkpointing=True)
    halved = total(gradient_checkpointing=True, batch_size=1, gradient_accumulation=2)
    assert plain > checkpointed > halved
    for limit, expected in ((_limit_for(checkpointed), (True, 2, 1)), (_limit_for(halved), (True, 1, 2))):
        config = TrainConfig.from_dict({**base.to_dict(), "memory": "auto", "memory_limit_mib": limit})
        run = TrainingRun(load_host(tiny_base, device="cpu"), [dog()], config, images=[make_images(4)])
        picked = (run.config.gradient_checkpointing, run.config.batch_size, run.config.gradient_accumulation)
        assert picked == expected, (limit, run.memory_plan.describe())
        assert run.memory_plan.changes and "memory plan" in " ".join(run.warnings)
        result = train(load_host(tiny_base, device="cpu"), [dog()], config, images=[make_images(4)],
                       out=tmp_path / f"{limit}.safetensors")
        assert result.concept.meta.config["batch_size"] == expected[1] and len(result.concept.history) == 2
    config = TrainConfig.from_dict({**base.to_dict(), "memory": "auto", "memory_limit_mib": _limit_for(halved) - 8})
    with pytest.raises(InvalidInputError, match="Not enough memory") as error:
        TrainingRun(load_host(tiny_base, device="cpu"), [dog()], config, images=[make_images(4)])
    assert "GiB" in str(error.value) and "resolution" in str(error.value)


def test_check_mode_warns_but_changes_nothing(tiny_base):
    config = TrainConfig(steps=2, resolution=128, memory="check", memory_limit_mib=1)
    run = TrainingRun(load_host(tiny_base, device="cpu"), [dog()], config, images=[make_images(2)])
    assert run.config == config and any("does NOT fit" in w for w in run.warnings)
    infusion = estimate(load_host(tiny_base, device="cpu"), TrainConfig.for_method("infusion", resolution=128),
                        InfusionMethod, images=2, class_images=0, concepts=1)
    assert infusion.trained < 4096 * 16
