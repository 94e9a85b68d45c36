"""One training step of this trainer equals one step computed the way the official ClassDiffusion
code computes it (Rbrq03/ClassDiffusion, ``train_class_diffusion.py`` + ``utils/
semantic_preservation_loss.py``), on the same tiny base and identical inputs.

The official side is written out here independently: diffusers' own
``CustomDiffusionAttnProcessor2_0`` holding the trained K/V (which detaches the start-of-text
key/value), a resized embedding matrix with the token as a new row, the official loss reductions,
and its SPL encoder (the embedded sequence overwritten at the token's position, pooled at the
highest token id). The deliberate differences (SPL at the true EOS by default; SPL kept with prior
preservation) are applied to the reference where the test says so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from classdiffusion.run.train import TrainingRun
from helpers import close, dog, make_images, processor_kv_weights, small_config


class OfficialStep:
    """The official code's models and loss, holding the same trained tensors as a ``TrainingRun``."""

    def __init__(self, base, run: TrainingRun, token: str = "<sks>"):
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
        self.unet = UNet2DConditionModel.from_pretrained(base / "unet")
        for model in (self.text_encoder, self.unet):
            model.requires_grad_(False)
        # The official script: add the modifier token, resize, train the whole embedding matrix.
        self.tokenizer.add_tokens([token])
        self.token_id = self.tokenizer.convert_tokens_to_ids(token)
        self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        self.embedding = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            self.embedding[self.token_id] = run.method.token_vectors[0].detach()
        self.embedding.requires_grad_(True)

        base_params = dict(self.unet.named_parameters())
        procs = {}
        for name in self.unet.attn_processors:
            layer = name.removesuffix(".processor")
            hidden = base_params[layer + ".to_q.weight"].shape[0]
            if name.endswith("attn1.processor"):
                procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False,
                                                              hidden_size=hidden, cross_attention_dim=None)
                continue
            proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden,
                                                   cross_attention_dim=768)
            with torch.no_grad():
                for kind in ("k", "v"):
                    key = f"{layer}.to_{kind}.weight"
                    trained = base_params[key] + run.method.deltas[key].detach()
                    getattr(proc, f"to_{kind}_custom_diffusion").weight.copy_(trained)
            procs[name] = proc
        self.unet.set_attn_processor(dict(procs))  # diffusers pops from the dict it is given
        self.procs = procs

    def ids(self, prompts, padding="max_length"):
        return self.tokenizer(prompts, padding=padding, truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    def spl_feature(self, prompt: str, with_modifier: bool, feature: str) -> torch.Tensor:
        """The official ``SPL._encode`` (``forward_with_custom_embeddings`` + ``pooler_output``):
        prompt tokenized with padding="longest"; the embedded sequence (token + position embedding)
        is overwritten at the modifier position by the bare embedding row; pooled at argmax(id)
        under SD1.5's legacy config. ``feature="eos"`` is the paper's variant we default to: the
        normal embedding and the first end-of-text position."""
        ids = self.ids([prompt], padding="longest")
        handle = None
        if with_modifier and feature == "official":
            row = self.embedding[self.token_id].clone()
            where = torch.where(ids.squeeze(0) == self.token_id)

            def overwrite(module, inputs, output):
                output = output.clone()
                output[0, where, :] = row
                return output

            inner = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 / 5
            handle = inner.embeddings.register_forward_hook(overwrite)
        try:
            last = self.text_encoder(ids).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()
        position = ids.argmax(-1) if feature == "official" else (ids == self.tokenizer.eos_token_id).int().argmax(-1)
        return last[torch.arange(1), position]

    def loss(self, batch, spl_prompt, class_prompt, spl_weight, feature, prior_weight=1.0):
        n = len(batch.prompts)
        prompts = batch.prompts + [class_prompt] * len(batch.prior_owners)
        context = self.text_encoder(self.ids(prompts)).last_hidden_state
        pred = self.unet(batch.noisy, batch.timesteps, context).sample
        mse = F.mse_loss(pred[:n].float(), batch.noise[:n].float(), reduction="none")
        mask = batch.mask
        recon = ((mse * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
        cos = F.cosine_similarity(self.spl_feature(spl_prompt, True, feature),
                                  self.spl_feature(class_prompt, False, feature))
        spl = (1 - cos).mean()
        total = recon + spl_weight * spl
        prior = None
        if batch.prior_owners:
            prior = F.mse_loss(pred[n:].float(), batch.noise[n:].float(), reduction="mean")
            total = total + prior_weight * prior
        return total, recon, spl, prior

    def kv_weights(self) -> dict[str, torch.nn.Parameter]:
        return processor_kv_weights(self.procs)

    def grads(self):
        return {name: w.grad for name, w in self.kv_weights().items()}, self.embedding.grad[self.token_id]


def _mid_run(run: TrainingRun, seed: int) -> TrainingRun:
    """``run`` with a trained state mid-run, not the zero start, so every term is non-trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for delta in run.method.deltas.values():
            delta.normal_(0.0, 0.02)
        run.method.token_vectors.add_(torch.randn_like(run.method.token_vectors) * 0.05)
    return run


def _our_step(host, run: TrainingRun, batch):
    """This trainer's losses on ``batch`` with the trained deltas attached, backpropagated."""
    detach = host.attach_deltas(run.method.deltas)
    try:
        ours = run.losses(batch)
        ours.total.backward()
    finally:
        detach()
    return ours


def _parity(host, tiny_base, *, spl_weight, mask_kind, feature="eos", with_class_images=False):
    config = small_config(spl_weight=spl_weight, spl_feature=feature)
    class_images = [make_images(2, seed=7)] if with_class_images else None
    run = _mid_run(TrainingRun(host, [dog()], config, [make_images()], class_images), seed=1)
    batch = run.sample_batch(3)
    if mask_kind == "full":
        batch.mask = torch.ones_like(batch.mask)
    else:
        batch.mask = torch.zeros_like(batch.mask)
        batch.mask[0, :, 1:6, 2:7] = 1.0
        batch.mask[1, :, 0:8, 0:3] = 1.0

    ours = _our_step(host, run, batch)

    official = OfficialStep(tiny_base, run)
    total, recon, spl, prior = official.loss(batch, run.method.spl_prompts[0], run.concepts[0].class_phrase(),
                                                spl_weight, feature)
    total.backward()
    kv_grads, token_grad = official.grads()

    close(ours.terms["recon"].detach(), recon.detach(), "recon")
    close(ours.terms["spl"].detach(), spl.detach(), "SPL")
    close(ours.total.detach(), total.detach(), "total")
    if prior is not None:
        close(ours.terms["prior"].detach(), prior.detach(), "prior")
    assert set(kv_grads) == set(run.method.deltas)
    for name, delta in run.method.deltas.items():
        close(delta.grad, kv_grads[name], name)
    close(run.method.token_vectors.grad[0], token_grad, "token")
    return ours


@pytest.mark.parametrize("spl_weight", [0.0, 1.0])
@pytest.mark.parametrize("mask_kind", ["full", "partial"])
def test_step_equals_the_official_step(host, tiny_base, spl_weight, mask_kind):
    _parity(host, tiny_base, spl_weight=spl_weight, mask_kind=mask_kind)


@pytest.mark.parametrize("spl_weight", [0.0, 1.0])
def test_step_with_class_images_equals_the_official_prior_loss(host, tiny_base, spl_weight):
    """λ = 0 is exactly the official prior-preservation step; with λ = 1 the official code would
    drop SPL (its if/elif), which we deliberately keep, so the reference adds it back."""
    ours = _parity(host, tiny_base, spl_weight=spl_weight, mask_kind="partial", with_class_images=True)
    assert "prior" in ours.terms


def test_official_spl_feature_reproduces_the_official_pooler(host, tiny_base):
    ours = _parity(host, tiny_base, spl_weight=1.0, mask_kind="full", feature="official")
    assert float(ours.terms["spl"].detach()) > 0


def test_official_and_paper_spl_features_differ(host):
    """The official pooler reads the new token's position, not EOS: the two SPL values differ."""
    runs = {f: TrainingRun(host, [dog()], small_config(spl_feature=f), [make_images()], None) for f in ("eos", "official")}
    values = {}
    for feature, run in runs.items():
        with torch.no_grad():
            values[feature] = float(run.losses(run.sample_batch(0)).terms["spl"])
    assert abs(values["eos"] - values["official"]) > 1e-4


def test_optimizer_step_equals_the_official_adamw_step(host, tiny_base):
    """Clipping, AdamW and its decoupled weight decay on the *full* weight (towards zero, not
    towards the base), as the official optimizer applies them. Weight decay and learning rate are
    raised so that the decay term (~1e-3) is far above float rounding; Adam's epsilon is raised so
    that elements with near-zero gradients (whose first Adam step is ±lr from float noise alone)
    do not hide it."""
    config = small_config(learning_rate=1e-3, weight_decay=5.0, adam_epsilon=1e-3)
    run = TrainingRun(host, [dog()], config, [make_images()], None)
    torch.manual_seed(2)
    with torch.no_grad():
        for delta in run.method.deltas.values():
            delta.normal_(0.0, 0.02)
    base = {name: weight.detach().clone() for name, weight in run.base_weights.items()}
    batch = run.sample_batch(0)
    official = OfficialStep(tiny_base, run)

    detach = host.attach_deltas(run.method.deltas)
    try:
        run.optimize(run.losses(batch).total)
    finally:
        detach()

    total, *_ = official.loss(batch, run.method.spl_prompts[0], run.concepts[0].class_phrase(), 1.0, "eos")
    total.backward()
    with torch.no_grad():  # official: zero every other row's gradient, clip, step
        keep = torch.arange(official.embedding.shape[0]) == official.token_id
        official.embedding.grad[~keep] = 0
    trained = [p for proc in official.procs.values() for p in proc.parameters()]
    torch.nn.utils.clip_grad_norm_([official.embedding] + trained, config.max_grad_norm)
    torch.optim.AdamW([official.embedding] + trained, lr=run.lr, betas=(0.9, 0.999),
                      weight_decay=config.weight_decay, eps=config.adam_epsilon).step()

    kv_after = official.kv_weights()
    for name, delta in run.method.deltas.items():
        ours = base[name].double() + delta.double()
        assert torch.allclose(ours, kv_after[name].double(), atol=1e-7, rtol=0), name
    assert torch.allclose(run.method.token_vectors[0].double(), official.embedding[official.token_id].double(),
                          atol=1e-7, rtol=0)


@pytest.mark.parametrize("weight", [10.0, 100.0])
def test_output_preservation_equals_an_independent_teacher_student_step(host, tiny_base, weight):
    """preservation = output (kohya-ss's Differential Output Preservation, without class images):
    L = L_recon + w·mean((ε_tuned − ε_base)²) on the class prompt — the training prompt without the
    token — at the batch's noisy latents and timesteps, the teacher a separately loaded base UNet.
    SPL is reported, not optimized; the token's gradient comes from L_recon alone."""
    from diffusers import UNet2DConditionModel

    config = small_config(preservation="output", output_weight=weight)
    run = _mid_run(TrainingRun(host, [dog()], config, [make_images()]), seed=2)
    batch = run.sample_batch(1)
    ours = _our_step(host, run, batch)

    official = OfficialStep(tiny_base, run)
    teacher = UNet2DConditionModel.from_pretrained(tiny_base / "unet").requires_grad_(False)
    n = len(batch.prompts)
    class_prompts = [p.replace("<sks> ", "") for p in batch.prompts]
    assert all("<sks>" not in p and p.endswith("dog") for p in class_prompts)
    context = official.text_encoder(official.ids(batch.prompts)).last_hidden_state
    pred = official.unet(batch.noisy, batch.timesteps, context).sample
    recon = (((pred.float() - batch.noise.float()) ** 2 * batch.mask).sum([1, 2, 3]) / batch.mask.sum([1, 2, 3])).mean()
    class_context = official.text_encoder(official.ids(class_prompts)).last_hidden_state
    student = official.unet(batch.noisy[:n], batch.timesteps[:n], class_context).sample
    with torch.no_grad():
        target = teacher(batch.noisy[:n], batch.timesteps[:n], class_context).sample
    output = F.mse_loss(student.float(), target.float())
    total = recon + weight * output
    total.backward()
    kv_grads, token_grad = official.grads()

    close(ours.terms["recon"].detach(), recon.detach(), "recon")
    close(ours.terms["output"].detach(), output.detach(), "output preservation")
    close(ours.total.detach(), total.detach(), "total")
    assert float(ours.terms["spl"].detach()) > 0  # reported, not in the total
    for name, delta in run.method.deltas.items():
        close(delta.grad, kv_grads[name], name)
    close(run.method.token_vectors.grad[0], token_grad, "token")


def test_preservation_none_is_the_reconstruction_alone(host):
    run = TrainingRun(host, [dog()], small_config(preservation="none", spl_weight=1.0), [make_images()])
    with torch.no_grad():
        run.method.token_vectors.add_(0.05)
    losses = run.losses(run.sample_batch(0))
    assert float(losses.terms["spl"]) > 0 and torch.equal(losses.total, losses.terms["recon"])
