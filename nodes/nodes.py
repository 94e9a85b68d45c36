"""The ClassDiffusion nodes (ComfyUI V3 schema). Thin glue: ComfyUI objects → trainer → ComfyUI."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path

import numpy as np
import torch
from typing_extensions import override

import comfy.samplers
import folder_paths
from comfy_api.latest import ComfyExtension, io, ui

from ..classdiffusion.concept import atomic_save_file, load_concept, run_files
from ..classdiffusion.config import ConceptSpec, TrainConfig, setting_info
from ..classdiffusion.run.data import ConceptData
from ..classdiffusion.methods import DEFAULT_METHOD, method_class, method_settings
from ..classdiffusion.evaluation.drift import concept_drifts, summary as drift_summary
from ..classdiffusion.evaluation.picker import DEFAULT_COMPOSITION, TOLERANCE
from ..classdiffusion.run.plot import plot_drift_map, plot_history
from ..classdiffusion.run.summary import drift_line, summary_line
from ..classdiffusion.model.precision import precision_dtype
from ..classdiffusion.run.train import train
from .comfy_glue import (
    CONCEPT_FOLDER, ComfyCallbacks, apply_concept_to_comfy, check_clip_family, concept_dir, history_payload, loras_dir,
    model_base_weights, register_folders, save_embeddings, training_patcher,
)
from .comfy_host import ComfyHost, comfy_text_encoder, default_text_dtype, diffusers_to_comfy_map, model_family
from .glue import diff_file_tensors, sanitize_name, training_precision

logger = logging.getLogger("classdiffusion")

ConceptType = io.Custom("CLASSDIFFUSION_CONCEPT")
ConceptSpecType = io.Custom("CLASSDIFFUSION_CONCEPT_SPEC")
HistoryType = io.Custom("CLASSDIFFUSION_HISTORY")
CATEGORY = "ClassDiffusion"


def _advanced() -> dict:
    """``advanced=True`` where this ComfyUI's inputs know it (it folds the input away under
    "advanced"); older hosts get a plain optional input."""
    try:
        params = inspect.signature(io.Combo.Input).parameters
    except (TypeError, ValueError):
        return {}
    if "advanced" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"advanced": True}
    return {}


def setting_input(kind, name: str, **extra):
    """A node input for a TrainConfig setting: default, range, choices and tooltip come from the
    field (config.setting), so the CLI and the node describe it with the same words."""
    info = setting_info(name)
    options = {key: info[key] for key in ("min", "max", "step") if key in info and kind is not io.Combo}
    if kind is io.Combo:
        options["options"] = list(info["choices"])
    return kind.Input(name, default=info["default"], tooltip=info["help"], **options, **extra)


def method_inputs_after(anchor: str) -> list:
    """The Train node's inputs for the methods' own settings placed after the input ``anchor``
    (their declaration's ``node``: "after:", "optional-after:" or "advanced-after:" ANCHOR): the
    registry decides what the node offers, and each stays where saved workflows expect it."""
    inputs = []
    for own in method_settings():
        place = own.declared.metadata.get("node") or ""
        kind_of_place, _, after = place.partition("-after:") if "-after:" in place else ("", "", place[len("after:"):])
        if after != anchor:
            continue
        info = setting_info(own.name)
        kind = io.Combo if "choices" in info else {bool: io.Boolean, int: io.Int, float: io.Float}[type(info["default"])]
        extra = {} if not kind_of_place else {"optional": True, **(_advanced() if kind_of_place == "advanced" else {})}
        inputs.append(setting_input(kind, own.name, **extra))
    return inputs


def _mixed_precision(choice: str, model) -> str:
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    unet_dtype = model.model.get_dtype()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = training_precision(choice, device.type, unet_dtype, bf16)
    if precision != "no" and precision_dtype(precision) != unet_dtype:
        logger.warning("Training a %s UNet with %s autocast keeps a converted copy of its weights for the "
                       "backward pass; 'auto' avoids that.", unet_dtype, precision)
    return precision


def _note_image(text: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 64), (255, 255, 255))
    ImageDraw.Draw(image).text((6, 26), text, fill=(90, 90, 90))
    return image


def _image_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


class ConceptSpecNode(io.ComfyNode):
    """One more concept for multi-concept training: images, token and class word."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionConcept",
            display_name="ClassDiffusion Concept",
            category=CATEGORY,
            description="Describes an additional concept (its images, token and class word) for joint training.",
            inputs=[
                io.Image.Input("images", tooltip="3–20 images of this concept, as one batch."),
                io.String.Input("token", default="<sks2>", tooltip="A new word for the concept, e.g. <my-cat>. Must not be an existing word."),
                io.String.Input("class_word", default="cat", tooltip="The concept's class, e.g. cat, backpack, barn."),
                io.String.Input("initializer", default="ktn", tooltip="Word the token starts from ('class' = the class word)."),
                io.Image.Input("class_images", optional=True, tooltip="Optional class images for prior preservation."),
            ],
            outputs=[ConceptSpecType.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, images, token, class_word, initializer, class_images=None) -> io.NodeOutput:
        spec = ConceptSpec(token=token.strip(), class_word=class_word, initializer=initializer)
        return io.NodeOutput(ConceptData(spec, images, class_images))


#: Image inputs of the Concept Images node.
CONCEPT_IMAGE_INPUTS = 8


class ConceptImagesNode(io.ComfyNode):
    """A concept's photos as one IMAGE batch, without distorting them."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionImages",
            display_name="Concept Images",
            category=CATEGORY,
            description=("Batches up to 8 images (or image batches) of a concept for the Train node: each is "
                         "center-cropped to a square and resized to one size, as the trainer crops squares anyway "
                         "(core Batch Images would stretch every image to the first one's shape)."),
            inputs=[io.Image.Input("image_1", tooltip="A photo of the concept (or a batch of them).")]
            + [io.Image.Input(f"image_{k}", optional=True, tooltip="Another photo of the concept.")
               for k in range(2, CONCEPT_IMAGE_INPUTS + 1)]
            + [io.Int.Input("size", default=512, min=64, max=2048, step=8, optional=True,
                            tooltip="Side of the squares (at least the training resolution).")],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, image_1, size=512, **more) -> io.NodeOutput:
        import comfy.utils

        batches = [image_1] + [more[f"image_{k}"] for k in range(2, CONCEPT_IMAGE_INPUTS + 1)
                               if more.get(f"image_{k}") is not None]
        squares = [comfy.utils.common_upscale(b[..., :3].movedim(-1, 1), size, size, "bicubic", "center")
                   .movedim(1, -1).clamp(0, 1) for b in batches]
        return io.NodeOutput(torch.cat(squares))


class TrainConceptNode(io.ComfyNode):
    """Train a concept on the loaded SD1.x or SDXL model with one of the registered methods."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionTrainConcept",
            display_name="Train ClassDiffusion Concept",
            category=CATEGORY,
            is_output_node=True,  # it saves the concept and embedding files, so it runs on its own
            description=(
                "Learns a new token and the UNet's cross-attention K/V from a few images, with the "
                "semantic preservation loss that keeps the concept composable (ClassDiffusion); the method "
                "input picks another method (Infusion's residuals, Textual Inversion's token only)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x or SDXL model to personalize (from Load Checkpoint)."),
                io.Clip.Input("clip", tooltip="The CLIP from the same checkpoint (SDXL: CLIP-L and bigG, both trained)."),
                io.Vae.Input("vae", tooltip="The VAE used to encode the training images (once)."),
                io.Image.Input("images", tooltip="3–20 images of the concept, as one batch."),
                io.String.Input("token", default="<sks>", tooltip="A new word for the concept, e.g. <sks>. Must not be an existing word."),
                io.String.Input("class_word", default="dog", tooltip="The concept's class, e.g. dog. A fine-grained single word works best."),
                io.String.Input("prompt_template", default="a photo of a {}", tooltip="Training prompt; {} becomes '<token> <class word>'."),
                setting_input(io.Int, "steps"),
                setting_input(io.Float, "learning_rate"),
                *method_inputs_after("learning_rate"),
                setting_input(io.Int, "batch_size"),
                setting_input(io.Int, "seed", control_after_generate=True),
                setting_input(io.Int, "resolution"),
                io.Combo.Input("mixed_precision", options=["auto", "bf16", "fp16", "no"], default="auto",
                               tooltip=setting_info("mixed_precision")["help"] + " auto: the dtype ComfyUI loaded the "
                               "UNet in (fp16 on most GPUs, bf16 where it chose bf16), full precision on CPU."),
                io.String.Input("initializer", default="ktn", tooltip="Word the token starts from (Custom Diffusion: ktn; 'class' = the class word)."),
                setting_input(io.Boolean, "gradient_checkpointing"),
                io.String.Input("save_name", default="my_concept", tooltip="Saves models/classdiffusion/NAME.safetensors and models/embeddings/NAME.safetensors (use embedding:NAME in any prompt)."),
                io.Image.Input("class_images", optional=True, tooltip="Optional class images (e.g. generated 'a photo of a dog') for prior preservation."),
                ConceptSpecType.Input("concept_2", optional=True, tooltip="A second concept to train jointly."),
                ConceptSpecType.Input("concept_3", optional=True, tooltip="A third concept to train jointly."),
                *method_inputs_after("concept_3"),
                setting_input(io.Boolean, "channels_last", optional=True, **_advanced()),
                setting_input(io.Boolean, "compile", optional=True, **_advanced()),
                setting_input(io.Combo, "method", optional=True),
                io.Mask.Input("masks", optional=True, tooltip="Infusion: one subject mask per image (white = subject) "
                              "weighting its loss. Load Image's MASK marks the transparent part: invert it."),
                setting_input(io.Int, "save_every", optional=True),
                setting_input(io.Int, "validation_every", optional=True),
                io.String.Input("validation_prompts", default="", multiline=True, optional=True,
                                tooltip=setting_info("validation_prompts")["help"]),
                setting_input(io.Int, "validation_steps", optional=True),
                setting_input(io.Int, "validation_seed", optional=True),
                io.Combo.Input("memory", options=list(setting_info("memory")["choices"]), default="auto", optional=True,
                               tooltip=setting_info("memory")["help"] + " The node's default is auto."),
                *method_inputs_after("memory"),  # new inputs go last
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                ConceptType.Output(display_name="concept"),
                HistoryType.Output(display_name="history"),
                io.Image.Output(display_name="validation"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, token, class_word, prompt_template, steps, learning_rate,
                batch_size, seed, resolution, mixed_precision, initializer, gradient_checkpointing, save_name,
                class_images=None, concept_2=None, concept_3=None, channels_last=False, compile=False,
                method=DEFAULT_METHOD, masks=None, save_every=0, validation_every=0, validation_prompts="",
                validation_steps=25, validation_seed=0, memory="auto", **method_settings) -> io.NodeOutput:
        """``method_settings``: the methods' own settings the node offers (``method_inputs_after``)."""
        name = sanitize_name(save_name)
        model_family(model)
        data = [ConceptData(ConceptSpec(token=method_class(method).concept_token(token), class_word=class_word,
                                        prompt=prompt_template, initializer=initializer), images, class_images,
                            masks=masks)]
        for extra in (concept_2, concept_3):
            if extra is not None:  # copies: ComfyUI caches the Concept node's output for the next run
                data.append(dataclasses.replace(extra, spec=dataclasses.replace(extra.spec, prompt=prompt_template)))
        specs = [d.spec for d in data]
        config = TrainConfig.for_method(
            method, steps=steps, batch_size=batch_size, learning_rate=learning_rate, resolution=resolution, seed=seed, mixed_precision=_mixed_precision(mixed_precision, model),
            gradient_checkpointing=gradient_checkpointing, drift_every=max(1, steps // 25),
            channels_last=channels_last, compile=compile,
            save_every=save_every, checkpoint_optimizer=False,  # step files to compare, not to resume
            validation_every=validation_every, validation_steps=validation_steps, validation_seed=validation_seed,
            validation_prompts=[line.strip() for line in validation_prompts.splitlines() if line.strip()],
            memory=memory, **method_settings,
        )
        with torch.inference_mode(False), torch.enable_grad():
            patcher = training_patcher(model)
            text_dtype = precision_dtype(config.mixed_precision) if config.mixed_precision != "no" else None
            host = ComfyHost(patcher, clip, vae, text_dtype=text_dtype)
            out = concept_dir() / f"{name}.safetensors"
            try:
                result = train(
                    host, data, config, out=out,
                    callbacks=ComfyCallbacks(steps, cls.hidden.unique_id, [spec.token for spec in specs]),
                    meta_extra={"base_name": "ComfyUI MODEL", "host": "comfyui"},
                    validation_dir=Path(folder_paths.get_output_directory()) / CONCEPT_FOLDER / "validation",
                )
            finally:
                host.close()
                del patcher
        concept, path = result.concept, result.path
        logger.info("Saved %s (%.1f KB, %s).", path, path.stat().st_size / 1024, concept.method_label)
        for _, stale in run_files(path)[1]:  # step files of an earlier run under this name
            if stale not in result.checkpoints:
                stale.unlink(missing_ok=True)
        save_embeddings(concept, name)
        out_model, out_clip = apply_concept_to_comfy(model, clip, concept, 1.0, 1.0)
        if result.validation_grid is not None:
            grid = _image_tensor(result.validation_grid)
            logger.info("Concept training: validation took %.0f %% of the run time.",
                        100 * result.validation_seconds / max(result.seconds, 1e-9))
        else:
            grid = _image_tensor(_note_image("validation off (validation_every = 0)"))
        return io.NodeOutput(out_model, out_clip, concept, history_payload(concept, path), grid)


def concept_file_inputs(clip_tooltip: str, file_tooltip: str, *between) -> list:
    """model, clip, ``between``, concept_name: the inputs of the nodes that apply a concept file."""
    return [io.Model.Input("model", tooltip="The SD1.x or SDXL model the concept was trained on."),
            io.Clip.Input("clip", tooltip=clip_tooltip), *between,
            io.Combo.Input("concept_name", options=folder_paths.get_filename_list(CONCEPT_FOLDER),
                           tooltip=file_tooltip)]


class LoadConceptNode(io.ComfyNode):
    """Apply a trained concept file to a MODEL and CLIP."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionLoadConcept",
            display_name="Load Concept K/V",
            category=CATEGORY,
            description=("Applies a concept: ClassDiffusion's K/V weight patches on the MODEL and token(s) on the CLIP, "
                         "or an Infusion concept's residuals where its class word stands in a prompt encoded by the "
                         "returned CLIP (other prompts are untouched). Several stack."),
            inputs=[
                *concept_file_inputs("Its CLIP; the returned CLIP understands the concept's token(s).",
                                     "A file in models/classdiffusion."),
                io.Float.Input("strength_model", default=1.0, min=-2.0, max=2.0, step=0.01, tooltip="Strength of the K/V patches."),
                io.Float.Input("strength_clip", default=1.0, min=-2.0, max=2.0, step=0.01, tooltip="Scale of the token embedding(s)."),
                io.Boolean.Input("allow_other_base", default=False, tooltip="Apply even if the concept was trained on another checkpoint (results may be poor)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     ConceptType.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, model, clip, concept_name, strength_model, strength_clip, allow_other_base) -> io.NodeOutput:
        path = folder_paths.get_full_path(CONCEPT_FOLDER, concept_name)
        if path is None:
            from ..classdiffusion.errors import ConceptFileError

            raise ConceptFileError(f"The concept file {concept_name!r} is not in models/{CONCEPT_FOLDER}.")
        concept = load_concept(path)
        model_family(model)
        concept.check_against(model_base_weights(model, concept.train_mode), what="this MODEL",
                              strict=not allow_other_base)
        out_model, out_clip = apply_concept_to_comfy(model, clip, concept, strength_model, strength_clip)
        return io.NodeOutput(out_model, out_clip, concept)


def sampling_inputs() -> list:
    """steps, cfg, sampler_name, scheduler, size: how the step-comparing nodes sample (paper: DDIM, 6.0)."""
    return [io.Int.Input("steps", default=30, min=1, max=200, tooltip="Sampling steps."),
            io.Float.Input("cfg", default=6.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance (paper: 6.0)."),
            io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="ddim"),
            io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="ddim_uniform"),
            io.Int.Input("size", default=512, min=64, max=1024, step=64, tooltip="Width and height.")]


def _label(image: torch.Tensor, text: str) -> torch.Tensor:
    """``text`` on a white strip above an IMAGE tile [1, H, W, 3]."""
    from PIL import Image, ImageDraw

    array = (image[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    tile = Image.fromarray(array)
    canvas = Image.new("RGB", (tile.width, tile.height + 18), (255, 255, 255))
    canvas.paste(tile, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), text, fill=(0, 0, 0))
    return _image_tensor(canvas)


class CompareConceptStepsNode(io.ComfyNode):
    """One prompt sampled with each saved step of a training run, side by side."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionCompareSteps",
            display_name="Compare Concept Steps",
            category=CATEGORY,
            is_output_node=True,
            description=("Samples one prompt with every checkpoint of a run (NAME-stepNNNNN.safetensors, written with "
                         "save_every) and the final concept, same seed, into one grid labelled with step, smoothed "
                         "loss and drift rank: pick the step that keeps identity without losing the prompt."),
            inputs=[
                *concept_file_inputs("Its CLIP.", "Any file of the run (the final one or a step file).",
                                     io.Vae.Input("vae", tooltip="Its VAE, to decode the samples.")),
                io.String.Input("prompt", default="a photo of a <sks> dog wearing headphones", multiline=True,
                                tooltip="With the token (ClassDiffusion) or the class word (Infusion)."),
                io.String.Input("negative", default="", multiline=True, tooltip="Negative prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="The same seed for every step."),
                *sampling_inputs(),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, clip, vae, concept_name, prompt, negative, seed, steps, cfg, sampler_name, scheduler,
                size) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.utils
        from ..classdiffusion.run.summary import ema

        path = folder_paths.get_full_path_or_raise(CONCEPT_FOLDER, concept_name)
        final, step_files = run_files(path)
        files = [file for _, file in step_files] + ([final] if final.is_file() else [])
        bar = comfy.utils.ProgressBar(len(files))
        tiles, lines = [], []
        model_family(model)
        for index, file in enumerate(files):
            comfy.model_management.throw_exception_if_processing_interrupted()
            concept = load_concept(file)
            concept.check_against(model_base_weights(model, concept.train_mode), what="this MODEL")
            tuned_model, tuned_clip = apply_concept_to_comfy(model, clip, concept, 1.0, 1.0)
            positive = tuned_clip.encode_from_tokens_scheduled(tuned_clip.tokenize(prompt))
            negative_cond = tuned_clip.encode_from_tokens_scheduled(tuned_clip.tokenize(negative))
            latent = torch.zeros(1, 4, size // 8, size // 8)
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = comfy.sample.sample(tuned_model, noise, steps, cfg, sampler_name, scheduler, positive,
                                          negative_cond, latent, seed=seed, disable_pbar=True)
            image = vae.decode(samples)[..., :3].float()
            loss = ema([h["loss"] for h in concept.history])[-1] if concept.history else float("nan")
            rank = concept.history[-1].get("drift_rank") if concept.history else None
            label = f"step {concept.step}  loss~{loss:.4f}" + (f"  drift {rank}" if rank else "")
            tiles.append(_label(image[:1], label))
            lines.append(f"{file.name}: {label}")
            bar.update_absolute(index + 1, len(files))
        if not tiles:
            raise ValueError(f"No file of the run {final.name} was found.")
        grid = torch.cat(tiles, dim=2)  # side by side
        return io.NodeOutput(grid, "\n".join(lines), ui=ui.PreviewImage(grid, cls=cls))


#: The Pick node's default composition prompts ({token} and {class} are filled in from the concept).
PICK_PROMPTS = "\n".join(t.format("{token}", "{class}") for t in DEFAULT_COMPOSITION)


class PickConceptStepNode(io.ComfyNode):
    """Score every saved step of a run for identity and composition with a CLIP Vision model, and
    choose the step to keep (classdiffusion.evaluation.picker)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionPickStep",
            display_name="Pick Concept Step",
            category=CATEGORY,
            is_output_node=True,
            description=("Samples the identity prompt ('a photo of a <token> <class>') and the composition prompts with "
                         "every checkpoint of a run (NAME-stepNNNNN.safetensors, from save_every) and the final "
                         "concept, scores identity (CLIP Vision cosine to the reference images) and composition (how "
                         "well the surroundings agree with the base model's picture of the same prompt and seed), and "
                         "picks the most learned step that keeps composition; returns it applied. docs/evaluation.md."),
            inputs=[
                *concept_file_inputs("Its CLIP; the returned CLIP has the chosen step's token.",
                                     "Any file of the run (the final one or a step file).",
                                     io.Vae.Input("vae", tooltip="Its VAE, to decode the samples.")),
                io.Image.Input("references", tooltip="The concept's photos (the training images)."),
                io.ClipVision.Input("clip_vision", tooltip="A CLIP Vision model (Load CLIP Vision) to score with."),
                io.String.Input("composition_prompts", default=PICK_PROMPTS, multiline=True,
                                tooltip="One per line; {token} and {class} are the concept's (or write them out)."),
                io.Int.Input("images_per_prompt", default=2, min=1, max=16, tooltip="Seeds per prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The first seed (the same for every step)."),
                *sampling_inputs(),
                io.Float.Input("tolerance", default=TOLERANCE, min=0.0, max=1.0, step=0.05,
                               tooltip="The rule: the best identity among steps whose composition keeps ≥ 1 − tolerance "
                                       "of the run's composition range (0: the best composition; 1: the best identity)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Image.Output(display_name="plot"), io.String.Output(display_name="chosen"),
                     io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, clip, vae, concept_name, references, clip_vision, composition_prompts, images_per_prompt,
                seed, steps, cfg, sampler_name, scheduler, size, tolerance) -> io.NodeOutput:
        import comfy.utils
        from ..classdiffusion.concept import load_concept
        from ..classdiffusion.evaluation.picker import pick_run, plot_pick, step_files_of
        from .comfy_glue import ClipVisionEncoder, comfy_step_sampler, tensor_to_pictures

        path = folder_paths.get_full_path_or_raise(CONCEPT_FOLDER, concept_name)
        files, last = step_files_of(path)
        model_family(model)
        last.check_against(model_base_weights(model, last.train_mode), what="this MODEL")
        token, class_word = last.tokens[0], last.meta.concepts[0]["class_word"]
        prompts = [line.strip().replace("{token}", token).replace("{class}", class_word)
                   for line in composition_prompts.splitlines() if line.strip()]
        bar = comfy.utils.ProgressBar(len(files))
        sampler = comfy_step_sampler(model, clip, vae, steps=steps, cfg=cfg, sampler_name=sampler_name,
                                     scheduler=scheduler, size=size)
        result = pick_run(files, sampler, ClipVisionEncoder(clip_vision), tensor_to_pictures(references),
                          token=token, class_word=class_word, tolerance=tolerance, prompts=prompts or None,
                          seeds=range(seed, seed + images_per_prompt),
                          on_step=lambda done, total: bar.update_absolute(done, total))
        chosen = load_concept(result.chosen_file)
        out_model, out_clip = apply_concept_to_comfy(model, clip, chosen, 1.0, 1.0)
        lines = [f"step {s.step}: identity {s.identity:.4f}, composition ({result.composition_measure}) "
                 f"{s.composition:.4f}" + ("  <- chosen" if s.step == result.chosen_step else "") for s in result.steps]
        summary = "\n".join(lines + [result.reason])
        plot = _image_tensor(plot_pick(result))
        chosen_name = Path(result.chosen_file).name
        shown = {**ui.PreviewImage(plot, cls=cls).as_dict(), "text": [f"chosen: {chosen_name}\n{summary}"]}
        return io.NodeOutput(out_model, out_clip, plot, chosen_name, summary, ui=shown)


class LossMonitorNode(io.ComfyNode):
    """Plot a training history: the loss terms its method recorded (smoothed) and its per-concept diagnostics."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionLossMonitor",
            display_name="SPL Loss Monitor",
            category=CATEGORY,
            is_output_node=True,
            description=("Shows the total loss and each loss term the method recorded per step, raw and smoothed (ClassDiffusion: "
                         "reconstruction and SPL), and how close each concept stays to its class (EOS cosine, drift rank)."),
            inputs=[
                HistoryType.Input("history", optional=True, tooltip="The history output of Train ClassDiffusion Concept."),
                io.Combo.Input("concept_name", options=["(none)"] + folder_paths.get_filename_list(CONCEPT_FOLDER), default="(none)", optional=True, tooltip="Or a saved concept file (it carries its history)."),
            ],
            outputs=[io.Image.Output(display_name="plot"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, history=None, concept_name="(none)") -> io.NodeOutput:
        if history is None:
            if not concept_name or concept_name == "(none)":
                raise ValueError("Connect a training history or choose a concept file.")
            path = folder_paths.get_full_path_or_raise(CONCEPT_FOLDER, concept_name)
            history = history_payload(load_concept(path), path)
        if isinstance(history, list):  # a bare list of step records
            history = {"history": history, "tokens": []}
        records = history["history"]
        if not records:
            raise ValueError("The history is empty: no training step was recorded.")
        image = _image_tensor(plot_history(records, tokens=history.get("tokens", []),
                                           checkpoints=history.get("checkpoints", [])))
        summary = summary_line(records)
        drift = drift_line(history.get("drift_initial"), history.get("drift_final"))
        if drift:
            summary += "\n" + drift
        if history.get("checkpoints"):
            from ..classdiffusion.run.summary import ema

            smoothed = dict(zip([r["step"] for r in records], ema([r["loss"] for r in records])))
            marks = [f"{step} (loss~{smoothed[step]:.4f})" for step in history["checkpoints"] if step in smoothed]
            summary += "\ncheckpoints at steps " + ", ".join(marks)
        return io.NodeOutput(image, summary, ui=ui.PreviewImage(image, cls=cls))


class DriftReportNode(io.ComfyNode):
    """The paper's text-space view of a concept: how far its token phrase drifted from the class."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionDriftReport",
            display_name="ClassDiffusion Drift Report",
            category=CATEGORY,
            is_output_node=True,
            description=("Ranks 'a <token> <class>' among 71 'a <adjective> <class>' phrases by distance to "
                         "'a <class>' (CLIP EOS features), before and after training, and draws the 2-D map "
                         "(ClassDiffusion §3.2, appendix E). 1 = closest to the class."),
            inputs=[
                io.Clip.Input("clip", tooltip="The base CLIP the concept was trained with."),
                ConceptType.Input("concept", tooltip="A trained or loaded concept."),
                io.Combo.Input("map", options=["pca", "tsne"], default="pca", tooltip="2-D projection: PCA (deterministic) or t-SNE as in the paper (needs scikit-learn)."),
            ],
            outputs=[io.Image.Output(display_name="map"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, clip, concept, map) -> io.NodeOutput:
        import comfy.model_management

        if not concept.tokens:
            from ..classdiffusion.errors import InvalidInputError

            raise InvalidInputError(f"This is a {concept.method_label} concept: it adds no token, so its text "
                                    "features cannot drift (prompts encode exactly as before). The report is for "
                                    "concepts with a token.")
        from ..classdiffusion.model.families import family_named

        check_clip_family(clip, concept)
        device = comfy.model_management.text_encoder_device()
        text = comfy_text_encoder(clip, family_named(concept.family), device, default_text_dtype(device))
        text.add_tokens(concept.tokens)
        drifts = concept_drifts(text.encode, text.word_embedding, concept, method=map, device=device)
        images = [_image_tensor(plot_drift_map(drift["map"])) for drift in drifts]
        lines = [drift_summary(drift) for drift in drifts]
        image = torch.cat(images)
        return io.NodeOutput(image, "\n".join(lines), ui=ui.PreviewImage(image, cls=cls))


class ExportDiffNode(io.ComfyNode):
    """Write a concept's K/V deltas as a LoRA-style .diff file for the stock LoRA loaders."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ClassDiffusionExportDiff",
            display_name="Export Concept K/V as LoRA",
            category=CATEGORY,
            is_output_node=True,
            description="Saves models/loras/NAME.safetensors with diffusion_model.*.diff tensors (load with LoraLoaderModelOnly; use the embedding file for the token).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x or SDXL model (for ComfyUI's layer names)."),
                ConceptType.Input("concept", tooltip="A trained or loaded concept."),
                io.String.Input("save_name", default="my_concept_kv", tooltip="File name in models/loras."),
            ],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def execute(cls, model, concept, save_name) -> io.NodeOutput:
        from ..classdiffusion.errors import InvalidInputError

        method_class(concept.method).check_exportable(concept, "a LoRA")
        if not concept.deltas:
            raise InvalidInputError(f"This {concept.method_label} concept changes no UNet weight, so there is no LoRA "
                                    "to export: its token is the embedding file (embedding:NAME in a prompt).")
        tensors = diff_file_tensors(concept.deltas, diffusers_to_comfy_map(model))
        path = loras_dir() / f"{sanitize_name(save_name)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file(tensors, path, {"classdiffusion_tokens": ",".join(concept.tokens)})
        return io.NodeOutput(str(path), ui=ui.PreviewText(str(path)))


class ClassDiffusionExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        register_folders()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TrainConceptNode, ConceptImagesNode, ConceptSpecNode, LoadConceptNode, LossMonitorNode,
                DriftReportNode, ExportDiffNode, CompareConceptStepsNode, PickConceptStepNode]


async def comfy_entrypoint() -> ClassDiffusionExtension:
    register_folders()
    return ClassDiffusionExtension()
