"""The training loop, written against the small TrainingHost interface.

One readable loop: cached latents → noise → UNet with the method's trained tensors attached →
the method's losses → AdamW. The method (``classdiffusion.methods``) decides what is trained:
ClassDiffusion's K/V deltas and new token rows with the semantic preservation loss (the default),
Infusion's value residuals at the class word, or Textual Inversion's token rows. Randomness is
drawn per step from (seed, step), so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import __version__
from ..concept import Concept, load_concept
from ..evaluation.drift import DriftProbe
from ..config import ConceptSpec, TrainConfig, check_concepts
from .data import ConceptData, LatentBank, concept_data, draw_placement
from ..errors import InvalidInputError, TrainingCancelled, TrainingDivergedError
from ..hosts.base import TrainingHost
from ..model.kv import base_fingerprint
from ..concept.meta import ConceptMeta
from .distributed import SINGLE, Ranks
from ..methods import METHOD_CLASSES, Losses, MethodContext, method_class
from .optim import flatten_optimizer, restore_optimizer, gradient_norm
from .validation import ValidationRun
from .records import (Batch, PendingStep, StepRecord, TrainCallbacks, TrainResult, checkpoint_path,
                      derive_seed)
from .resume import check_resume

logger = logging.getLogger("classdiffusion")


class TrainingRun:
    """One run of a method: everything prepared once (cached latents, the method's trained tensors
    and constants, the optimizer), then ``step()`` = per micro-batch ``sample_batch`` →
    ``method.losses`` → backward, then ``optimizer_step``. What is trained and how it is attached
    is the method's (``classdiffusion.methods``); the rest is shared."""

    def __init__(self, host: TrainingHost, concepts: Sequence[ConceptSpec | ConceptData], config: TrainConfig,
                 images=None, class_images=None, ranks: Ranks = SINGLE):
        self.host, self.config, self.ranks = host, config, ranks
        self.data = concept_data(concepts, images, class_images)
        self.concepts = [d.spec for d in self.data]
        self.device = host.device
        self.warnings: list[str] = []
        if host.text_dim != host.family.context_dim:
            raise InvalidInputError(f"The text encoders are {host.text_dim} wide; {host.family.label} needs "
                                    f"{host.family.context_dim}.")
        method_type = method_class(config.method)
        self.with_prior = any(d.has_class_images for d in self.data)
        if self.with_prior and not method_type.supports_class_images:
            able = [m.name for m in METHOD_CLASSES.values() if m.supports_class_images]
            raise InvalidInputError(f"{method_type.label} uses no class images (prior preservation); remove them, "
                                    f"or use a method that does ({', '.join(able)}).")
        per_concept = [d.load_images() for d in self.data]
        subject_masks = None
        if method_type.uses_subject_masks:
            subject_masks = [m for d, imgs in zip(self.data, per_concept) for m in d.load_masks(imgs)]
        self.memory_plan = None
        if config.memory != "off":
            self.config = config = self._plan_memory(config, method_type, sum(len(i) for i in per_concept))
        base = host.cross_attention_weights(method_type.weights_mode(config))
        self.fingerprint = base_fingerprint(base)
        self.base_weights = base  # read-only views (the official weight decay reads them)
        self.method = method_type(MethodContext(host=host, config=config, concepts=self.concepts, device=self.device,
                                                base_weights=base, with_prior=self.with_prior, warn=self._warn,
                                                drift_probe=DriftProbe))
        self.method.setup()
        host.configure_training(config)
        self.image_concept = [k for k, imgs in enumerate(per_concept) for _ in imgs]
        self.bank = LatentBank(host, [img for imgs in per_concept for img in imgs], self.image_concept, config,
                               subject_masks=subject_masks)
        if subject_masks is not None and not any(m is not None for m in subject_masks):
            self._warn("No subject masks given (alpha channel, mask images or a MASK input): the loss weighs "
                       "the whole image, background included.")
        self._init_class_bank()
        self.method.setup_constants()
        self._init_optimizer()
        self.skipped_steps: torch.Tensor | None = None  # on the device: steps AdamW skipped
        self._perms: dict[int, list[int]] = {}

    def _plan_memory(self, config: TrainConfig, method_type, images: int) -> TrainConfig:
        """The memory planner (classdiffusion.run.memory): log the estimate; with memory="auto" return the
        settings that fit; refuse (InvalidInputError) what cannot fit, before any image is encoded."""
        from .memory import PLAN_LOGGER, available_bytes, estimate, plan

        class_images = sum(len(d.load_class_images()) for d in self.data) if self.with_prior else 0
        memory_plan = plan(lambda c: estimate(self.host, c, method_type, images=images, class_images=class_images,
                                              concepts=len(self.concepts)),
                           config, self.ranks.smallest(available_bytes(self.device, config.memory_limit_mib),
                                                       self.device))  # one plan on every rank
        self.memory_plan = memory_plan
        message = f"memory plan: {memory_plan.describe()}"
        if not memory_plan.fits:
            self._warn(message + " (--memory auto adapts the settings; lower the resolution or batch)")
        elif memory_plan.changes:
            self._warn(message)
        else:
            logging.getLogger(PLAN_LOGGER).info(message)
        return memory_plan.config

    @property
    def lr(self) -> float:
        return self.method.learning_rate

    def _init_class_bank(self) -> None:
        """Class-image latents for prior preservation, encoded once."""
        self.class_bank = None
        if self.with_prior:
            class_pils, owners = [], []
            for k, data in enumerate(self.data):
                pil = data.load_class_images()
                class_pils += pil
                owners += [k] * len(pil)
            prior_config = TrainConfig.from_dict({**self.config.to_dict(), "augment": False})
            self.class_bank = LatentBank(self.host, class_pils, owners, prior_config)
            self.class_owner = owners

    def _init_optimizer(self) -> None:
        config = self.config
        groups = self.method.param_groups()
        self.params = [p for group in groups for p in group["params"]]
        options = dict(lr=self.lr, betas=(config.adam_beta1, config.adam_beta2),
                       weight_decay=config.weight_decay, eps=config.adam_epsilon)
        try:  # one kernel for all trained tensors, and it skips a step on the device (found_inf)
            self.optimizer = torch.optim.AdamW(groups, fused=True, **options)
            self._fused = True
        except (RuntimeError, ValueError):  # a device without fused AdamW
            self.optimizer = torch.optim.AdamW(groups, **options)
            self._fused = False
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(
            config.mixed_precision == "fp16" and self.device.type == "cuda"))

    def _warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)

    def _image_for(self, sample_index: int) -> int:
        """Shuffled epochs over all concepts' images, like a shuffling DataLoader, but stateless."""
        n = self.bank.num_images
        epoch, position = divmod(sample_index, n)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(derive_seed(self.config.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(n, generator=gen).tolist()}
        return self._perms[epoch][position]

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step over all ranks (accumulation × ranks)."""
        return self.config.gradient_accumulation * self.ranks.world

    def sample_batch(self, step: int, micro: int = 0) -> Batch:
        """The inputs of micro-batch ``micro`` of a step, drawn from (seed, step, micro) alone:
        placements of cached latents, the latent sample, noise, timesteps and prompts (plus class
        latents with prior preservation). Without accumulation the draw is (seed, step)'s."""
        config, host, device = self.config, self.host, self.device
        batch = config.batch_size
        key = (step,) if self.micro_batches == 1 else (step, micro)
        cpu_rng = torch.Generator().manual_seed(derive_seed(config.seed, "step", *key))
        noise_rng = torch.Generator(device=device).manual_seed(derive_seed(config.seed, "noise", *key))

        means, stds, masks, prompts = [], [], [], []
        first = (step * self.micro_batches + micro) * batch
        for b in range(batch):
            image = self._image_for(first + b)
            place = draw_placement(self.bank, image, cpu_rng)
            mean, std, mask = self.bank.compose(place.image, place.flip, place.size, place.top, place.left)
            means.append(mean), stds.append(std), masks.append(mask)
            prompts.append(self.method.phrase(self.bank.concept_of_image[image], place.prefix, cpu_rng))
        prior_owners: list[int] = []
        if self.class_bank is not None:
            picks = torch.randint(0, self.class_bank.num_images, (batch,), generator=cpu_rng).tolist()
            for pick in picks:
                flip = len(self.class_bank.flips) == 2 and bool(torch.rand(1, generator=cpu_rng) < 0.5)
                mean, std, mask = self.class_bank.compose(pick, flip, config.resolution, 0, 0)
                means.append(mean), stds.append(std), masks.append(mask)
            prior_owners = [self.class_owner[p] for p in picks]

        mean, std = torch.stack(means), torch.stack(stds)
        shape = mean.shape
        x0 = mean + std * torch.randn(shape, generator=noise_rng, device=device)
        noise = torch.randn(shape, generator=noise_rng, device=device)
        timesteps = torch.randint(0, host.num_train_timesteps, (shape[0],), generator=noise_rng, device=device)
        alpha_bar = host.alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
        return Batch(noisy=noisy, noise=noise, timesteps=timesteps, mask=torch.stack(masks)[:batch],
                     prompts=prompts, prior_owners=prior_owners)

    def losses(self, batch: Batch) -> Losses:
        """The method's loss terms on one batch."""
        return self.method.losses(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def optimizer_step(self) -> None:
        """Gradient clipping (if on), the method's pre-step work, one AdamW step. A step whose
        gradients are not finite (fp16 overflow, a diverged loss) changes nothing, decided on the
        device: fused AdamW's ``found_inf``, no host sync."""
        self.scaler.unscale_(self.optimizer)
        norm = gradient_norm(self.params, self.config.max_grad_norm)
        keep = torch.isfinite(norm).float()
        self.skipped_steps = 1.0 - keep if self.skipped_steps is None else self.skipped_steps + (1.0 - keep)
        self.method.before_optimizer_step(keep)
        if self.scaler.is_enabled():  # fp16: the scaler's own check of the same gradients
            self.scaler.step(self.optimizer)
        elif self._fused:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, 1.0 - keep
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif bool(keep):  # AdamW without on-device skipping: one read
            self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def warn_skipped_steps(self) -> None:
        """Say how many steps changed nothing for a non-finite gradient (read once, at the end).
        fp16's loss scaler skips a few while it finds its scale: only many of them are worth a word."""
        if self.skipped_steps is None:
            return
        skipped, steps = int(self.skipped_steps), self.config.steps
        fp16 = self.scaler.is_enabled()
        if skipped and (not fp16 or skipped > max(5, steps // 10)):
            self._warn(f"{skipped} of {steps} steps had non-finite gradients and changed no weight"
                       + (" (fp16 loss scaling: bf16 avoids it)." if fp16 else "; lower the learning rate."))

    def optimize(self, loss: torch.Tensor) -> None:
        """Backward and one optimizer step (one micro-batch per step)."""
        self.backward(loss)
        self.optimizer_step()

    def step(self, step: int) -> "PendingStep":
        """One optimizer step: this rank's micro-batches (all of them in a single process), the
        gradients summed over the ranks, one AdamW step. Nothing is read from the device: the
        step's loss values stay there until :meth:`read_steps` (one sync for many steps)."""
        start = time.perf_counter()
        total_micro = self.micro_batches
        values = layout = None
        graphs = self.config.compile and self.config.compile_mode == "reduce-overhead"
        for micro in self.ranks.micro_batches(self.config.gradient_accumulation):
            if graphs:  # CUDA graph trees: the last micro-batch's outputs are consumed, a new one begins
                torch.compiler.cudagraph_mark_step_begin()
            losses = self.losses(self.sample_batch(step, micro))
            self.backward(losses.total / total_micro if total_micro > 1 else losses.total)
            flat = losses.stacked()
            values, layout = (flat if values is None else values + flat), losses.layout()
        self.ranks.sum_gradients(self.params)
        self.optimizer_step()
        values = self.ranks.sum_values(values)
        return PendingStep(step=step + 1, values=values / total_micro if total_micro > 1 else values,
                           layout=layout, lr=self.lr, seconds=time.perf_counter() - start)

    def read_steps(self, pending: Sequence["PendingStep"]) -> list[StepRecord]:
        """The records of steps run so far, read from the device at once; TrainingDivergedError at
        the first step whose loss (or a term) was not finite — its update and those of later
        steps with non-finite gradients were skipped, so no weight holds a NaN."""
        if not pending:
            return []
        rows = torch.stack([p.values for p in pending]).tolist()  # the one device sync
        records = []
        for item, row in zip(pending, rows):
            if not all(math.isfinite(v) for v in row[:item.layout.checked]):
                raise TrainingDivergedError(
                    f"The loss became {row[0]} at step {item.step}; training stopped at step {pending[-1].step}, "
                    "and no step with non-finite gradients changed a weight. Lower the learning rate or use "
                    "bf16 instead of fp16."
                )
            loss, terms, diagnostics = item.layout.read(row)
            records.append(StepRecord(step=item.step, loss=loss, terms=terms, lr=item.lr,
                                      diagnostics=diagnostics, seconds=item.seconds))
        return records

    def drift(self) -> list[dict]:
        return self.method.drift()

    def restore(self, checkpoint: Concept) -> None:
        """Continue from a resumable checkpoint (``resume.check_resume`` said it fits): its trained
        tensors and optimizer state (the rest of the run is a function of (seed, step), so the
        result equals an uninterrupted run)."""
        checkpoint.check_against(self.base_weights, what="the base model given for resuming")
        self.method.load_state(checkpoint)
        restore_optimizer(self.optimizer, checkpoint.optimizer_tensors)

    def concept(self, step: int, history: list[dict], meta_extra: dict, with_optimizer: bool) -> Concept:
        extra = dict(meta_extra)
        known = {name: extra.pop(name) for name in ("base_name", "eos_cosine_initial", "eos_cosine_final",
                                                     "drift_initial", "drift_final") if name in extra}
        fields = self.method.concept_fields()
        with_tokens = bool(fields["tokens"])
        meta = ConceptMeta(
            step=step, history=history, train_mode=self.method.weights_mode(self.config),
            config=self.config.to_dict(), concepts=[spec.to_dict() for spec in self.concepts],
            initializers=[spec.initializer_word for spec in self.concepts] if with_tokens else None,
            prompts=[spec.prompt for spec in self.concepts], base_fingerprint=self.fingerprint,
            warnings=list(self.warnings), method=self.method.name, **known,
            family=self.host.family.name,
            extra={"text_dim": self.host.text_dim, "layer_naming": "diffusers", "effective_learning_rate": self.lr,
                   "created_by": f"classdiffusion {__version__}", "torch_version": torch.__version__, **extra},
        )
        return Concept(
            class_words=[spec.class_word for spec in self.concepts], meta=meta,
            optimizer_tensors=flatten_optimizer(self.optimizer) if with_optimizer else None,
            **fields,
        )


def train(
    host: TrainingHost,
    concepts: Sequence[ConceptSpec | ConceptData],
    config: TrainConfig,
    *,
    images: Sequence[Sequence[Any]] | None = None,
    class_images: Sequence[Sequence[Any] | None] | None = None,
    out: str | Path | None = None,
    resume: str | Path | Concept | None = None,
    callbacks: TrainCallbacks | None = None,
    meta_extra: Mapping[str, Any] | None = None,
    validation_dir: str | Path | None = None,
    ranks: Ranks = SINGLE,
) -> TrainResult:
    """Train one or more concepts jointly and return (and, with ``out``, save) the concept.

    ``images[k]`` overrides concept k's image paths (PIL images or ComfyUI IMAGE tensors).
    With ``config.save_every`` > 0 and ``out``, resumable checkpoints ``OUT-stepNNNNN`` are
    written along the way. ``resume`` continues from such a checkpoint (``resume.resume_settings``
    gives its settings), giving the same result as an uninterrupted run with the same seed. With
    ``config.validation_every``, previews are sampled along the way into ``validation_dir``
    (default: ``OUT's folder/validation``). ``ranks``: this process's place in a data-parallel run
    (``distributed.from_environment``); only rank 0 writes files and samples previews.
    """
    started = time.perf_counter()
    specs = [c.spec if isinstance(c, ConceptData) else c for c in concepts]
    check_concepts(specs)
    callbacks = callbacks or TrainCallbacks()
    out = Path(out) if out is not None and ranks.is_main else None
    checkpoint = None
    if resume is not None:  # checked before any image is encoded
        checkpoint = resume if isinstance(resume, Concept) else load_concept(resume)
        check_resume(checkpoint, specs, config)

    run = TrainingRun(host, concepts, config, images, class_images, ranks=ranks)
    history, extra = _start_record(run, checkpoint)
    extra.update({**(meta_extra or {}), **({"ranks": ranks.world} if ranks.world > 1 else {})})
    previews = config.validation_every and ranks.is_main
    validation = ValidationRun.start(run, specs, out, validation_dir) if previews else None
    detach = run.method.attach()
    try:
        start = checkpoint.step if checkpoint is not None else 0
        written, last_drift = _run_steps(run, start, history, extra, out, callbacks, validation)
    finally:
        detach()
    run.warn_skipped_steps()

    extra["drift_final"] = last_drift if last_drift is not None else run.drift()
    extra["eos_cosine_final"] = [d["cosine"] for d in extra["drift_final"]]
    seconds = time.perf_counter() - started
    if validation is not None:
        extra["validation"] = validation.summary(seconds)
    concept = run.concept(config.steps, history, extra, with_optimizer=False)
    path = concept.save(out) if out is not None else None
    return TrainResult(concept=concept, path=path, checkpoints=written, warnings=run.warnings,
                       validation_grid=validation.log.grid() if validation and validation.log.columns else None,
                       validation_seconds=validation.log.seconds if validation else 0.0, seconds=seconds)


def _start_record(run: TrainingRun, checkpoint: Concept | None) -> tuple[list[dict], dict[str, Any]]:
    """The history so far and the metadata known at the start (the drift before training, kept
    from the checkpoint when resuming); restores the checkpoint's state into the run."""
    initial_drift = run.drift()  # its "cosine" is the EOS cosine of training vs class phrase
    extra = {"eos_cosine_initial": [d["cosine"] for d in initial_drift], "drift_initial": initial_drift}
    if checkpoint is None:
        return [], extra
    run.restore(checkpoint)
    extra["eos_cosine_initial"] = checkpoint.meta.eos_cosine_initial or extra["eos_cosine_initial"]
    extra["drift_initial"] = checkpoint.meta.drift_initial or initial_drift
    return list(checkpoint.history), extra


#: Seconds after which the loss values are read even before ``log_every`` steps have run, so
#: progress bars keep moving on slow devices (a read a second costs a fast GPU nothing).
READ_INTERVAL_S = 1.0


def _run_steps(run: TrainingRun, start: int, history: list[dict], extra: dict, out: Path | None,
               callbacks: TrainCallbacks, validation: "ValidationRun | None" = None
               ) -> tuple[list[Path], list[dict] | None]:
    """Steps ``start``..``config.steps``: cancel check, step, and — every ``log_every`` steps (or
    READ_INTERVAL_S seconds), at the end and before any drift log, validation or checkpoint — one
    read of the losses so far, their records (history, callbacks), then the drift log, previews and
    checkpoints. A non-finite loss stops the run at that read, before anything is written.
    Returns the checkpoints written and the drift measured after the last step (if it was logged)."""
    config = run.config
    written: list[Path] = []
    last_drift = None
    pending: list[PendingStep] = []
    last_read = time.monotonic()
    if validation is not None and start == 0:
        validation.run(run, 0, callbacks)  # the starting point: the base (and initial token) at work
    for step in range(start, config.steps):
        if run.ranks.any(callbacks.should_stop(), run.device):  # a stop on any rank stops them all
            raise TrainingCancelled(
                f"Training was cancelled at step {step} of {config.steps}; no concept file was written"
                + (f" (last checkpoint: {written[-1]})." if written else ".")
            )
        pending.append(run.step(step))
        done = step + 1
        drift_due = bool(config.drift_every) and (done % config.drift_every == 0 or done == config.steps)
        validation_due = validation is not None and (done % config.validation_every == 0 or done == config.steps)
        save_due = out is not None and bool(config.save_every) and done % config.save_every == 0 and done < config.steps
        timed_out = run.ranks.world == 1 and time.monotonic() - last_read >= READ_INTERVAL_S  # ranks read alike
        if not (done % config.log_every == 0 or done == config.steps or drift_due or validation_due or save_due
                or timed_out):
            continue
        try:
            records = run.read_steps(pending)
        except TrainingDivergedError as exc:
            last = f" The last good checkpoint is {written[-1]}." if written else ""
            raise TrainingDivergedError(f"{exc}{last}") from None
        pending.clear()
        last_read = time.monotonic()
        if drift_due:
            last_drift = run.drift()
            records[-1].drift_rank = [d["rank"] for d in last_drift]
        for record in records:
            history.append(record.to_dict())
            callbacks.on_step(record, config.steps)
        if validation_due:
            validation.run(run, done, callbacks)
        if save_due:
            snapshot = run.concept(done, history, extra, with_optimizer=config.checkpoint_optimizer)
            written.append(snapshot.save(checkpoint_path(out, done)))
            callbacks.on_checkpoint(written[-1])
    return written, last_drift
