"""The report nodes: SPL Loss Monitor and ClassDiffusion Drift Report."""

from __future__ import annotations

import logging

import torch

import folder_paths
from comfy_api.latest import io, ui

from ..classdiffusion.concept import load_concept
from ..classdiffusion.evaluation.drift import concept_drifts, summary as drift_summary
from ..classdiffusion.run.plot import plot_drift_map, plot_history
from ..classdiffusion.run.summary import drift_line, summary_line
from .comfy_glue import (
    CONCEPT_FOLDER, check_clip_family, history_payload,
)
from .comfy_host import comfy_text_encoder, default_text_dtype

from .inputs import ConceptType, HistoryType, CATEGORY, image_tensor

logger = logging.getLogger("classdiffusion")


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
        image = image_tensor(plot_history(records, tokens=history.get("tokens", []),
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
        images = [image_tensor(plot_drift_map(drift["map"])) for drift in drifts]
        lines = [drift_summary(drift) for drift in drifts]
        image = torch.cat(images)
        return io.NodeOutput(image, "\n".join(lines), ui=ui.PreviewImage(image, cls=cls))
