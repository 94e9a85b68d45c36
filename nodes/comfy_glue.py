"""ComfyUI-side helpers shared by the nodes: folders, the training patcher, CLIP token wrapping,
progress and cancel, applying a concept to a MODEL and CLIP, the MODEL's base weights, and the
embedding files."""

from __future__ import annotations

import copy
import logging
import os
import time
import types
from pathlib import Path

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..classdiffusion.concept import Concept, run_files
from ..classdiffusion.concept import save_embeddings as write_embeddings
from ..classdiffusion.errors import BaseMismatchError
from ..classdiffusion.model.families import family_named
from ..classdiffusion.model.kv import trained_names
from ..classdiffusion.methods import method_class
from ..classdiffusion.model.embedding_adjustment import DEFAULT_ALPHA, adjust_towards_class
from ..classdiffusion.model.prompt_record import ConditionRegistry, RegistryPositions
from ..classdiffusion.run.progress import step_postfix
from ..classdiffusion.run.train import TrainCallbacks
from .comfy_host import clip_family, diffusers_to_comfy_map
from .glue import TOKEN_MARKER, rewrite_prompt

logger = logging.getLogger("classdiffusion")

CONCEPT_FOLDER = "classdiffusion"


def register_folders() -> None:
    """models/classdiffusion holds concept files (listed by the Load node)."""
    path = os.path.join(folder_paths.models_dir, CONCEPT_FOLDER)
    if CONCEPT_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CONCEPT_FOLDER] = ([path], {".safetensors"})
    else:
        folder_paths.add_model_folder_path(CONCEPT_FOLDER, path)


def concept_dir() -> Path:
    return Path(folder_paths.get_folder_paths(CONCEPT_FOLDER)[0])


def embeddings_dir() -> Path:
    return Path(folder_paths.get_folder_paths("embeddings")[0])


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def training_patcher(model):
    """A ModelPatcher whose UNet weights are ordinary tensors (not inference tensors), loaded on
    ComfyUI's device. ``clone(force_deepcopy=True)`` reloads the weights as the stock LoRA trainer
    does; where a loader cannot do that, the weights of a plain clone are copied once."""
    try:
        patcher = model.clone(force_deepcopy=True)
    except (RuntimeError, TypeError):
        patcher = model.clone()
        for param in patcher.model.diffusion_model.parameters():
            if param.is_inference():
                param.data = param.data.clone()
    patcher.model.requires_grad_(False)
    comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    return patcher


def model_with_deltas(model, deltas: dict[str, torch.Tensor], to_comfy: dict[str, str], strength: float):
    """A clone of ``model`` with the deltas as weight patches (other graph branches keep the base)."""
    out = model.clone()
    patches = {f"diffusion_model.{to_comfy[name]}": ("diff", (delta.float(),)) for name, delta in deltas.items()}
    missing = out.add_patches(patches, strength)
    if len(missing) != len(patches):
        raise RuntimeError(f"ComfyUI refused {len(patches) - len(missing)} weight patches.")
    return out


def check_clip_family(clip, concept: Concept) -> None:
    """A concept's tokens only fit the text encoders of its own family: refused before anything changes."""
    family, own = clip_family(clip), family_named(concept.family)
    if family is not own:
        raise BaseMismatchError(f"This concept was trained on a {own.label} base, and this CLIP is {family.label}'s: "
                                f"load a {own.label} checkpoint, or train the concept again on this one.")


def clip_with_tokens(clip, tokens: list[str], vectors: torch.Tensor, strength: float = 1.0):
    """A clone of ``clip`` whose tokenizer(s) turn each token into its learned vector, so prompts can
    say "a photo of a <sks> dog" (SDXL: CLIP-L's tokenizer gets each vector's 768 part, bigG's its
    1280 part). The incoming CLIP is not changed; Load nodes stack."""
    family = clip_family(clip)
    out = clip.clone()
    out.tokenizer = copy.copy(clip.tokenizer)
    parts = family.split(vectors) if len(vectors) else [vectors] * len(family.embedding_keys)
    for key, part in zip(family.embedding_keys, parts):
        inner = copy.copy(getattr(clip.tokenizer, key))
        setattr(out.tokenizer, key, inner)
        _teach_tokens(inner, tokens, part, strength)
    return out


def _teach_tokens(inner, tokens: list[str], vectors: torch.Tensor, strength: float) -> None:
    """Patch one of ComfyUI's SDTokenizers: the tokens are rewritten to markers it resolves to the vectors."""
    table = dict(getattr(inner, "_classdiffusion_vectors", {}))
    offset = len(table)
    for i, vector in enumerate(vectors):
        table[f"{TOKEN_MARKER}{offset + i}"] = (vector.detach().float().cpu() * strength)
    inner._classdiffusion_vectors = table
    known_tokens = list(getattr(inner, "_classdiffusion_tokens", [])) + list(tokens)
    inner._classdiffusion_tokens = known_tokens
    if inner.embedding_directory is None:
        inner.embedding_directory = []
    base_tokenize = type(inner).tokenize_with_weights
    base_lookup = type(inner)._try_get_embedding

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return base_tokenize(self, rewrite_prompt(text, self._classdiffusion_tokens), return_word_ids, **kwargs)

    def _try_get_embedding(self, embedding_name):
        name = embedding_name.split()[0] if embedding_name.split() else embedding_name
        if name in self._classdiffusion_vectors:
            leftover = " ".join(embedding_name.split()[1:])
            return self._classdiffusion_vectors[name], name, leftover
        return base_lookup(self, embedding_name)

    inner.tokenize_with_weights = types.MethodType(tokenize_with_weights, inner)
    inner._try_get_embedding = types.MethodType(_try_get_embedding, inner)


def clip_with_tea(clip, rho: float, alpha: float = DEFAULT_ALPHA):
    """A clone of ``clip`` that applies TEA (``classdiffusion.model.embedding_adjustment``) to every
    prompt holding one of its concept tokens: the prompt is also encoded without them (the class
    prompt: each chunk with the concept's vectors taken out and padded again) and its conditioning
    — and pooled output, SDXL's — is turned ``rho`` of the way towards that one. Prompts without a
    concept token encode as before. An object patch on ``encode_token_weights``, stacked on earlier ones."""
    out = clip.clone()
    existing = out.patcher.object_patches.get("encode_token_weights")
    model = out.cond_stage_model
    original = existing or type(model).encode_token_weights.__get__(model)
    vectors = [v for key in clip_family(clip).embedding_keys
               for v in getattr(getattr(out.tokenizer, key), "_classdiffusion_vectors", {}).values()]

    def is_concept(token) -> bool:
        return isinstance(token, torch.Tensor) and any(token.shape == v.shape and torch.equal(token, v) for v in vectors)

    def without_concepts(pairs):
        stripped, found = {}, False
        for key, chunks in pairs.items():
            stripped[key] = []
            for chunk in chunks:
                kept = [item for item in chunk if not is_concept(item[0])]
                found = found or len(kept) < len(chunk)
                stripped[key].append(kept + [chunk[-1]] * (len(chunk) - len(kept)))  # padded as before
        return stripped, found

    def encode_token_weights(token_weight_pairs):
        result = original(token_weight_pairs)
        if not isinstance(token_weight_pairs, dict):
            return result
        class_pairs, found = without_concepts(token_weight_pairs)
        if not found:
            return result
        towards = original(class_pairs)
        cond = adjust_towards_class(result[0], towards[0].to(result[0]), rho, alpha)
        pooled = result[1]
        if pooled is not None and towards[1] is not None:
            pooled = adjust_towards_class(pooled[:, None], towards[1][:, None].to(pooled), rho, alpha)[:, 0]
        return (cond, pooled, *result[2:])

    out.patcher.add_object_patch("encode_token_weights", encode_token_weights)
    return out


#: Seconds between two redraws of the Train node's loss-plot preview.
PREVIEW_INTERVAL_S = 1.0


class ComfyCallbacks(TrainCallbacks):
    """ComfyUI's progress bar, a live loss plot as the node's preview, and Cancel (checked before
    every step)."""

    def __init__(self, total_steps: int, node_id: str | None = None, tokens: list[str] | None = None):
        self.bar = comfy.utils.ProgressBar(total_steps, node_id=node_id)
        self.total = total_steps
        self.tokens = tokens or []
        self.history: list[dict] = []
        self.checkpoints: list[int] = []
        self.preview_every = max(1, total_steps // 20)
        self._last_preview = float("-inf")

    def on_step(self, record, total_steps: int) -> None:
        """Records arrive in bursts, when the loop reads the losses back: the loss plot is redrawn at
        most every PREVIEW_INTERVAL_S (and at the last step), not for every record of a burst."""
        self.history.append(record.to_dict())
        preview = None
        now = time.monotonic()
        if record.step == total_steps or (record.step % self.preview_every == 0
                                          and now - self._last_preview >= PREVIEW_INTERVAL_S):
            self._last_preview = now
            from ..classdiffusion.run.plot import plot_history

            preview = ("JPEG", plot_history(self.history, width=512, height=384, tokens=self.tokens,
                                            checkpoints=self.checkpoints), 512)
        self.bar.update_absolute(record.step, total_steps, preview)
        if record.step % 25 == 0 or record.step == total_steps:
            logger.info("concept training step %d/%d: %s", record.step, total_steps,
                        ", ".join(f"{name} {value}" for name, value in step_postfix(record).items()))

    def should_stop(self) -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False

    def on_validation(self, step: int, images, grid, path) -> None:
        """The grid so far replaces the preview until the next loss plot (and stays in the output)."""
        self.bar.update_absolute(step, self.total, ("JPEG", grid, 768))
        logger.info("concept training: validation at step %d%s", step, f": {path}" if path else "")

    def on_checkpoint(self, path: Path) -> None:
        if self.history:
            self.checkpoints.append(self.history[-1]["step"])
        logger.info("concept training: saved %s", path)


#: Every prompt the CLIPs of concepts that act at a word encoded: features → token ids.
PROMPT_REGISTRY = ConditionRegistry()


def word_ids_for(clip, word: str) -> list[int]:
    """The token ids ``word`` becomes inside a prompt, by this CLIP's own tokenizer."""
    inner = clip.tokenizer.clip_l
    ids = inner.tokenizer(word)["input_ids"]
    return [int(i) for i in ids[getattr(inner, "tokens_start", 1):-1]]


def _chunk_ids(chunks) -> torch.Tensor:
    """ComfyUI's token chunks (lists of (token, weight[, word id])) → one row of ids; an embedding
    (a tensor in place of an id) becomes -1."""
    ids = [int(item[0]) if isinstance(item[0], int) else -1 for chunk in chunks for item in chunk]
    return torch.tensor(ids, dtype=torch.long)[None]


def clip_recording_prompts(clip):
    """A clone of ``clip`` whose encodings are registered in PROMPT_REGISTRY (an object patch on
    its text model's ``encode_token_weights``, so clones made later by other nodes keep it)."""
    out = clip.clone()
    existing = out.patcher.object_patches.get("encode_token_weights")
    if getattr(existing, "classdiffusion_records_prompts", False):
        return out  # already recording (another concept that acts at a word is loaded)
    model = out.cond_stage_model
    original = existing or type(model).encode_token_weights.__get__(model)  # chain on another pack's patch

    def encode_token_weights(token_weight_pairs):
        result = original(token_weight_pairs)
        chunks = token_weight_pairs.get("l") if isinstance(token_weight_pairs, dict) else None
        if chunks:
            try:
                PROMPT_REGISTRY.register(result[0], _chunk_ids(chunks))
            except Exception as exc:  # never break text encoding over the registry
                logger.warning("Could not record a prompt's tokens (%s); concepts acting at a word skip it.", exc)
        return result

    encode_token_weights.classdiffusion_records_prompts = True
    out.patcher.add_object_patch("encode_token_weights", encode_token_weights)
    return out


def model_with_output_patches(model, patches, to_comfy: dict[str, str]):
    """A clone of ``model`` whose modules pass their outputs through a method's patches (object
    patches on their ``forward``, stacked over earlier ones; a call whose input is not a [B, T, D]
    context is left alone)."""
    import comfy.utils

    out = model.clone()
    for name, patch in patches:
        module_key = "diffusion_model." + to_comfy[f"{name}.weight"].rpartition(".")[0]
        key = module_key + ".forward"
        previous = out.object_patches.get(key)
        if previous is None:
            module = comfy.utils.get_attr(out.model, module_key)
            previous = type(module).forward.__get__(module)

        def forward(x, *args, _previous=previous, _patch=patch, **kwargs):
            result = _previous(x, *args, **kwargs)
            return result if x.ndim != 3 else _patch(result, x)

        out.add_object_patch(key, forward)
    return out


def apply_concept_to_comfy(model, clip, concept: Concept, strength_model: float, strength_clip: float):
    """(MODEL, CLIP) with the concept: K/V weight patches and token embeddings, and its method's own
    tensors as output patches (Infusion's residuals at the class word, with a CLIP that records its
    prompts' tokens so the patches find the word)."""
    method = method_class(concept.method)
    if concept.tokens:
        check_clip_family(clip, concept)
    to_comfy = diffusers_to_comfy_map(model)
    out_model = model_with_deltas(model, concept.deltas, to_comfy, strength_model)
    out_clip = clip_with_tokens(clip, concept.tokens, concept.token_vectors, strength_clip)
    positions_of = None
    if method.records_prompts:
        out_clip = clip_recording_prompts(out_clip)

        def positions_of(word: str) -> RegistryPositions:
            return RegistryPositions(PROMPT_REGISTRY, word_ids_for(clip, word))

    patches = method.sampling_patches(concept, strength_model, positions_of)
    if patches:
        out_model = model_with_output_patches(out_model, patches, to_comfy)
    return out_model, out_clip


def history_payload(concept: Concept, path=None) -> dict:
    """What flows on a history wire: the per-step records, the drift before and after, and the
    steps of the run's saved checkpoints (the monitor marks them)."""
    return {"history": concept.history, "tokens": list(concept.tokens),
            "drift_initial": concept.meta.drift_initial, "drift_final": concept.meta.drift_final,
            "checkpoints": [step for step, _ in run_files(path)[1]] if path is not None else []}


def save_embeddings(concept: Concept, name: str) -> list[str]:
    """models/embeddings/NAME.safetensors ({"clip_l": [1, 768]}, SDXL also {"clip_g": [1, 1280]});
    several tokens → NAME_1, NAME_2 …"""
    return [path.stem for path in write_embeddings(concept, embeddings_dir(), name)]


def model_base_weights(model, train_mode: str) -> dict:
    """The MODEL's *base* cross-attention weights by canonical name (ComfyUI keeps the originals
    in ``backup`` while patches are applied)."""
    to_comfy = diffusers_to_comfy_map(model)
    params = dict(model.model.diffusion_model.named_parameters())
    backup = getattr(model, "backup", {}) or {}
    weights = {}
    for name in trained_names(to_comfy, train_mode):
        key = to_comfy[name]
        saved = backup.get(f"diffusion_model.{key}")
        weights[name] = saved.weight if saved is not None else params[key]
    return weights


def tensor_to_pictures(images: torch.Tensor) -> list:
    """A ComfyUI IMAGE batch [B, H, W, C] in 0…1 → PIL pictures (RGB)."""
    import numpy as np
    from PIL import Image

    array = (images[..., :3].clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(picture) for picture in array]


class ClipVisionEncoder:
    """ComfyUI's CLIP_VISION as the step picker's encoder: its projected image embeddings (vision
    only, so the picker measures composition by the context agreement)."""

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision

    def image_features(self, images) -> torch.Tensor:
        import numpy as np

        features = []
        for picture in images:  # one at a time: the pictures may differ in size
            pixels = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]
            output = self.clip_vision.encode_image(pixels, crop=True)
            features.append(output["image_embeds"].float().cpu().reshape(1, -1))
        return torch.cat(features)


def comfy_step_sampler(model, clip, vae, *, steps: int, cfg: float, sampler_name: str, scheduler: str, size: int,
                       negative: str = "", strict: bool = True):
    """The picker's ``sample(concept_file or None, prompts, seeds)`` with ComfyUI's own sampler: the
    file's concept applied to MODEL and CLIP (None: the base), each seed's noise the same for every
    prompt and every file; Cancel stops it between pictures."""
    import comfy.sample

    from ..classdiffusion.concept import load_concept

    channels = getattr(getattr(model.model, "latent_format", None), "latent_channels", 4)

    def sample(path, prompts, seeds):
        tuned_model, tuned_clip = model, clip
        if path is not None:
            concept = load_concept(path)
            concept.check_against(model_base_weights(model, concept.train_mode), what="this MODEL", strict=strict)
            tuned_model, tuned_clip = apply_concept_to_comfy(model, clip, concept, 1.0, 1.0)
        negative_cond = tuned_clip.encode_from_tokens_scheduled(tuned_clip.tokenize(negative))
        rows = []
        for prompt in prompts:
            positive = tuned_clip.encode_from_tokens_scheduled(tuned_clip.tokenize(prompt))
            row = []
            for seed in seeds:
                comfy.model_management.throw_exception_if_processing_interrupted()
                latent = torch.zeros(1, channels, size // 8, size // 8)
                noise = comfy.sample.prepare_noise(latent, seed)
                samples = comfy.sample.sample(tuned_model, noise, steps, cfg, sampler_name, scheduler, positive,
                                              negative_cond, latent, seed=seed, disable_pbar=True)
                row += tensor_to_pictures(vae.decode(samples))
            rows.append(row)
        return rows

    return sample
