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


def test_picker_validation_counts_agreement_against_the_ground_truth():
    """benchmarks/toyworld_picker.py: a choice agrees when its ground truth is ≥ 90 % of the run's best;
    a run scoring 0 at every step is counted apart; chance is the share of good steps."""
    import toyworld_picker as validation

    def row(step, truth, clip_i, clip_t, context):
        return {"step": step, "ground_truth": truth, "clip_i": clip_i, "clip_t": clip_t, "context": context}

    learnt = {"instance": "a", "seed": 1, "rows": [
        row(100, 0.10, 0.50, 0.90, 0.90), row(200, 0.40, 0.70, 0.85, 0.60), row(400, 0.38, 0.80, 0.60, 0.80),
        row(800, 0.05, 0.95, 0.40, 0.40)]}
    flat = {"instance": "b", "seed": 1, "rows": [row(s, 0.0, 0.5, 0.5, 0.5) for s in (100, 200, 400, 800)]}
    result = validation.agreement([learnt, flat], tolerance=0.5)
    assert result["runs"] == 2 and result["decidable"] == 1 and result["undecidable"] == ["b-seed1"]
    strategies = result["strategies"]
    # CLIP-T keeps ≥ 0.65 at 100, 200 → best CLIP-I there is 200 (0.40 = the best): agrees
    assert learnt["chosen"]["picker (clip_t)"] == 200 and strategies["picker (clip_t)"]["agree"] == 1
    # context keeps ≥ 0.65 at 100, 400 → 400 (0.38 ≥ 0.9 × 0.40): agrees
    assert learnt["chosen"]["picker (context)"] == 400 and strategies["picker (context)"]["rate"] == 1.0
    assert strategies["last step"]["agree"] == 0 and strategies["last step"]["share_of_best"] == 0.125
    assert strategies["fixed step 400"]["agree"] == 1
    assert strategies["chance (a step at random)"]["agree"] == 0.5  # 2 of 4 steps are within 10 %


def test_picker_validation_rank_correlation():
    import toyworld_picker as validation

    assert validation.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert validation.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert validation.spearman([1, 1, 1], [1, 2, 3]) is None
    assert validation._ranks([5.0, 1.0, 5.0]) == [2.5, 1.0, 2.5]
    # ties: scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138
    assert validation.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)


def test_tea_rows_share_the_custom_diffusion_training():
    """TEA changes sampling only: its rows are scored on the λ = 0 concept of the same job, and every
    other variant is trained once per instance and seed."""
    jobs = table.training_jobs(table.VARIANTS, ["a", "b"], (1, 2), 400, "w")
    samplings = [label for job in jobs for label, _ in job["samplings"]]
    assert sorted(samplings) == sorted(v[0] for v in table.VARIANTS for _ in range(4))
    tea_jobs = [job for job in jobs if any("TEA" in label for label, _ in job["samplings"])]
    assert len(tea_jobs) == 4 and all(job["variant"][0] == "Custom Diffusion (λ=0)" for job in tea_jobs)
    assert [rho for _, rho in tea_jobs[0]["samplings"]] == [0.0, 0.2, 0.5]
    assert len(jobs) == 4 * (len(table.VARIANTS) - 2)


def test_a_merge_replaces_only_the_rows_it_measures_again():
    """Adding training seeds 2 and 3 to variants measured at seed 1 keeps their seed-1 rows and
    every other variant's rows; a row is replaced only by a rerun of the same variant, instance and seed."""
    variants = [v for v in table.VARIANTS if "TEA" in v[0] or "Output" in v[0]]
    earlier = [{"variant": v[0], "instance": name, "seed": seed}
               for v in table.VARIANTS for name in ("a", "b") for seed in (1, 2, 3)
               if seed == 1 or v in table.VARIANTS and v not in variants]
    earlier.append({"variant": variants[0][0], "instance": "a", "seed": 2})  # measured before: replaced
    jobs = table.training_jobs(variants, ["a", "b"], (2, 3), 400, "w")
    kept = table.rows_not_rerun(earlier, jobs)
    assert len(kept) == len(earlier) - 1
    assert {"variant": variants[0][0], "instance": "a", "seed": 2} not in kept
    assert all(r in kept for r in earlier if r["seed"] == 1)
    rerun = {(label, job["instance"], job["seed"]) for job in jobs for label, _ in job["samplings"]}
    assert len(rerun) == len(variants) * 2 * 2


def test_the_named_bound_prompts_each_instance_look_in_whole_world_words():
    """toyworld_ceiling.py --named: the instance's halves named left first, as v2.1's captions
    name a two-half look ("red blue star"), each word one token of the world's tokenizer (no word
    split into characters, which would measure an untrained spelling, not the look's name)."""
    import toyworld_ceiling as ceiling
    from classdiffusion.toyworld.base import base_path
    from classdiffusion.toyworld.world import INSTANCES
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base_path() / "tokenizer")
    assert ceiling.named_phrase("red_blue_star") == "red blue star"
    for look in INSTANCES:
        phrase = ceiling.named_phrase(look.name)
        assert phrase.split() == [look.first, look.second, look.cls]
        assert len(tokenizer(phrase, add_special_tokens=False).input_ids) == 3, phrase


def test_the_ceiling_trains_every_unet_weight_and_nothing_else():
    """benchmarks/toyworld_ceiling.py: every UNet weight moves, the text encoder (but for the added
    token's row, set once from the rare initializer) and the VAE do not; the loss is finite."""
    import torch

    import toyworld_ceiling as ceiling
    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.toyworld.base import base_path
    from classdiffusion.toyworld.evaluate import instance_pictures

    pipe = build_pipeline(base_path(), device="cpu")
    before = {name: {k: v.clone() for k, v in part.state_dict().items()}
              for name, part in (("unet", pipe.unet), ("text", pipe.text_encoder), ("vae", pipe.vae))}
    losses = ceiling.train_whole_unet(pipe, instance_pictures("yellow_purple_ball", count=2), "ball", steps=2,
                                      learning_rate=1e-4, seed=0)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after_unet = pipe.unet.state_dict()
    # Adam's first step moves every weight with a gradient by about the learning rate (weight
    # decay alone moves it a millionth of that): every UNet tensor took a gradient step.
    still = [k for k, v in before["unet"].items() if (after_unet[k] - v).abs().max() < 0.5e-4]
    assert not still, still
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(value, before["vae"][key]), key
    embeddings = "embeddings.token_embedding.weight"
    for key, value in pipe.text_encoder.state_dict().items():
        if key.endswith(embeddings):
            assert torch.equal(value[:-1], before["text"][key]) and value.shape[0] == before["text"][key].shape[0] + 1
        else:
            assert torch.equal(value, before["text"][key]), key


def test_curve_pairs_lambda_one_against_zero_per_step_and_on_the_fall():
    """The curve's question — does SPL change how composition falls with steps? — is answered on
    pairs of the same instance and seed: per step, and on the fall from the first to the last step."""
    def curve_row(instance: str, weight: float, step: int, composition: float) -> dict:
        return {"instance": instance, "seed": 1, "spl_weight": weight, "step": step,
                "composition": composition, "composition_joint": 0.1, "identity": 0.3}

    rows = []
    for instance, end_without, end_with in (("a", 0.6, 0.8), ("b", 0.7, 0.7), ("c", 0.5, 0.9)):
        for weight, end in ((0.0, end_without), (1.0, end_with)):
            rows += [curve_row(instance, weight, 100, 1.0), curve_row(instance, weight, 1600, end)]
    diffs = table.curve_paired(rows)
    assert diffs["100"]["composition"] == [0.0, 0.0, 0, 0]
    per_instance = [0.2, 0.0, 0.4]
    mean, se, up, down = diffs["fall 100→1600"]["composition"]
    assert mean == pytest.approx(statistics.fmean(per_instance))
    assert se == pytest.approx(statistics.stdev(per_instance) / 3 ** 0.5)
    assert (up, down) == (2, 0)
    assert diffs["1600"]["composition"][:2] == pytest.approx([mean, se])
    assert "fall 100→1600" in table.curve_paired_markdown(diffs)


def test_a_concept_taken_apart_keeps_only_the_part_asked_for():
    """toyworld_recipe.py --parts: "token" applies the learned token with the K/V untouched; "kv"
    applies the K/V deltas with the token back at its initializer's vector; "both" is the concept
    as trained — measured on the UNet and text encoder the concept is applied to."""
    import torch

    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.concept.file import Concept
    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.hosts.diffusers_host import load_host
    from classdiffusion.model.kv import base_fingerprint, cross_attention_weights
    from classdiffusion.toyworld.base import base_path

    pipe = build_pipeline(base_path(), device="cpu")
    weights = {k: v.detach().clone() for k, v in cross_attention_weights(pipe.unet, "kv").items()}
    gen = torch.Generator().manual_seed(0)
    deltas = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
    learned = torch.randn(1, pipe.text_encoder.get_input_embeddings().weight.shape[1], generator=gen)
    concept = Concept(deltas=deltas, token_vectors=learned, tokens=["<sks>"], class_words=["star"],
                      meta={"train_mode": "kv", "base_fingerprint": base_fingerprint(weights)})
    host = load_host(base_path(), device="cpu")
    start = host.word_embedding("ktn")  # what run_curve resets the token to: its start in training
    host.close()

    def applied(part):
        handle = apply_concept(pipe.unet, table.concept_part(concept, part, start), text_encoder=pipe.text_encoder,
                               tokenizer=pipe.tokenizer)
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sks>")]
        moved = {k: (v.detach() - weights[k]).abs().max().item() for k, v in cross_attention_weights(pipe.unet, "kv").items()}
        row = row.detach().float().clone()
        handle.remove()
        return row, moved

    row, moved = applied("token")
    assert torch.allclose(row, learned[0].to(row.dtype), atol=1e-3) and max(moved.values()) == 0
    row, moved = applied("kv")
    assert torch.allclose(row, start, atol=1e-3) and min(moved.values()) > 1e-3
    row, moved = applied("both")
    assert torch.allclose(row, learned[0].to(row.dtype), atol=1e-3) and min(moved.values()) > 1e-3
    assert table.concept_part(concept, "both", start) is concept and concept.deltas is deltas  # nothing changed
    with pytest.raises(ValueError, match="part must be"):
        table.concept_part(concept, "everything", start)


@pytest.mark.slow
def test_the_recipe_search_with_class_images_trains_the_prior_term():
    """toyworld_recipe.py --class-images: the base's own class pictures reach the trainer as prior
    preservation (the row records the prior term the run trained with)."""
    from classdiffusion.toyworld.base import WEIGHTS

    rows = table.run_curve({"instance": "yellow_purple_ball", "seed": 0, "spl_weight": 1.0, "steps": (1,),
                            "threads": 2, "weights": str(WEIGHTS), "recipe": {}, "class_images": 2})
    assert len(rows) == 1 and rows[0]["class_images"] == 2
    assert 0 < rows[0]["prior_loss"] < 10


def test_the_parts_summary_pairs_each_part_with_its_own_reference():
    """toyworld_table.py --parts: token only pairs with the base of the same instance and seed,
    K/V only with the concept as trained, and each part at λ = 1 with the same part at λ = 0."""
    rows = []
    for k, instance in enumerate("abcd"):
        for seed in (1, 2):
            base = 0.1 * k + 0.01 * seed
            rows.append({"instance": instance, "seed": seed, "spl_weight": None, "part": "base",
                         **{m: base for m in table.PARTS_METRICS}})
            for weight in (0.0, 1.0):
                offsets = {"both": 0.3, "token": 0.0 if weight else -0.2, "kv": 0.3 + (0.05 if not weight else 0.0)}
                for part in table.CONCEPT_PARTS:
                    rows.append({"instance": instance, "seed": seed, "spl_weight": weight, "part": part,
                                 **{m: base + offsets[part] for m in table.PARTS_METRICS}})
    summary = table.parts_summary(rows)
    paired = summary["paired"]
    assert paired["λ=1: token only − base"]["composition_class"] == [0.0, 0.0, 0, 0]
    assert paired["λ=0: token only − base"]["composition_class"][:2] == pytest.approx([-0.2, 0.0])
    assert paired["λ=0: token only − base"]["composition_class"][2:] == [0, 8]
    assert paired["λ=0: K/V only − as trained"]["identity"][:3] == pytest.approx([0.05, 0.0, 8])
    assert paired["token only: λ=1 − λ=0"]["composition_joint"][:2] == pytest.approx([0.2, 0.0])
    assert summary["cells"]["base (class prompt)"]["identity"][0] == pytest.approx(statistics.fmean(
        r["identity"] for r in rows if r["part"] == "base"))
    assert "| λ=1, token only |" in table.parts_markdown(summary)
