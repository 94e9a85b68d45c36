"""Build the UI-format example workflows in example_workflows/ from compact descriptions.

    python tools/build_workflows.py OBJECT_INFO.json

OBJECT_INFO.json is a real ComfyUI's /object_info (with AnimateDiff-Evolved and VideoHelperSuite
installed), so widget values are written in the host's own order, with defaults for widgets not
set here. The tests check the result against the host again, so a node change that this file does
not follow fails there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "example_workflows"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
PACKS = {"ClassDiffusion": ("comfyui-classdiffusion", "0.1.0"), "ADE_": ("comfyui-animatediff-evolved", "1.5.7"),
         "VHS_": ("comfyui-videohelpersuite", "1.7.9")}
FRONTEND_ONLY = {"Note", "MarkdownNote"}


#: LiteGraph draws a node's title bar above its position; the layout keeps it clear of other nodes.
TITLE_HEIGHT, GAP, MARGIN = 30, 40, 20
#: Nodes whose body shows an image or a preview below their widgets.
PREVIEW_NODES = {"LoadImage": 260, "SaveImage": 320, "ClassDiffusionLossMonitor": 320, "ClassDiffusionDriftReport": 320,
                 "ClassDiffusionCompareSteps": 320, "ClassDiffusionTrainConcept": 320, "VHS_VideoCombine": 300,
                 "SaveAnimatedWEBP": 300}


def min_size(node: dict) -> tuple[int, int]:
    """At least what the frontend draws: socket rows, one row per widget (multiline text: more),
    and the image preview of nodes that show one."""
    if node["type"] in FRONTEND_ONLY:
        return 300, 120
    sockets = max(len(node["inputs"]), len(node["outputs"]))
    values = node.get("widgets_values") or []
    widget_rows = len(values) if isinstance(values, list) else len(values)
    multiline = sum(1 for v in (values if isinstance(values, list) else values.values())
                    if isinstance(v, str) and ("\n" in v or len(v) > 40))
    height = 10 + 22 * sockets + 26 * widget_rows + 60 * multiline + PREVIEW_NODES.get(node["type"], 0)
    return 300, height


def boxes_overlap(a: dict, b: dict) -> bool:
    """Whether two nodes' drawn boxes (title bar included) intersect."""
    ax0, ay0 = a["pos"][0], a["pos"][1] - TITLE_HEIGHT
    bx0, by0 = b["pos"][0], b["pos"][1] - TITLE_HEIGHT
    ax1, ay1 = a["pos"][0] + a["size"][0], a["pos"][1] + a["size"][1]
    bx1, by1 = b["pos"][0] + b["size"][0], b["pos"][1] + b["size"][1]
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


def input_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's widget inputs in the host's order: required, then optional."""
    out = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            if input_type(spec) in WIDGETS:
                out.append((name, spec))
    return out


def default_value(spec):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    if options.get("options"):
        return options["options"][0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(input_type(spec), "")


class Workflow:
    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, node_type: str, pos, widgets: dict | None = None, size=(320, 120), title: str | None = None,
             text: str | None = None) -> dict:
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [], "properties": {}}
        if title:
            node["title"] = title
        if node_type in FRONTEND_ONLY:
            node["widgets_values"] = [text or ""]
            node["color"], node["bgcolor"] = "#432", "#653"
            self.nodes.append(node)
            return node
        info = self.info[node_type]
        if info.get("deprecated"):
            raise ValueError(f"{node_type} is deprecated on this ComfyUI; use its successor")
        widgets = dict(widgets or {})
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                if input_type(spec) not in WIDGETS:
                    node["inputs"].append({"name": name, "type": input_type(spec), "link": None})
        node["outputs"] = [{"name": name, "type": t, "links": [], "slot_index": i}
                           for i, (name, t) in enumerate(zip(info.get("output_name", info["output"]), info["output"]))]
        values = []
        for name, spec in widget_inputs(info):
            values.append(widgets.pop(name) if name in widgets else default_value(spec))
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                values.append("fixed")
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("image_upload"):
                values.append("image")  # the upload button's value, saved as the frontend saves it
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}")
        if node_type == "VHS_VideoCombine":  # VHS saves its widgets by name
            names = [name for name, _ in widget_inputs(info)]
            values = dict(zip(names, values))
            values["videopreview"] = {"hidden": False, "paused": False, "params": {}}
        node["widgets_values"] = values
        pack = next((p for prefix, p in PACKS.items() if node_type.startswith(prefix)), ("comfy-core", "0.3.60"))
        node["properties"] = {"Node name for S&R": node_type, "cnr_id": pack[0], "ver": pack[1]}
        self.nodes.append(node)
        return node

    def link(self, source: dict, output: str, target: dict, input_name: str) -> None:
        out_slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output)
        in_slot = next(i for i, x in enumerate(target["inputs"]) if x["name"] == input_name)
        link_id = len(self.links) + 1
        link_type = source["outputs"][out_slot]["type"]
        self.links.append([link_id, source["id"], out_slot, target["id"], in_slot, link_type])
        source["outputs"][out_slot]["links"].append(link_id)
        target["inputs"][in_slot]["link"] = link_id

    def to_json(self) -> dict:
        """The workflow with a left-to-right layout: each node in the column of its longest path
        from a source, columns side by side, nodes stacked without overlap; no stored view, so
        ComfyUI fits the graph to the window when it opens it."""
        self._layout()
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}

    def _layout(self) -> None:
        sources: dict[int, list[int]] = {node["id"]: [] for node in self.nodes}
        for _, source, _, target, _, _ in self.links:
            sources[target].append(source)
        depth: dict[int, int] = {}

        def column(node_id: int) -> int:
            if node_id not in depth:
                depth[node_id] = 1 + max((column(s) for s in sources[node_id]), default=-1)
            return depth[node_id]

        columns: dict[int, list[dict]] = {}
        for node in self.nodes:
            node["size"] = [max(node["size"][0], min_size(node)[0]), max(node["size"][1], min_size(node)[1])]
            columns.setdefault(column(node["id"]), []).append(node)
        x = MARGIN
        for index in sorted(columns):
            y = MARGIN + TITLE_HEIGHT
            for node in columns[index]:
                node["pos"] = [x, y]
                y += node["size"][1] + TITLE_HEIGHT + GAP
            x += max(node["size"][0] for node in columns[index]) + GAP


def sampler_chain(wf: Workflow, model, model_out, clip, clip_out, vae, positive: str, x: int, y: int,
                  width=512, height=512, batch=1, steps=100, cfg=6.0, sampler="ddim", scheduler="ddim_uniform",
                  save_prefix="classdiffusion/sample"):
    pos = wf.node("CLIPTextEncode", (x, y), {"text": positive}, size=(400, 160), title="Prompt")
    neg = wf.node("CLIPTextEncode", (x, y + 200), {"text": "blurry, low quality, deformed"}, size=(400, 120),
                  title="Negative prompt")
    wf.link(clip, clip_out, pos, "clip")
    wf.link(clip, clip_out, neg, "clip")
    latent = wf.node("EmptyLatentImage", (x, y + 360), {"width": width, "height": height, "batch_size": batch})
    ksampler = wf.node("KSampler", (x + 440, y), {"seed": 0, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                                                  "scheduler": scheduler, "denoise": 1.0}, size=(320, 260))
    wf.link(model, model_out, ksampler, "model")
    wf.link(pos, "CONDITIONING", ksampler, "positive")
    wf.link(neg, "CONDITIONING", ksampler, "negative")
    wf.link(latent, "LATENT", ksampler, "latent_image")
    decode = wf.node("VAEDecode", (x + 800, y), size=(210, 50))
    wf.link(ksampler, "LATENT", decode, "samples")
    wf.link(vae, "VAE", decode, "vae")
    return decode, save_prefix


def sampled_and_saved(wf: Workflow, source: dict, vae: dict, positive: str, **settings) -> None:
    """sampler_chain on ``source``'s MODEL and CLIP outputs, into a Save Image node."""
    decode, prefix = sampler_chain(wf, source, "MODEL", source, "CLIP", vae, positive, 0, 0, **settings)
    save = wf.node("SaveImage", (0, 0), {"filename_prefix": prefix}, size=(400, 420))  # placed by the layout
    wf.link(decode, "IMAGE", save, "images")


def wire_checkpoint(wf: Workflow, ckpt: dict, node: dict) -> None:
    """The checkpoint's MODEL, CLIP and VAE into ``node``'s inputs of those names."""
    for output, name in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        wf.link(ckpt, output, node, name)


def image_batch(wf: Workflow, names: list[str], x: int, y: int):
    """Load Image per photo into the pack's Concept Images node (core ImageBatch is deprecated, its
    successor needs a newer ComfyUI than the oldest this pack supports, and both stretch images)."""
    batch = wf.node("ClassDiffusionImages", (x + 330, y), size=(260, 80))
    for i, name in enumerate(names):
        load = wf.node("LoadImage", (x, y + 340 * i), {"image": name}, size=(300, 320))
        wf.link(load, "IMAGE", batch, f"image_{i + 1}")
    return batch


TRAIN_NOTE = """Train a ClassDiffusion concept (Custom Diffusion K/V + semantic preservation loss).

1. Load Checkpoint: an SD1.5 checkpoint (models/checkpoints), e.g. v1-5-pruned-emaonly.safetensors.
2. Load Image: 3-20 photos of your concept (upload them; add Load Image + Image Batch nodes for more).
3. Train ClassDiffusion Concept: token = a new word (<sks>), class word = what it is (dog, backpack, ...).
   Paper settings: 500 steps, batch 2, learning rate 1e-5 (x batch), SPL weight 1.0. About 5-10 minutes on a modern GPU.
   It saves models/classdiffusion/my_dog.safetensors and models/embeddings/my_dog.safetensors.
4. The sampler uses the trained MODEL and CLIP: write the token (<sks>) or embedding:my_dog in any prompt.
   Paper sampling: guidance 6.0, 100 DDIM steps.
The SPL Loss Monitor plots the losses and how close "a photo of a <sks> dog" stays to "a photo of a dog".
The Drift Report ranks "a <sks> dog" among 71 "a <adjective> dog" phrases by closeness to "a dog" (1 = closest),
before and after training (paper: 26/71 before, 67/71 after Custom Diffusion, 36/71 with SPL).
Changing any input retrains; unchanged inputs reuse the cached result."""

USE_NOTE = """Use a trained concept.

Load Concept K/V: pick a file from models/classdiffusion (trained with the Train node or the classdiffusion CLI).
It patches the UNet's cross-attention K/V and teaches the CLIP the token; chain several Load nodes to combine concepts.
Write the token in the prompt: "a photo of a <sks> dog wearing headphones". Strength 0.7-1.0 trades identity for
flexibility. A concept trained on another checkpoint is refused unless allow_other_base is on."""

MULTI_NOTE = """Two concepts trained jointly (paper: 800 steps).

Each concept has its own images, token and class word: the first in the Train node, the second in the
"ClassDiffusion Concept" node wired to concept_2 (a third can go to concept_3).
The concept file holds both; embeddings are saved as duo_1 and duo_2.
Then compose them in one prompt: "a <my-dog> dog and a <my-cat> cat sitting on a sofa"."""

VIDEO_NOTE = """A trained concept in an AnimateDiff video.

Needs the node packs AnimateDiff-Evolved and VideoHelperSuite (ComfyUI Manager -> Install Missing Custom Nodes)
and an SD1.5 motion module in models/animatediff_models (e.g. mm_sd_v15_v2.ckpt from the AnimateDiff release).
Load Concept K/V applies the concept trained with train_concept.json (my_dog.safetensors).
Frames = the latent batch size (16 here, one context window). Paper video settings: 512x512, guidance 7.5, 25 steps.
Output: an animated GIF/MP4 via Video Combine and an animated WEBP via the core Save Animated WEBP node."""


PICK_NOTE = """Pick the step to keep from a training run.

Train with save_every > 0 (train_concept.json saves a step file every 100 steps): my_dog-step00100 ... and my_dog.
Pick Concept Step samples "a photo of a <sks> dog" and the composition prompts with every file of the run
(any file of it in concept_name), scores identity (CLIP Vision cosine to your photos) and composition (do the
surroundings still match the base model's picture of the same prompt and seed?), and picks the most learned step
that keeps composition (tolerance 0.5: keeps at least half of the run's composition range). It shows the scores
as a plot, names the chosen file and returns it applied to MODEL and CLIP.
Load CLIP Vision: any CLIP Vision model in models/clip_vision (e.g. the one IP-Adapter uses).
Load Image: the concept's photos. How well the choice agrees with ground truth: docs/evaluation.md."""


def train_concept(info) -> dict:
    return _training_graph(info, TRAIN_NOTE, {"save_name": "my_dog", "save_every": 100}, "a photo of embedding:my_dog dog wearing headphones",
                           "classdiffusion/my_dog", drift_report=True)


def _training_graph(info, note: str, train_widgets: dict, prompt: str, save_prefix: str, *, drift_report: bool,
                    checkpoint: str = "v1-5-pruned-emaonly.safetensors", **sampler_settings) -> dict:
    """Note, checkpoint, three photos → Concept Images → Train → monitor (and Drift Report) → sampler."""
    wf = Workflow(info)
    wf.node("Note", (20, 20), size=(460, 330), title="Read me", text=note)
    ckpt = wf.node("CheckpointLoaderSimple", (20, 380), {"ckpt_name": checkpoint}, size=(320, 100))
    images = image_batch(wf, ["concept_01.png", "concept_02.png", "concept_03.png"], 500, 20)
    train = wf.node("ClassDiffusionTrainConcept", (900, 20), train_widgets, size=(360, 600))
    wire_checkpoint(wf, ckpt, train)
    wf.link(images, "images", train, "images")
    monitor = wf.node("ClassDiffusionLossMonitor", (1300, 20), size=(520, 420))
    wf.link(train, "history", monitor, "history")
    if drift_report:
        drift = wf.node("ClassDiffusionDriftReport", (1850, 20), {"map": "pca"}, size=(520, 420))
        wf.link(ckpt, "CLIP", drift, "clip")
        wf.link(train, "concept", drift, "concept")
    sampled_and_saved(wf, train, ckpt, prompt, save_prefix=save_prefix, **sampler_settings)
    return wf.to_json()


def use_concept(info, *, note: str = USE_NOTE, checkpoint: str = "v1-5-pruned-emaonly.safetensors",
                concept: str = "my_dog.safetensors", save_prefix: str = "classdiffusion/use_concept",
                **sampler_settings) -> dict:
    wf = Workflow(info)
    wf.node("Note", (20, 20), size=(420, 240), title="Read me", text=note)
    ckpt = wf.node("CheckpointLoaderSimple", (20, 300), {"ckpt_name": checkpoint}, size=(320, 100))
    load = wf.node("ClassDiffusionLoadConcept", (380, 300), {"concept_name": concept}, size=(340, 200))
    wf.link(ckpt, "MODEL", load, "model")
    wf.link(ckpt, "CLIP", load, "clip")
    sampled_and_saved(wf, load, ckpt, "a photo of a <sks> dog wearing headphones", save_prefix=save_prefix,
                      **sampler_settings)
    return wf.to_json()


def pick_concept_step(info, *, checkpoint: str = "v1-5-pruned-emaonly.safetensors",
                      concept: str = "my_dog.safetensors", clip_vision: str = "clip_vision_vit_l.safetensors") -> dict:
    """Note, checkpoint, the photos, a CLIP Vision model → Pick Concept Step → a sampler with the chosen step."""
    wf = Workflow(info)
    wf.node("Note", (20, 20), size=(460, 330), title="Read me", text=PICK_NOTE)
    ckpt = wf.node("CheckpointLoaderSimple", (20, 380), {"ckpt_name": checkpoint}, size=(320, 100))
    vision = wf.node("CLIPVisionLoader", (20, 520), {"clip_name": clip_vision}, size=(320, 80))
    images = image_batch(wf, ["concept_01.png", "concept_02.png", "concept_03.png"], 500, 20)
    pick = wf.node("ClassDiffusionPickStep", (900, 20), {"concept_name": concept}, size=(380, 620))
    wire_checkpoint(wf, ckpt, pick)
    wf.link(images, "images", pick, "references")
    wf.link(vision, "CLIP_VISION", pick, "clip_vision")
    sampled_and_saved(wf, pick, ckpt, "a photo of a <sks> dog wearing headphones",
                      save_prefix="classdiffusion/picked_step")
    return wf.to_json()


def multi_concept(info) -> dict:
    wf = Workflow(info)
    wf.node("Note", (20, 20), size=(460, 240), title="Read me", text=MULTI_NOTE)
    ckpt = wf.node("CheckpointLoaderSimple", (20, 300), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, size=(320, 100))
    dogs = image_batch(wf, ["dog_01.png", "dog_02.png"], 500, 20)
    cats = image_batch(wf, ["cat_01.png", "cat_02.png"], 500, 720)
    second = wf.node("ClassDiffusionConcept", (900, 720), {"token": "<my-cat>", "class_word": "cat"}, size=(340, 180))
    wf.link(cats, "images", second, "images")
    train = wf.node("ClassDiffusionTrainConcept", (900, 20),
                    {"token": "<my-dog>", "class_word": "dog", "steps": 800, "save_name": "duo"}, size=(360, 560))
    wire_checkpoint(wf, ckpt, train)
    wf.link(dogs, "images", train, "images")
    wf.link(second, "concept", train, "concept_2")
    monitor = wf.node("ClassDiffusionLossMonitor", (1300, 20), size=(520, 420))
    wf.link(train, "history", monitor, "history")
    sampled_and_saved(wf, train, ckpt, "a <my-dog> dog and a <my-cat> cat sitting on a sofa",
                      save_prefix="classdiffusion/duo")
    return wf.to_json()


def video_animatediff(info) -> dict:
    wf = Workflow(info)
    wf.node("Note", (20, 20), size=(460, 260), title="Read me", text=VIDEO_NOTE)
    ckpt = wf.node("CheckpointLoaderSimple", (20, 320), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, size=(320, 100))
    load = wf.node("ClassDiffusionLoadConcept", (380, 320), {"concept_name": "my_dog.safetensors"}, size=(340, 200))
    wf.link(ckpt, "MODEL", load, "model")
    wf.link(ckpt, "CLIP", load, "clip")
    motion = wf.node("ADE_LoadAnimateDiffModel", (20, 560), {"model_name": "mm_sd_v15_v2.ckpt"}, size=(340, 80))
    apply = wf.node("ADE_ApplyAnimateDiffModelSimple", (380, 560), size=(300, 120))
    wf.link(motion, "MOTION_MODEL", apply, "motion_model")
    context = wf.node("ADE_StandardUniformContextOptions", (20, 700),
                      {"context_length": 16, "context_stride": 1, "context_overlap": 4}, size=(340, 220))
    evolved = wf.node("ADE_UseEvolvedSampling", (760, 320), {"beta_schedule": "autoselect"}, size=(320, 120))
    wf.link(load, "MODEL", evolved, "model")
    wf.link(apply, "M_MODELS", evolved, "m_models")
    wf.link(context, "CONTEXT_OPTS", evolved, "context_options")
    decode, prefix = sampler_chain(wf, evolved, "MODEL", load, "CLIP", ckpt,
                                   "a <sks> dog running on the beach, sunny day", 1120, 20, batch=16,
                                   steps=25, cfg=7.5, sampler="euler_ancestral", scheduler="normal",
                                   save_prefix="classdiffusion/my_dog_video")
    combine = wf.node("VHS_VideoCombine", (2380, 20), {"frame_rate": 8, "filename_prefix": prefix,
                                                       "format": "image/gif"}, size=(360, 480))
    wf.link(decode, "IMAGE", combine, "images")
    webp = wf.node("SaveAnimatedWEBP", (2380, 540), {"filename_prefix": prefix + "_webp", "fps": 8.0,
                                                     "lossless": False, "quality": 85}, size=(360, 420))
    wf.link(decode, "IMAGE", webp, "images")
    return wf.to_json()


INFUSION_NOTE = """Train an Infusion concept (arXiv 2404.14007): value residuals at the class word, ~50 KB.

No new token: the class word itself (dog) becomes the concept, and only where it stands in a prompt.
Prompts without the word sample exactly like the base model, so everything else is left untouched.
1. Load Checkpoint: an SD1.5 checkpoint. Load Image: 3-20 photos of the concept.
2. Train ClassDiffusion Concept with method = infusion: its recipe is built in (residual learning rate 0.01,
   4 micro-batches accumulated per step, flips, 11 prompt templates with the class word). batch_size 4 is the
   paper's; lower it on small GPUs. learning_rate, spl_weight, token and initializer are not used by Infusion.
   Optional: a subject mask per image on the masks input (white = subject; Load Image's MASK marks the
   transparent part, so put Invert Mask between).
3. Sample with the returned MODEL and CLIP: "a photo of a dog ..." shows your dog. Paper: guidance 8.0, DDIM 50.
   Later, Load Concept K/V applies models/classdiffusion/my_dog_infusion.safetensors the same way.
Pick ClassDiffusion instead when the concept must live beside its class (your dog AND other dogs)."""


def train_infusion(info) -> dict:
    return _training_graph(info, INFUSION_NOTE, {"save_name": "my_dog_infusion", "method": "infusion", "batch_size": 4},
                           "a photo of a dog wearing headphones", "classdiffusion/my_dog_infusion", drift_report=False,
                           steps=50, cfg=8.0)


SDXL_TRAIN_NOTE = """Train a ClassDiffusion concept on SDXL (both text encoders, every cross-attention K/V).

1. Load Checkpoint: an SDXL checkpoint (models/checkpoints), e.g. sd_xl_base_1.0.safetensors. The family is
   read from the checkpoint itself; SD2.x and other families are refused with a message.
2. Load Image: 3-20 photos of your concept, at least 1024 px on the short side if you have them.
3. Train ClassDiffusion Concept: resolution 1024 (SDXL's), otherwise the SD1.5 paper recipe (500 steps, batch 2,
   learning rate 1e-5 x batch, SPL weight 1.0). The token gets one vector per text encoder (768 for CLIP-L,
   1280 for bigG); SPL compares both encoders' end-of-text features (spl_encoders: side by side, or the mean).
   Memory: 16 GB cards train it at batch 2 in fp16 with gradient checkpointing (memory=auto switches it on);
   340.8 M K/V values are trained, so the concept file is 1.4 GB.
   It saves models/classdiffusion/my_dog_sdxl.safetensors and models/embeddings/my_dog_sdxl.safetensors
   (clip_l and clip_g, so embedding:my_dog_sdxl works in any SDXL prompt).
4. The sampler uses the trained MODEL and CLIP at 1024x1024: write <sks> or embedding:my_dog_sdxl.
Changing any input retrains; unchanged inputs reuse the cached result."""

SDXL_USE_NOTE = """Use an SDXL concept.

Load Concept K/V: pick an SDXL concept from models/classdiffusion (train_concept_sdxl.json makes my_dog_sdxl).
It patches every cross-attention K/V of the SDXL UNet and teaches both text encoders the token.
A concept trained on SD1.5 is refused here (and an SDXL concept on SD1.5), before anything changes.
Write the token in the prompt: "a photo of a <sks> dog wearing headphones"; sample at 1024x1024."""


def train_concept_sdxl(info) -> dict:
    return _training_graph(info, SDXL_TRAIN_NOTE, {"save_name": "my_dog_sdxl", "resolution": 1024},
                           "a photo of embedding:my_dog_sdxl dog wearing headphones", "classdiffusion/my_dog_sdxl",
                           drift_report=True, checkpoint="sd_xl_base_1.0.safetensors", width=1024, height=1024)


def use_concept_sdxl(info) -> dict:
    return use_concept(info, note=SDXL_USE_NOTE, checkpoint="sd_xl_base_1.0.safetensors",
                       concept="my_dog_sdxl.safetensors", save_prefix="classdiffusion/use_concept_sdxl",
                       width=1024, height=1024)


BUILDERS = {"train_concept": train_concept, "train_infusion": train_infusion, "use_concept": use_concept, "multi_concept": multi_concept,
            "video_animatediff": video_animatediff, "train_concept_sdxl": train_concept_sdxl,
            "use_concept_sdxl": use_concept_sdxl, "pick_concept_step": pick_concept_step}


def main(object_info_path: str) -> None:
    info = json.loads(Path(object_info_path).read_text())
    OUT.mkdir(exist_ok=True)
    for name, build in BUILDERS.items():
        (OUT / f"{name}.json").write_text(json.dumps(build(info), indent=2) + "\n")
        print(OUT / f"{name}.json")


if __name__ == "__main__":
    main(sys.argv[1])
