"""The toy-world table's statistics: standard errors clustered by instance, paired differences
against λ = 0, Fisher "n/a" where it is zero by construction."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import toyworld_table as table  # noqa: E402


def row(variant: str, instance: str, seed: int, identity: float, joint: float, fisher=0.1) -> dict:
    values = {m: 0.5 for m in table.METRICS}
    values.update(identity=identity, composition_joint=joint, fisher=fisher)
    return {"variant": variant, "instance": instance, "seed": seed, **values, "base": dict(values, identity=0.0)}


def test_standard_errors_are_clustered_by_instance():
    """Three seeds of one instance are one observation: the SE is that of the per-instance means,
    not of the nine rows as if independent."""
    rows = [row("Custom Diffusion (λ=0)", inst, seed, value + 0.01 * seed, 0.2)
            for inst, value in (("a", 0.1), ("b", 0.5), ("c", 0.9)) for seed in (1, 2, 3)]
    mean, se = table.summarize(rows)["Custom Diffusion (λ=0)"]["identity"]
    per_instance = [0.12, 0.52, 0.92]
    assert mean == pytest.approx(statistics.fmean(per_instance))
    assert se == pytest.approx(statistics.stdev(per_instance) / 3 ** 0.5)
    naive = statistics.stdev([r["identity"] for r in rows]) / 9 ** 0.5
    assert se > naive * 1.5


def test_paired_differences_against_lambda_zero_are_clustered_too():
    rows = []
    for inst, shift in (("a", 0.1), ("b", 0.3), ("c", 0.2)):
        for seed in (1, 2):
            rows.append(row("Custom Diffusion (λ=0)", inst, seed, 0.4, 0.3))
            rows.append(row("ClassDiffusion (λ=1)", inst, seed, 0.4 + shift, 0.3 - shift / 2))
    diffs = table.paired(rows)["ClassDiffusion (λ=1)"]
    assert diffs["pairs"] == 6
    mean, se, up, down = diffs["identity"]
    assert mean == pytest.approx(0.2) and se == pytest.approx(statistics.stdev([0.1, 0.3, 0.2]) / 3 ** 0.5)
    assert (up, down) == (6, 0)
    assert diffs["composition_joint"][0] == pytest.approx(-0.1) and diffs["composition_joint"][3] == 6


def test_fisher_reads_n_a_where_it_is_undefined():
    rows = [row("Infusion", inst, 1, 0.1, 0.1, fisher=None) for inst in ("a", "b")]
    summary = table.summarize(rows)
    assert summary["Infusion"]["fisher"] is None
    infusion_line = next(line for line in table.markdown(summary).splitlines() if line.startswith("| Infusion |"))
    fisher_cell = infusion_line.split(" | ")[1 + table.METRICS.index("fisher")]
    assert fisher_cell == "n/a"


def test_the_recipe_is_searched_on_a_seed_the_table_never_trains():
    import toyworld_recipe as recipe

    from classdiffusion.toyworld.world import INSTANCES

    assert recipe.TUNING_SEED not in table.TABLE_SEEDS
    assert set(recipe.TUNING_INSTANCES) <= {i.name for i in INSTANCES}
