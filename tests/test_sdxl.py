"""SDXL: one training step equals an official-style SDXL step written out independently, and the
SDXL path's files, checks and errors.

The reference follows Adobe's SDXL Custom Diffusion script (adobe-research/custom-diffusion,
``src/diffusers_training_sdxl.py``): the modifier token added to *both* tokenizers and both
embedding matrices resized and trained whole (other rows' gradients zeroed); diffusers'
``CustomDiffusionAttnProcessor2_0`` holding the trained K/V of every attn2 (2048-wide context);
the context from both encoders' penultimate hidden states side by side; the pooled embedding and
the (res, res, 0, 0, res, res) size/crop ids as added conditioning; the official masked loss;
clipping and AdamW on the full weights. SPL is written from its statement: 1 − cos of the EOS
features (each encoder's last hidden state after its final norm, at the first end-of-text token)
of "a photo of a <sks> dog" and "a photo of a dog", per encoder then averaged ("mean") or on the
features side by side ("concat"). The pooled embedding is bigG's projection at that first EOS too
(never the argmax of the ids, which would be the new token).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from classdiffusion.errors import BaseMismatchError, BaseModelError
from classdiffusion.hosts.diffusers_host import load_host
from classdiffusion.model.tiny import build_tiny_sdxl_base
from classdiffusion.run.train import TrainingRun
from helpers import dog, make_images, small_config
from helpers import close, processor_kv_weights


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory) -> Path:
    return build_tiny_sdxl_base(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl", seed=0)


@pytest.fixture
def sdxl_host(sdxl_base):
    return load_host(sdxl_base, device="cpu")


class OfficialSDXLStep:
    """Adobe's SDXL Custom Diffusion step on the same base, holding the run's trained tensors."""

    def __init__(self, base: Path, run: TrainingRun, token: str = "<sks>"):
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.tokenizers = [CLIPTokenizer.from_pretrained(base / "tokenizer"),
                           CLIPTokenizer.from_pretrained(base / "tokenizer_2")]
        self.encoders = [CLIPTextModel.from_pretrained(base / "text_encoder"),
                         CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")]
        self.unet = UNet2DConditionModel.from_pretrained(base / "unet")
        for model in (*self.encoders, self.unet):
            model.requires_grad_(False)
        start = run.method.token_vectors[0].detach()
        parts = start.split([768, 1280])
        self.token_ids, self.embeddings = [], []
        for tokenizer, encoder, part in zip(self.tokenizers, self.encoders, parts):
            tokenizer.add_tokens([token])
            token_id = tokenizer.convert_tokens_to_ids(token)
            encoder.resize_token_embeddings(len(tokenizer))
            embedding = encoder.get_input_embeddings().weight
            with torch.no_grad():
                embedding[token_id] = part
            embedding.requires_grad_(True)
            self.token_ids.append(token_id)
            self.embeddings.append(embedding)

        base_params = dict(self.unet.named_parameters())
        procs = {}
        for name in self.unet.attn_processors:
            layer = name.removesuffix(".processor")
            hidden = base_params[layer + ".to_q.weight"].shape[0]
            cross = name.endswith("attn2.processor")
            proc = CustomDiffusionAttnProcessor2_0(train_kv=cross, train_q_out=False, hidden_size=hidden,
                                                   cross_attention_dim=2048 if cross else None)
            if cross:
                with torch.no_grad():
                    for kind in ("k", "v"):
                        key = f"{layer}.to_{kind}.weight"
                        getattr(proc, f"to_{kind}_custom_diffusion").weight.copy_(
                            base_params[key] + run.method.deltas[key].detach())
            procs[name] = proc
        self.unet.set_attn_processor(dict(procs))
        self.procs = procs

    def _ids(self, tokenizer, prompts):
        return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids

    def encode_prompt(self, prompts):
        """Adobe's ``encode_prompt``: penultimate hidden states side by side; pooled from bigG
        (here at the first EOS explicitly)."""
        contexts, finals, pooled = [], [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = self._ids(tokenizer, prompts)
            out = encoder(ids, output_hidden_states=True)
            contexts.append(out.hidden_states[-2])
            inner = getattr(encoder, "text_model", encoder)  # transformers 4 / 5
            last = inner.final_layer_norm(out.hidden_states[-1])
            eos = last[torch.arange(len(prompts)), (ids == tokenizer.eos_token_id).int().argmax(-1)]
            finals.append(eos)
            if hasattr(encoder, "text_projection"):
                pooled = encoder.text_projection(eos)
        return torch.cat(contexts, -1), pooled, finals

    def loss(self, batch, spl_prompt, class_prompt, spl_weight, combine):
        n = len(batch.prompts)
        context, pooled, _ = self.encode_prompt(batch.prompts)
        res = batch.noisy.shape[-1] * 8
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(n, 1)
        pred = self.unet(batch.noisy, batch.timesteps, context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        mse = F.mse_loss(pred.float(), batch.noise.float(), reduction="none")
        recon = ((mse * batch.mask).sum([1, 2, 3]) / batch.mask.sum([1, 2, 3])).mean()
        _, _, token_eos = self.encode_prompt([spl_prompt])
        _, _, class_eos = self.encode_prompt([class_prompt])
        if combine == "mean":
            spl = torch.stack([1 - F.cosine_similarity(t, c) for t, c in zip(token_eos, class_eos)]).mean()
        else:
            spl = (1 - F.cosine_similarity(torch.cat(token_eos, -1), torch.cat(class_eos, -1))).mean()
        return recon + spl_weight * spl, recon, spl

    def kv_weights(self) -> dict[str, torch.nn.Parameter]:
        return processor_kv_weights(self.procs)

    def token_row(self, attr: str = "data") -> torch.Tensor:
        return torch.cat([getattr(e, attr)[i] for e, i in zip(self.embeddings, self.token_ids)])


def _mid_run(host, **settings) -> TrainingRun:
    run = TrainingRun(host, [dog()], small_config(**settings), [make_images()], None)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained state mid-run, not the zero start: every term is non-trivial
        for delta in run.method.deltas.values():
            delta.normal_(0.0, 0.02)
        run.method.token_vectors.add_(torch.randn_like(run.method.token_vectors) * 0.05)
    return run


@pytest.mark.parametrize("combine", ["mean", "concat"])
def test_sdxl_step_equals_the_official_style_step(sdxl_host, sdxl_base, combine):
    run = _mid_run(sdxl_host, spl_encoders=combine)
    assert len(run.method.deltas) == 16 and run.method.token_vectors.shape == (1, 2048)
    batch = run.sample_batch(3)
    batch.mask = torch.zeros_like(batch.mask)
    batch.mask[0, :, 1:6, 2:7] = 1.0
    batch.mask[1, :, 0:8, 0:3] = 1.0
    detach = sdxl_host.attach_deltas(run.method.deltas)
    try:
        ours = run.losses(batch)
        ours.total.backward()
    finally:
        detach()
    official = OfficialSDXLStep(sdxl_base, run)
    total, recon, spl = official.loss(batch, run.method.spl_prompts[0], run.concepts[0].class_phrase(), 1.0, combine)
    total.backward()
    close(ours.terms["recon"].detach(), recon.detach(), "recon")
    close(ours.terms["spl"].detach(), spl.detach(), f"SPL ({combine})")
    close(ours.total.detach(), total.detach(), "total")
    kv = official.kv_weights()
    assert set(kv) == set(run.method.deltas)
    for name, delta in run.method.deltas.items():
        close(delta.grad, kv[name].grad, name)
    close(run.method.token_vectors.grad[0], official.token_row("grad"), "token (both encoders)")


def test_sdxl_spl_combinations_differ(sdxl_host):
    """The two ways to join the encoders give different losses (bigG dominates the concatenation)."""
    values = {}
    for combine in ("mean", "concat"):
        run = _mid_run(sdxl_host, spl_encoders=combine)
        with torch.no_grad():
            values[combine] = float(run.losses(run.sample_batch(0)).terms["spl"])
    assert abs(values["mean"] - values["concat"]) > 1e-6, values


def test_sdxl_optimizer_step_equals_the_official_adamw_step(sdxl_host, sdxl_base):
    """Clipping over both embedding matrices and the K/V, AdamW with its decay on the full weights."""
    config_settings = dict(learning_rate=1e-3, weight_decay=5.0, adam_epsilon=1e-3)
    run = _mid_run(sdxl_host, **config_settings)
    config = run.config
    base = {name: weight.detach().clone() for name, weight in run.base_weights.items()}
    batch = run.sample_batch(0)
    official = OfficialSDXLStep(sdxl_base, run)
    detach = sdxl_host.attach_deltas(run.method.deltas)
    try:
        run.optimize(run.losses(batch).total)
    finally:
        detach()
    total, *_ = official.loss(batch, run.method.spl_prompts[0], run.concepts[0].class_phrase(), 1.0,
                              run.config.spl_encoders)
    total.backward()
    with torch.no_grad():  # Adobe's script: zero every other row's gradient in both tables, clip, step
        for embedding, token_id in zip(official.embeddings, official.token_ids):
            keep = torch.arange(embedding.shape[0]) == token_id
            embedding.grad[~keep] = 0
    trained = [p for proc in official.procs.values() for p in proc.parameters()]
    params = official.embeddings + trained
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay,
                      eps=config.adam_epsilon).step()
    kv_after = official.kv_weights()
    for name, delta in run.method.deltas.items():
        assert torch.allclose(base[name].double() + delta.double(), kv_after[name].double(), atol=1e-7, rtol=0), name
    assert torch.allclose(run.method.token_vectors[0].double(), official.token_row().double(), atol=1e-7, rtol=0)


def test_sdxl_pooled_embedding_follows_the_token_at_the_first_eos(sdxl_host):
    """The pooled embedding changes with the token (its gradient reaches the bigG part) and is
    read at the end of text, not at the new token's id (the argmax trap)."""
    sdxl_host.add_tokens(["<sks>"])
    vector = sdxl_host.word_embedding("dog").requires_grad_(True)
    features = sdxl_host.text.encode(["a photo of a <sks> dog"], {"<sks>": vector})
    features.pooled.sum().backward()
    assert vector.grad[768:].abs().sum() > 0  # bigG's part moves the pooled embedding
    assert vector.grad[:768].abs().sum() == 0  # CLIP-L has no say in it
    ids = sdxl_host.token_ids(["a photo of a <sks> dog"])[0]
    eos = int((ids == sdxl_host.text.encoders[1].tokenizer.eos_token_id).int().argmax())
    assert int(ids.argmax()) != eos  # the new token has the highest id
    encoder = sdxl_host.text.encoders[1]
    encoder.injector.vectors = {"<sks>": vector.detach()[768:]}
    try:
        with torch.no_grad():
            last = encoder.model(ids[None]).last_hidden_state[0]
    finally:
        encoder.injector.vectors = {}
    assert torch.allclose(features.pooled[0], encoder.model.text_projection(last[eos]), atol=1e-6)
    assert not torch.allclose(features.pooled[0], encoder.model.text_projection(last[int(ids.argmax())]), atol=1e-3)


def test_sdxl_concept_file_embedding_and_family_checks(sdxl_host, sdxl_base, host, tmp_path):
    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.concept import embedding_tensors, load_concept, save_embeddings
    from classdiffusion.concept.generate import build_pipeline
    from classdiffusion.run.train import train

    result = train(sdxl_host, [dog(images=[])], small_config(steps=2), images=[make_images()],
                   out=tmp_path / "c.safetensors")
    concept = load_concept(result.path)
    assert concept.family == "sdxl" and concept.token_vectors.shape == (1, 2048)
    assert torch.equal(concept.token_vectors, result.concept.token_vectors)
    (path,) = save_embeddings(concept, tmp_path, "sks")
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    assert torch.equal(torch.cat([saved["clip_l"], saved["clip_g"]], -1), concept.token_vectors)
    assert [t for t, _ in embedding_tensors(concept)] == ["<sks>"]

    pipe = build_pipeline(sdxl_base, device="cpu")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "attn2.to_" in n}
    handle = apply_concept(pipe.unet, concept, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                           text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    for embedding_owner, part in ((pipe.text_encoder, concept.token_vectors[0, :768]),
                                  (pipe.text_encoder_2, concept.token_vectors[0, 768:])):
        table = embedding_owner.get_input_embeddings().weight
        assert torch.equal(table[-1], part)
    handle.remove()
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters() if n in before)

    # A concept of one family on the other: refused by name, before any weight changes.
    sd15_unet = host.unet
    sd15_before = {n: p.detach().clone() for n, p in sd15_unet.named_parameters()}
    with pytest.raises(BaseMismatchError, match="Stable Diffusion XL base.*Stable Diffusion 1.x"):
        apply_concept(sd15_unet, concept)
    assert all(torch.equal(p, sd15_before[n]) for n, p in sd15_unet.named_parameters())
    sd15_result = train(host, [dog()], small_config(steps=1), images=[make_images()], out=tmp_path / "s.safetensors")
    with pytest.raises(BaseMismatchError, match="Stable Diffusion 1.x base.*Stable Diffusion XL"):
        apply_concept(pipe.unet, sd15_result.concept)


def test_sdxl_memory_estimate_matches_a_real_step(sdxl_host):
    """The planner's estimate of a whole SDXL run (two text encoders with gradient, added
    conditioning, the 2048-wide K/V) against what a real steady step holds on the CPU: every
    resident storage plus the live-tensor peak of the step, as tests/test_memory.py does for SD1.5."""
    from classdiffusion.run.memory import LiveBytes

    run = TrainingRun(sdxl_host, [dog()], small_config(batch_size=2, gradient_accumulation=1, memory="check"),
                      [make_images(3, size=(96, 96))], None)
    detach = run.method.attach()
    try:
        run.step(0)  # AdamW's state exists from the first step on
        tensors = [t for m in (sdxl_host.unet, *sdxl_host.text.models, sdxl_host.vae)
                   for t in list(m.parameters()) + list(m.buffers())]
        tensors += [t for pair in run.bank.variants.values() for t in pair] + list(run.bank.canvas)
        tensors += run.params + [v for state in run.optimizer.state.values() for v in state.values()
                                 if torch.is_tensor(v)]
        resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        with LiveBytes(known=tensors) as live:
            start = live.current
            run.step(1)
    finally:
        detach()
    measured = sum(resident.values()) + live.peak - start
    estimate = run.memory_plan.estimate.total
    print(f"SDXL run: estimate {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(estimate - measured) / measured <= 0.15, (estimate, measured)


def test_other_families_are_refused_by_name(sdxl_base, tmp_path):
    """An SDXL refiner (bigG alone, 1280-wide context) and a UNet without SDXL's added conditioning
    get a clear 'not supported yet', never a guess."""
    from diffusers import UNet2DConditionModel

    from classdiffusion.hosts.diffusers_host import DiffusersHost, load_base_components

    parts = load_base_components(sdxl_base)
    plain = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                 cross_attention_dim=2048, attention_head_dim=8, norm_num_groups=8)
    with pytest.raises(BaseModelError, match="not supported yet.*added conditioning none"):
        DiffusersHost(**{**parts, "unet": plain}, device="cpu")
    with pytest.raises(BaseModelError, match="tokenizer_2 but not.*needs both"):
        (tmp_path / "half").mkdir()
        for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler", "tokenizer_2"):
            (tmp_path / "half" / name).mkdir()
        load_base_components(tmp_path / "half")


@pytest.fixture
def sdxl_concept(sdxl_host, tmp_path):
    from classdiffusion.concept import load_concept
    from classdiffusion.run.train import train

    result = train(sdxl_host, [dog()], small_config(steps=2, learning_rate=1e-3), images=[make_images()],
                   out=tmp_path / "sdxl.safetensors")
    return load_concept(result.path)


def test_sdxl_export_import_round_trip_and_diffusers_loads_it(sdxl_base, sdxl_concept, tmp_path):
    """Export in diffusers' Custom Diffusion layout (2048-wide K/V, {clip_l, clip_g} token files):
    diffusers' own processors and two load_textual_inversion calls compute what the applied
    concept computes; importing gives back the same deltas and token, bit-exactly."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from classdiffusion.concept.apply import apply_concept_to_pipeline
    from classdiffusion.concept.interop import WEIGHTS_BIN, export_custom_diffusion, import_custom_diffusion
    from classdiffusion.model.kv import cross_attention_weights

    theirs_pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_base))
    base = cross_attention_weights(theirs_pipe.unet, "kv")
    out = tmp_path / "export"
    export_custom_diffusion(sdxl_concept, base, out)
    imported = import_custom_diffusion(out, base, ["dog"])
    assert imported.family == "sdxl" and imported.tokens == ["<sks>"]
    assert torch.equal(imported.token_vectors, sdxl_concept.token_vectors)
    for name, delta in sdxl_concept.deltas.items():
        assert torch.equal(base[name] + imported.deltas[name], base[name] + delta), name

    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([321])
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    prompt = "a photo of a <sks> dog"

    def eps(pipe):
        context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        return pipe.unet(x, t, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    tokens = load_file(str(out / "<sks>.safetensors"))
    with torch.no_grad():
        theirs_pipe.unet.set_attn_processor(
            theirs_pipe.unet._process_custom_diffusion(torch.load(out / WEIGHTS_BIN, weights_only=True)))
        theirs_pipe.load_textual_inversion(tokens["clip_l"], token="<sks>", text_encoder=theirs_pipe.text_encoder,
                                           tokenizer=theirs_pipe.tokenizer)
        theirs_pipe.load_textual_inversion(tokens["clip_g"], token="<sks>", text_encoder=theirs_pipe.text_encoder_2,
                                           tokenizer=theirs_pipe.tokenizer_2)
        theirs = eps(theirs_pipe)
        ours_pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_base))
        apply_concept_to_pipeline(ours_pipe, sdxl_concept)
        ours = eps(ours_pipe)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_adobe_sdxl_delta_bin_imports_exactly(sdxl_host, sdxl_base, tmp_path):
    """Adobe's SDXL script's ``delta.bin`` (its CustomDiffusionXLPipeline.save_pretrained layout):
    applying the imported concept reproduces its trained K/V bit for bit and its two token rows."""
    from diffusers import UNet2DConditionModel

    from classdiffusion.concept.apply import apply_concept
    from classdiffusion.concept.interop import import_custom_diffusion
    from classdiffusion.model.kv import cross_attention_weights

    unet = UNet2DConditionModel.from_pretrained(str(sdxl_base / "unet"))
    gen = torch.Generator().manual_seed(5)
    trained = {name: (w.detach() + 1e-3 * torch.randn(w.shape, generator=gen)).clone()
               for name, w in unet.named_parameters() if "attn2.to_k" in name or "attn2.to_v" in name}
    rows = [torch.randn(768, generator=gen), torch.randn(1280, generator=gen)]
    torch.save({"unet": trained, "modifier_token": {"<new1>": rows}}, tmp_path / "delta.bin")
    concept = import_custom_diffusion(tmp_path / "delta.bin", cross_attention_weights(unet, "kv"), ["dog"])
    assert concept.family == "sdxl" and concept.tokens == ["<new1>"]
    assert torch.equal(concept.token_vectors[0], torch.cat(rows))
    apply_concept(unet, concept)
    params = dict(unet.named_parameters())
    assert all(torch.equal(params[name], weight) for name, weight in trained.items())
    with pytest.raises(Exception, match="768.*1280|2048"):
        torch.save({"unet": trained, "modifier_token": {"<new1>": rows[0]}}, tmp_path / "one_row.bin")
        import_custom_diffusion(tmp_path / "one_row.bin", cross_attention_weights(unet, "kv"), ["dog"])


def test_sdxl_checkpoints_resume_and_previews(sdxl_base, tmp_path):
    """Step checkpoints on SDXL resume to the uninterrupted result; validation previews sample
    through SDXL's added conditioning."""
    from classdiffusion.concept import load_concept, run_files
    from classdiffusion.run.train import train

    config = small_config(steps=4, save_every=2, validation_every=4, validation_steps=2, learning_rate=1e-3)
    straight = train(load_host(sdxl_base, device="cpu"), [dog()], config, images=[make_images()],
                     out=tmp_path / "a" / "c.safetensors")
    assert straight.validation_grid is not None and straight.validation_grid.size[0] > 0
    step2 = dict(run_files(straight.path)[1])[2]
    resumed = train(load_host(sdxl_base, device="cpu"), [dog()], config, images=[make_images()],
                    out=tmp_path / "b" / "c.safetensors", resume=load_concept(step2))
    for name, delta in straight.concept.deltas.items():
        assert torch.allclose(resumed.concept.deltas[name], delta, atol=1e-7), name
    assert torch.allclose(resumed.concept.token_vectors, straight.concept.token_vectors, atol=1e-7)


@pytest.mark.parametrize("method", ["infusion", "textual-inversion"])
def test_other_methods_train_on_sdxl(sdxl_host, method, tmp_path):
    """Infusion: a value residual on every attn2 of the SDXL UNet; Textual Inversion: one [768 | 1280] token."""
    from classdiffusion.config import TrainConfig
    from classdiffusion.methods import method_class
    from classdiffusion.run.train import train

    token = method_class(method).concept_token("<sks>")
    config = TrainConfig.for_method(method, steps=2, resolution=64, batch_size=1)
    result = train(sdxl_host, [dog(token=token)], config, images=[make_images()], out=tmp_path / "m.safetensors")
    concept = result.concept
    assert concept.family == "sdxl"
    if method == "infusion":
        assert len(concept.method_tensors) == 8 and all(r.abs().sum() > 0 for r in concept.method_tensors.values())
    else:
        assert concept.deltas == {} and concept.token_vectors.shape == (1, 2048)


@pytest.mark.slow
def test_memory_plans_script_plans_full_size_sdxl():
    """benchmarks/memory_plans.py on full-size SDXL (meta device): the parameter counts are SDXL's,
    and the planner's picks grow with the card (a small resolution keeps the test quick)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from memory_plans import markdown, meta_host, plans

    host = meta_host("sdxl", torch.float16)
    assert sum(p.numel() for p in host.unet.parameters()) == 2_567_463_684
    assert sum(w.numel() for w in host.cross_attention_weights("kv").values()) == 340_787_200
    assert host.family.name == "sdxl" and host.text_dim == 2048
    rows = plans("sdxl", [6, 40], resolution=256, mixed_precision="fp16")
    assert [row["fits"] for row in rows] == [False, True]
    assert not rows[1]["gradient_checkpointing"] and rows[1]["batch_size"] == 2
    assert "does not fit" in markdown(rows)


@pytest.mark.slow
def test_spl_choice_script_runs(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sdxl_spl_choice import VARIANTS, run

    report = run(steps=2, seeds=[0], learning_rate=1e-4)
    assert set(report["results"]) == set(VARIANTS)
    for result in report["results"].values():
        ranks = result["mean"]
        assert {"clip_l", "clip_g", "both"} == set(ranks)
        assert 1 <= ranks["both"]["rank"] <= result["runs"][0]["both"]["of"]


def test_infusion_concept_applies_to_an_sdxl_pipeline_only_at_its_word(sdxl_host, sdxl_base, tmp_path):
    """Applied to diffusers' SDXL pipeline, an Infusion concept changes ε for prompts with the class
    word and leaves every other prompt bit-identical (its hooks find the word in the CLIP-L columns
    of SDXL's 2048-wide context)."""
    from diffusers import StableDiffusionXLPipeline

    from classdiffusion.concept.apply import apply_concept_to_pipeline
    from classdiffusion.config import TrainConfig
    from classdiffusion.methods import method_class
    from classdiffusion.run.train import train

    config = TrainConfig.for_method("infusion", steps=2, resolution=64, batch_size=1, validation_every=2,
                                    validation_steps=2)
    token = method_class("infusion").concept_token("<sks>")
    result = train(sdxl_host, [dog(token=token)], config, images=[make_images()], out=tmp_path / "inf.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_base))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([400])
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])

    def eps(prompt):
        with torch.no_grad():
            context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            return pipe.unet(x, t, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    before = {p: eps(p) for p in ("a photo of a dog", "a photo of a cat")}
    handle = apply_concept_to_pipeline(pipe, result.concept)
    after = {p: eps(p) for p in before}
    handle.remove()
    assert not torch.equal(after["a photo of a dog"], before["a photo of a dog"])
    assert torch.equal(after["a photo of a cat"], before["a photo of a cat"])
    assert torch.equal(eps("a photo of a dog"), before["a photo of a dog"])  # removed: the base again
