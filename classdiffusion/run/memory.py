"""Peak memory of a training run, estimated before it starts, and a plan that fits the device.

The estimate adds what stays resident (the frozen models as loaded, the cached latents, the
trained tensors with their gradients and AdamW state) to the peak of one training step, which is
*measured* rather than modelled: the step's UNet (and, where gradients reach it, text encoder)
forward and backward run on PyTorch's ``meta`` device — shapes only, no memory, no arithmetic,
about a second — while a dispatch mode counts the bytes of live tensors exactly as the CUDA
allocator would hold them. Attention is counted as a fused kernel saves it (output and
log-sum-exp, as PyTorch's flash attention on CPU and GPU does), not as the math fallback the meta
device would pick. On the CPU the estimate matches the live-tensor peak of a real step (tested);
on a GPU add the allocator's rounding and fragmentation (a few per cent to ~20 %).

``plan()`` compares the estimate with the device's free memory (or a configured limit) and, with
``memory="auto"``, switches on gradient checkpointing, then trades batch size for gradient
accumulation (same images per optimizer step), and refuses with the numbers when nothing fits.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import TrainConfig
from ..errors import InvalidInputError
from ..model.precision import precision_dtype

logger = logging.getLogger("classdiffusion")
#: The memory plan's one line goes to this logger: the command line shows it without ``-v``.
PLAN_LOGGER = "classdiffusion.run.memory.plan"

MIB = 2 ** 20
#: Share of the free memory a plan may use (the rest: allocator slack, other processes' growth).
HEADROOM = 0.9
#: SD1.5's UNet configuration (diffusers names), used where the host's UNet is not a diffusers one.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, on any device including ``meta``. Storages of
    ``known`` tensors (weights already counted as resident) are never counted, also when an
    operator returns a view of them (a weight's transpose)."""

    def __init__(self, known=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.known = {t.untyped_storage()._cdata for t in known}
        self.current = 0
        self.peak = 0

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if size == 0 or key in self.live or key in self.known:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


class _FusedAttention(torch.autograd.Function):
    """Shapes and saved tensors of a fused (flash) attention kernel, on the meta device."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        log_sum_exp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FusedAttention.apply(query, key, value)


def tensor_bytes(*modules: torch.nn.Module, device: torch.device | None = None) -> int:
    """Bytes of the parameters and buffers of ``modules`` (on ``device`` if given), each storage once."""
    seen: dict[int, int] = {}
    for module in modules:
        if module is None:
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            if device is not None and tensor.device.type != device.type:
                continue
            storage = tensor.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


@dataclass
class MemoryEstimate:
    """Bytes by part; ``total`` is the estimated peak of the run."""

    resident: int  #: frozen models on the device, as loaded
    latents: int  #: the cached latent bank (mean and std per image variant)
    trained: int  #: AdamW's two moments of the trained tensors (fp32)
    step: int  #: one step's peak: trained tensors, activations, saved tensors, gradients (meta dry run)

    @property
    def total(self) -> int:
        return self.resident + self.latents + self.trained + self.step

    def describe(self) -> str:
        return (f"≈ {self.total / 2 ** 30:.2f} GiB (models {self.resident / MIB:.0f} MiB, latents "
                f"{self.latents / MIB:.0f} MiB, AdamW state {self.trained / MIB:.0f} MiB, step "
                f"{self.step / MIB:.0f} MiB)")


def latent_bank_bytes(config: TrainConfig, images: int) -> int:
    """The LatentBank's tensors: mean and std, float32 [4, s/8, s/8], per (image, flip, size) + canvas."""
    from .data import LATENT_FACTOR, scale_bins

    shrink, zoom = scale_bins(config)
    flips = 2 if config.hflip else 1
    per_image = sum(2 * 4 * (size // LATENT_FACTOR) ** 2 * 4 for size in shrink + zoom) * flips
    canvas = 2 * 4 * (config.resolution // LATENT_FACTOR) ** 2 * 4
    return images * per_image + canvas


def step_bytes(unet_config: dict, config: TrainConfig, *, train_mode: str | None = "kv", method=None,
               text_config=None, text_rows: int = 0, class_rows: int = 0) -> int:
    """Peak bytes of one training step beyond what is resident, from a meta-device dry run of the
    UNet (and the text encoder, where gradients flow into it) at the run's batch, resolution,
    dtype and gradient checkpointing, with the method's trained tensors attached: K/V deltas of
    ``train_mode`` (None: none), or what ``method.memory_attach`` attaches (a method class with
    tensors of its own, e.g. Infusion's residuals)."""
    from diffusers import UNet2DConditionModel

    from ..model.kv import attach_fused_deltas, cross_attention_weights

    dtype = precision_dtype(config.mixed_precision)
    meta = torch.device("meta")
    with meta:
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(unet_config), dtype).requires_grad_(False)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    modules = dict(unet.named_modules())
    layer_weights = cross_attention_weights(unet, train_mode or "kv")
    trained_weights = {} if train_mode is None else {n: tuple(w.shape) for n, w in layer_weights.items()}
    texts = []
    if text_config is not None and text_rows:
        from transformers import CLIPTextModel

        configs = text_config if isinstance(text_config, (list, tuple)) else [text_config]
        with meta:
            texts = [torch.nn.Module.to(CLIPTextModel(c), dtype).requires_grad_(False) for c in configs]
    rows = config.batch_size + class_rows
    weights = [t for m in (unet, *texts) for t in list(m.parameters()) + list(m.buffers())]
    with LiveBytes(known=weights) as live:
        start = live.current
        trained = [torch.zeros(shape, device=meta, requires_grad=True) for shape in trained_weights.values()]
        own = method.memory_attach(config, modules, list(layer_weights), rows, meta) if method is not None else None
        if own is not None:
            detach = own
        else:
            detach = attach_fused_deltas(
                {n.rsplit(".", 1)[0]: modules[n.rsplit(".", 1)[0]] for n in trained_weights},
                dict(zip(trained_weights, trained)))
        original_sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _fused_sdpa
        try:
            context = _text_context(texts, text_rows, config.batch_size, class_rows, dtype, meta, unet_config)
            latents = torch.zeros(rows, 4, config.resolution // 8, config.resolution // 8, device=meta, dtype=dtype)
            timesteps = torch.zeros(rows, dtype=torch.long, device=meta)
            out = unet(latents, timesteps, encoder_hidden_states=context,
                       added_cond_kwargs=_added_conditioning(unet_config, rows, dtype, meta)).sample
            loss = out.float().pow(2).mean()
            loss.backward()
            del out, loss, context
        finally:
            F.scaled_dot_product_attention = original_sdpa
            detach()
        peak = live.peak - start
    return peak


def _added_conditioning(unet_config: dict, rows: int, dtype, meta) -> dict | None:
    """SDXL's added conditioning (pooled embedding and size/crop ids) as the UNet takes it; None for SD1.x."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(unet_config["addition_time_embed_dim"])
    return {"text_embeds": torch.zeros(rows, pooled, device=meta, dtype=dtype),
            "time_ids": torch.zeros(rows, 6, device=meta, dtype=dtype)}


def _text_context(texts, text_rows: int, batch: int, class_rows: int, dtype, meta, unet_config) -> torch.Tensor:
    """The UNet's context: through the meta text encoders ``texts`` (features side by side) with
    gradients when tokens are trained (``text_rows`` prompts: the batch's and SPL's), else a
    constant tensor; class rows constant."""
    width = int(unet_config.get("cross_attention_dim", 768))
    if not texts:
        return torch.zeros(batch + class_rows, 77, width, device=meta, dtype=dtype)
    hiddens = []
    for text in texts:
        embeddings = text.get_input_embeddings()
        handle = embeddings.register_forward_hook(lambda m, i, o: o.detach().requires_grad_(True))
        try:
            ids = torch.zeros(text_rows, 77, dtype=torch.long, device=meta)
            hiddens.append(text(input_ids=ids).last_hidden_state)
        finally:
            handle.remove()
    hidden = torch.cat(hiddens, dim=-1) if len(hiddens) > 1 else hiddens[0]
    context = hidden[:batch]
    if class_rows:
        context = torch.cat([context, torch.zeros(class_rows, 77, width, device=meta, dtype=hidden.dtype)])
    return context


@dataclass
class MemoryPlan:
    """What the run will use, the settings that make it fit, and what was changed."""

    estimate: MemoryEstimate
    available: int
    config: TrainConfig
    changes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.estimate.total <= HEADROOM * self.available

    def describe(self) -> str:
        text = f"{self.estimate.describe()}, {self.available / 2 ** 30:.2f} GiB available"
        if self.changes:
            return text + ": " + "; ".join(self.changes)
        return text + (": fits as set" if self.fits else ": does NOT fit")


def available_bytes(device: torch.device, limit_mib: int = 0) -> int:
    """Free memory of the device (a configured limit wins: a simulated smaller device)."""
    if limit_mib:
        return int(limit_mib) * MIB
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:  # Linux: what can be allocated without swapping, page cache included
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits


def plan(estimate_for: Callable[[TrainConfig], MemoryEstimate], config: TrainConfig, available: int) -> MemoryPlan:
    """The plan for ``config`` (``config.memory``: "check" reports, "auto" adapts): gradient
    checkpointing first, then halving the batch while doubling gradient accumulation. With "auto",
    raises InvalidInputError with the numbers when even the smallest plan exceeds the available
    memory; "check" returns the plan as set (the caller warns when it does not fit)."""
    first = plan_for = MemoryPlan(estimate_for(config), available, config)
    if plan_for.fits or config.memory != "auto":
        return plan_for
    candidates = []
    if not config.gradient_checkpointing:
        candidates.append((dataclasses.replace(config, gradient_checkpointing=True), "gradient checkpointing on"))
    batch, accumulation = config.batch_size, config.gradient_accumulation
    checkpointing = dataclasses.replace(config, gradient_checkpointing=True)
    while batch > 1:
        batch, accumulation = (batch + 1) // 2, accumulation * 2
        candidates.append((dataclasses.replace(checkpointing, batch_size=batch, gradient_accumulation=accumulation),
                           f"gradient checkpointing on, batch {batch} × {accumulation} accumulated steps"))
    for candidate, change in candidates:
        plan_for = MemoryPlan(estimate_for(candidate), available, candidate, [change])
        if plan_for.fits:
            return plan_for
    smallest = plan_for
    raise InvalidInputError(
        f"Not enough memory for this run: it needs {first.estimate.describe()} and even the smallest plan "
        f"({smallest.changes[0] if smallest.changes else 'as set'}) needs {smallest.estimate.total / 2 ** 30:.2f} "
        f"GiB, but {available / 2 ** 30:.2f} GiB is available (using at most {HEADROOM:.0%}). Lower the "
        "resolution, use mixed precision (bf16/fp16), free the device, or use a larger one."
    )


def estimate(host, config: TrainConfig, method, *, images: int, class_images: int, concepts: int) -> MemoryEstimate:
    """The run's estimate on ``host`` (its models as loaded) for ``config`` and a method class (what
    it trains and attaches: ``method.memory_needs``)."""
    needs = method.memory_needs(host, config, concepts)
    unet_config = host.unet_config()
    class_rows = config.batch_size if class_images else 0
    prior = dataclasses.replace(config, augment=False)
    return MemoryEstimate(
        resident=host.resident_bytes(),
        latents=latent_bank_bytes(config, images) + (latent_bank_bytes(prior, class_images) if class_images else 0),
        trained=2 * 4 * needs.trained_values,
        step=step_bytes(unet_config, config, train_mode=needs.kv_mode, method=method,
                        text_config=[m.config for m in host.text.models] if needs.text_rows else None,
                        text_rows=needs.text_rows,
                        class_rows=class_rows + needs.unet_rows),
    )

