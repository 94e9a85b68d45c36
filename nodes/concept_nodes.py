"""The nodes that use a trained concept: Load Concept K/V, Compare Concept Steps, Pick Concept Step
and Export Concept K/V as LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import folder_paths
from comfy_api.latest import io, ui

from ..classdiffusion.concept import atomic_save_file, load_concept, run_files
from ..classdiffusion.methods import method_class
from ..classdiffusion.evaluation.picker import DEFAULT_COMPOSITION, TOLERANCE
from .comfy_glue import (
    CONCEPT_FOLDER, apply_concept_to_comfy, clip_with_tea, loras_dir,
    model_base_weights,
)
from .comfy_host import diffusers_to_comfy_map, model_family
from .glue import diff_file_tensors, sanitize_name
from .inputs import (ConceptType, CATEGORY, advanced_option, image_tensor, concept_file_inputs, sampling_inputs,
                     label_picture)

logger = logging.getLogger("classdiffusion")


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
                io.Float.Input("tea", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="TEA (test-time embedding adjustment, ICLR 2026; 0 = off, its source: 0.2): a prompt "
                                       "with the token is turned this far towards the same prompt without it, at "
                                       "encoding time. Nothing in the concept file changes."),
                io.Float.Input("tea_alpha", default=0.5, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="With TEA: how far the embedding's norm moves to the class prompt's (its source: 0.5).",
                               **advanced_option()),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     ConceptType.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, model, clip, concept_name, strength_model, strength_clip, allow_other_base, tea=0.0,
                tea_alpha=0.5) -> io.NodeOutput:
        path = folder_paths.get_full_path(CONCEPT_FOLDER, concept_name)
        if path is None:
            from ..classdiffusion.errors import ConceptFileError

            raise ConceptFileError(f"The concept file {concept_name!r} is not in models/{CONCEPT_FOLDER}.")
        concept = load_concept(path)
        model_family(model)
        concept.check_against(model_base_weights(model, concept.train_mode), what="this MODEL",
                              strict=not allow_other_base)
        out_model, out_clip = apply_concept_to_comfy(model, clip, concept, strength_model, strength_clip)
        if tea > 0 and concept.tokens:
            out_clip = clip_with_tea(out_clip, tea, tea_alpha)
        return io.NodeOutput(out_model, out_clip, concept)


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
            tiles.append(label_picture(image[:1], label))
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
        plot = image_tensor(plot_pick(result))
        chosen_name = Path(result.chosen_file).name
        shown = {**ui.PreviewImage(plot, cls=cls).as_dict(), "text": [f"chosen: {chosen_name}\n{summary}"]}
        return io.NodeOutput(out_model, out_clip, plot, chosen_name, summary, ui=shown)


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
