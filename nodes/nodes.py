"""The ClassDiffusion nodes (ComfyUI V3 schema): the extension ComfyUI loads. Thin glue —
ComfyUI objects → trainer → ComfyUI; the nodes live in ``training_nodes``, ``concept_nodes`` and
``report_nodes``, what they share in ``inputs``."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .comfy_glue import register_folders
from .concept_nodes import CompareConceptStepsNode, ExportDiffNode, LoadConceptNode, PickConceptStepNode
from .report_nodes import DriftReportNode, LossMonitorNode
from .training_nodes import ConceptImagesNode, ConceptSpecNode, TrainConceptNode


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



__all__ = ["ClassDiffusionExtension", "comfy_entrypoint", "TrainConceptNode", "ConceptImagesNode", "ConceptSpecNode",
           "LoadConceptNode", "LossMonitorNode", "DriftReportNode", "ExportDiffNode", "CompareConceptStepsNode",
           "PickConceptStepNode"]
