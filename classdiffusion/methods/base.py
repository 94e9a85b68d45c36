"""The interface of a training method, the narrow context it gets, and what its losses report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

#: The token a spec gets for a method that adds none (ConceptSpec needs one; nothing reads it).
PLACEHOLDER_TOKEN = "<unused>"


@dataclass
class MethodContext:
    """All a method may know of its run: the run hands this over and never itself (so a method
    cannot reach into the loop's state)."""

    host: Any  #: the TrainingHost (text encoder, UNet, sampler)
    config: Any  #: the run's TrainConfig
    concepts: list  #: ConceptSpec per concept
    device: torch.device
    #: canonical name → the base's cross-attention weights of ``weights_mode`` (read-only views)
    base_weights: Mapping[str, torch.Tensor]
    #: whether class images (prior preservation) are part of the batches
    with_prior: bool
    #: log a warning that is also saved in the concept file
    warn: Callable[[str], None]
    #: makes a token's drift probe: (encode, class word, prompt=template) → an object whose
    #: ``measure(token, vector)`` gives the drift (the loop hands in ``evaluation.drift.DriftProbe``,
    #: so a method never reaches up into the evaluation)
    drift_probe: Callable[..., Any] | None = None


@dataclass
class MemoryNeeds:
    """What the memory planner (the run's ``memory`` module) dry-runs for a method: how many values
    are trained (AdamW keeps two moments of each) and what a step attaches and backpropagates."""

    trained_values: int
    #: the K/V train mode whose deltas are hooked into the UNet (None: no delta; a method with
    #: tensors of its own attaches them with ``TrainingMethod.memory_attach``)
    kv_mode: str | None = None
    #: prompts encoded with gradient per step (0: the text encoder runs without gradient)
    text_rows: int = 0
    #: rows the method adds to each step's UNet batch (output preservation's class-prompt rows)
    unet_rows: int = 0


@dataclass
class Losses:
    """One batch's loss: the total that is optimized, its named terms (as the history, the
    progress bars and the SPL Loss Monitor show them) and optional per-concept diagnostics."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    #: e.g. ``{"cos": [EOS cosine of concept k]}``: numbers per concept, not optimized
    diagnostics: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def stacked(self) -> torch.Tensor:
        """[total, *terms, *diagnostics] as one detached float32 tensor on the device, so that
        steps are summed over micro-batches and ranks and read back in bulk (``read``) without a
        device sync per step."""
        scalars = [self.total, *self.terms.values(), *(t for ts in self.diagnostics.values() for t in ts)]
        return torch.stack([s.detach().float().reshape(()) for s in scalars])

    def layout(self) -> "LossLayout":
        """The names behind ``stacked``'s values (kept per step instead of the tensors)."""
        return LossLayout(tuple(self.terms), tuple((name, len(ts)) for name, ts in self.diagnostics.items()))


@dataclass(frozen=True)
class LossLayout:
    """Which value of a :meth:`Losses.stacked` tensor is which, to read it back as numbers."""

    terms: tuple[str, ...]
    diagnostics: tuple[tuple[str, int], ...]

    @property
    def checked(self) -> int:
        """How many leading values must be finite (the total and its terms)."""
        return 1 + len(self.terms)

    def read(self, flat: list[float]) -> tuple[float, dict[str, float], dict[str, list[float]]]:
        """(total, terms, diagnostics) from a list in ``Losses.stacked``' layout."""
        terms = dict(zip(self.terms, flat[1:1 + len(self.terms)]))
        rest, diagnostics = flat[1 + len(self.terms):], {}
        for name, count in self.diagnostics:
            diagnostics[name], rest = rest[:count], rest[count:]
        return flat[0], terms, diagnostics


class TrainingMethod:
    """What is trained, how it is attached to the frozen UNet, and which losses: the part of a run
    that differs between methods. The run (``train.TrainingRun``) calls, in order: ``setup()``
    (before the images are encoded), ``setup_constants()``, ``param_groups()`` once, then per step
    ``phrase()`` for each row, ``losses()`` per micro-batch and ``before_optimizer_step()``;
    ``attach()`` wraps the steps. Registering the class in ``methods/__init__.py`` is all it takes
    for the CLI, the Train node, concept files and resume to offer it."""

    #: The name saved in concept files and given to ``--method`` / the node's method input.
    name: ClassVar[str]
    #: The name people read (inspect, progress bars).
    label: ClassVar[str]
    #: One sentence for ``--method``'s help and the node's tooltip.
    description: ClassVar[str]
    #: TrainConfig defaults of this method where they differ from the fields' (its paper's recipe).
    recipe: ClassVar[dict[str, Any]] = {}
    #: The prompt templates it draws training prompts from (its source's list; none: the spec's own
    #: template). The toy world captions with every method's, so no method prompts an unseen form.
    prompt_templates: ClassVar[tuple[str, ...]] = ()
    #: The method's own settings (``settings.MethodSetting``, declared in its folder's settings.py):
    #: TrainConfig fields, CLI flags and Train node inputs are made from them.
    settings: ClassVar[tuple] = ()
    #: The base weights (train mode) the run reads and fingerprints.
    base_mode: ClassVar[str] = "kv"
    #: Whether subject masks (alpha channel / mask images) weight the loss.
    uses_subject_masks: ClassVar[bool] = False
    #: Whether class images (prior preservation) can be used.
    supports_class_images: ClassVar[bool] = True
    #: Whether the method adds each concept's token to the text encoder (its file lists them).
    has_tokens: ClassVar[bool] = True
    #: The tensors only this method trains (``Concept.method_tensors``), as the concept file holds
    #: them: their key prefix, the metadata entry listing their shapes, and the format version a
    #: file with them needs. None: the method trains only the file's shared kinds (K/V deltas, tokens).
    tensor_prefix: ClassVar[str | None] = None
    tensor_layers_key: ClassVar[str | None] = None
    tensor_format_version: ClassVar[int] = 1
    #: Whether sampling with its concepts needs the prompts' token ids recorded as the text encoder
    #: encodes them (``model.prompt_record``): its tensors act where a word stands.
    records_prompts: ClassVar[bool] = False

    # -- its tensors in a concept file, and applied for sampling (class level: no run needed) ----------
    @classmethod
    def check_tensors(cls, file_name: str, tensors: Mapping[str, torch.Tensor], listed: Mapping[str, list],
                      check_values: Callable[[str, torch.Tensor], None]) -> None:
        """Validate the tensors a file holds under ``tensor_prefix`` against the shapes its metadata
        lists (``listed``); ``check_values(what, tensor)`` refuses a non-float dtype, NaN/inf and
        implausible sizes. ConceptFileError for a damaged file. A method without tensors of its own
        accepts none."""
        from ..errors import ConceptFileError

        if tensors or listed:
            raise ConceptFileError(f"{file_name}: it holds tensors a {cls.label} concept does not have; "
                                   "the file is damaged.")

    @classmethod
    def check_tensors_fit(cls, tensors: Mapping[str, torch.Tensor], base_weights: Mapping[str, torch.Tensor],
                          what: str) -> None:
        """BaseMismatchError when the base lacks a layer the tensors act on, or it has another width."""

    @classmethod
    def sampling_patches(cls, concept: Any, strength: float, positions_of: Callable[[str], Any]) -> list:
        """(canonical module name, output patch) pairs that apply the concept's own tensors at
        sampling time (``model.prompt_record.patch_outputs`` installs them on a diffusers UNet, the
        nodes on ComfyUI's MODEL); ``positions_of(word)`` finds a word in a context by what was
        recorded. Methods whose tensors are weight deltas and tokens: none."""
        return []

    @classmethod
    def check_compressible(cls, concept: Any) -> None:
        """InvalidInputError when a low-rank factorisation cannot shrink the concept."""

    @classmethod
    def check_exportable(cls, concept: Any, format_name: str) -> None:
        """InvalidInputError when whole-weight formats (a LoRA, diffusers' Custom Diffusion) cannot
        express the concept; ``format_name`` names the format for the message."""

    @classmethod
    def memory_attach(cls, config: Any, modules: Mapping[str, nn.Module], weight_names: list[str], rows: int,
                      device: torch.device) -> Callable[[], None] | None:
        """For the memory planner's dry run on the meta device: attach zero tensors of the method's own
        kind to ``modules`` (None: the method trains K/V deltas, which the planner attaches itself)."""
        return None

    @classmethod
    def weights_mode(cls, config) -> str:
        """The train mode whose base weights the run reads and fingerprints."""
        return cls.base_mode

    @classmethod
    def memory_needs(cls, host: Any, config: Any, concepts: int) -> MemoryNeeds:
        """What a step of this method trains, attaches and backpropagates, for the memory planner."""
        raise NotImplementedError

    @classmethod
    def concept_token(cls, token: str) -> str:
        """The spec's token from what the user typed: a method without tokens needs none."""
        token = (token or "").strip()
        return token if cls.has_tokens else token or PLACEHOLDER_TOKEN

    def __init__(self, context: MethodContext):
        self.context = context
        self.host = context.host
        self.config = context.config
        self.concepts = context.concepts
        self.device = context.device

    # -- set up ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Create the trained tensors (and add tokens to the text encoder if the method has any)."""
        raise NotImplementedError

    def setup_constants(self) -> None:
        """Anything computed once after the images are encoded (e.g. fixed text features)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups, in the order a checkpoint stores their optimizer state
        (see ``concept._check_optimizer``)."""
        raise NotImplementedError

    @property
    def learning_rate(self) -> float:
        """The rate logged with each step."""
        raise NotImplementedError

    # -- per step --------------------------------------------------------------------------
    def phrase(self, concept: int, prefix: str, rng: torch.Generator) -> str:
        """The training prompt of one row of concept ``concept``."""
        raise NotImplementedError

    def attach(self) -> Callable[[], None]:
        """Attach the trained tensors to the host's UNet; returns the detach function."""
        raise NotImplementedError

    def losses(self, batch: Any) -> Losses:
        raise NotImplementedError

    def before_optimizer_step(self, keep: torch.Tensor) -> None:
        """After the gradients are final (unscaled, clipped), before AdamW's step. ``keep``: a 0-d
        float tensor on the device, 1.0 when the step updates the weights and 0.0 when AdamW skips it
        (a non-finite gradient: fp16 overflow or a diverged loss); a tensor, not a bool, so that
        deciding costs no device sync — scale in-place updates by it."""

    # -- validation previews -----------------------------------------------------------------
    def validation_contexts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(contexts [P, T, D] of the prompts with the trained text inputs, the empty prompt's [1, T, D]),
        and whatever the attached tensors need to act on them during sampling."""
        from ..model.precision import autocast

        with torch.no_grad(), autocast(self.device, self.config.mixed_precision):
            return (self.host.encode_text(prompts, self.text_vectors()).context,
                    self.host.encode_text([""], {}).context)

    def text_vectors(self) -> dict[str, torch.Tensor]:
        """The trained token vectors to inject into prompts (none for methods without tokens)."""
        return {}

    def end_validation(self) -> None:
        """Undo what ``validation_contexts`` set up."""

    # -- reporting and files ---------------------------------------------------------------
    def drift(self) -> list[dict]:
        """Each token's drift now (methods without tokens: none)."""
        return []

    def load_state(self, checkpoint: Any) -> None:
        """Copy a checkpoint's trained tensors into this run's (resume)."""
        raise NotImplementedError

    @staticmethod
    @torch.no_grad()
    def copy_saved(trained: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], what: str) -> None:
        """Copy each saved tensor into its trained one; a missing name is the checkpoint's fault."""
        from ..errors import InvalidInputError

        for name, tensor in trained.items():
            if name not in saved:
                raise InvalidInputError(f"The checkpoint lacks the {what} of {name}.")
            tensor.copy_(saved[name])

    def concept_fields(self) -> dict[str, Any]:
        """The trained tensors as ``Concept`` fields (deltas, token_vectors, tokens, method_tensors), on the CPU."""
        raise NotImplementedError


class NewTokens:
    """The concepts' new tokens, trained as rows of their own: added to the text encoder, each
    started from its initializer word's embedding (the mean of its pieces). Shared by the methods
    that train a token (ClassDiffusion, Textual Inversion)."""

    def __init__(self, context: MethodContext):
        host, self.context = context.host, context
        host.add_tokens([spec.token for spec in context.concepts])
        vectors = []
        for spec in context.concepts:
            pieces = len(host.initializer_ids(spec.initializer_word))
            if pieces != 1:
                context.warn(f"The initializer {spec.initializer_word!r} is {pieces} tokens; "
                             "the token starts from their mean embedding.")
            vectors.append(host.word_embedding(spec.initializer_word).to(context.device, torch.float32))
        self.vectors = nn.Parameter(torch.stack(vectors))
        self.tokens = [spec.token for spec in context.concepts]

    def trainable(self) -> dict[str, torch.Tensor]:
        """token → its row, with gradient (for the training prompts)."""
        return {token: self.vectors[k] for k, token in enumerate(self.tokens)}

    def detached(self) -> dict[str, torch.Tensor]:
        return {token: vector.detach() for token, vector in self.trainable().items()}

    def drift(self) -> list[dict]:
        """Each token's semantic drift now (cosine to its class phrase, rank among the paper's
        adjective phrases); the phrases without tokens are encoded once."""
        from ..model.precision import autocast

        context = self.context
        if context.drift_probe is None:
            return []

        def encode(prompts, vectors, **options):
            with torch.no_grad(), autocast(context.device, context.config.mixed_precision):
                return context.host.encode_text(prompts, vectors, **options)

        if not hasattr(self, "_probes"):
            self._probes = [context.drift_probe(encode, spec.class_word, prompt=spec.prompt)
                            for spec in context.concepts]
        return [probe.measure(token, self.vectors[k].detach()).to_dict()
                for k, (probe, token) in enumerate(zip(self._probes, self.tokens))]

    @torch.no_grad()
    def load(self, checkpoint: Any) -> None:
        self.vectors.copy_(checkpoint.token_vectors)

    def fields(self) -> dict[str, Any]:
        return {"token_vectors": self.vectors.detach().clone().cpu(), "tokens": list(self.tokens)}
