"""The training nodes: a concept's images, a further concept, and Train ClassDiffusion Concept."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

import folder_paths
from comfy_api.latest import io

from ..classdiffusion.concept import run_files
from ..classdiffusion.config import ConceptSpec, TrainConfig, setting_info
from ..classdiffusion.run.data import ConceptData
from ..classdiffusion.methods import DEFAULT_METHOD, method_class
from ..classdiffusion.model.precision import precision_dtype
from ..classdiffusion.run.train import train
from .comfy_glue import (
    CONCEPT_FOLDER, ComfyCallbacks, apply_concept_to_comfy, concept_dir, history_payload, save_embeddings, training_patcher,
)
from .comfy_host import ComfyHost, model_family
from .glue import sanitize_name
from .inputs import (
    ConceptType, ConceptSpecType, HistoryType, CATEGORY, advanced_option, setting_input, method_inputs_after, mixed_precision_for, note_image, image_tensor,
)

logger = logging.getLogger("classdiffusion")


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
                setting_input(io.Boolean, "channels_last", optional=True, **advanced_option()),
                setting_input(io.Boolean, "compile", optional=True, **advanced_option()),
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
            method, steps=steps, batch_size=batch_size, learning_rate=learning_rate, resolution=resolution, seed=seed, mixed_precision=mixed_precision_for(mixed_precision, model),
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
            grid = image_tensor(result.validation_grid)
            logger.info("Concept training: validation took %.0f %% of the run time.",
                        100 * result.validation_seconds / max(result.seconds, 1e-9))
        else:
            grid = image_tensor(note_image("validation off (validation_every = 0)"))
        return io.NodeOutput(out_model, out_clip, concept, history_payload(concept, path), grid)
