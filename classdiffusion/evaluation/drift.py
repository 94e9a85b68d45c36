"""Semantic drift of a concept token away from its class (ClassDiffusion §3.2, appendices D/E).

Two views, both on the CLIP text encoder's EOS features (the features SPL compares):

* the cosine similarity between the training phrase ("a photo of a <sks> dog") and the class
  phrase ("a photo of a dog"), before training (the token's initializer vector) and after;
* the paper's ranking view: the phrases "a {adjective} dog" for the paper's adjectives plus the
  token phrase "a <sks> dog" are ranked by their distance to the class phrase "a dog". The paper
  reports 26/71 before tuning, 67/71 after Custom Diffusion and 36/71 with SPL.

Choices where the paper leaves room: appendix D lists 71 adjectives (the text says 70 phrases), we
use all 71, so ranks are out of 72. The paper ranks by 2-D distance after t-SNE (appendix E,
Algorithm 1); t-SNE depends on its seed and perplexity, so we report the rank by cosine distance
in the full feature space (``rank``, deterministic) and the rank in the 2-D map (``map_rank``, PCA
by default; t-SNE with scikit-learn installed, as in the paper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from ..model.text import TextFeatures

#: ClassDiffusion appendix D: the adjectives of the text-space visualisation, in the paper's order.
ADJECTIVES: tuple[str, ...] = (
    "beautiful", "happy", "sad", "tall", "short", "bright", "dark", "big", "small", "young",
    "old", "fast", "slow", "warm", "cold", "soft", "hard", "heavy", "light", "strong",
    "weak", "good", "bad", "rich", "poor", "thick", "thin", "expensive", "cheap", "quiet",
    "loud", "clean", "dirty", "smart", "stupid", "interesting", "boring", "new", "old-fashioned", "safe",
    "dangerous", "healthy", "sick", "easy", "difficult", "right", "wrong", "high", "low", "near",
    "far", "early", "late", "wet", "dry", "busy", "free", "careful", "careless", "friendly",
    "unfriendly", "important", "unimportant", "famous", "unknown", "excited", "calm", "serious", "funny", "tired",
    "energetic",
)

#: The phrase template of the ranking view: "a {modifier} {class word}"; the class phrase is "a {class word}".
PHRASE = "a {} {}"
CLASS_PHRASE = "a {}"

#: A host's ``encode_text`` (it must accept ``eos_only=True``).
Encode = Callable[..., TextFeatures]


@dataclass
class DriftMeasure:
    """Where one token stands relative to its class at one moment (one row of a report)."""

    token: str
    class_word: str
    cosine: float  #: EOS cosine of the training phrase and the class phrase (what SPL maximises)
    rank: int  #: rank of "a <tok> <class>" among the adjective phrases by cosine distance to "a <class>"; 1 = closest
    total: int  #: number of ranked phrases (adjectives + the token phrase)
    distance: float  #: cosine distance of the token phrase to the class phrase

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DriftMap:
    """A 2-D map of the ranked phrases (the paper's Fig. 3a / Fig. 12)."""

    method: str
    class_word: str
    labels: list[str]  #: adjective of each adjective point
    points: torch.Tensor  #: [A, 2] adjective phrases
    class_point: torch.Tensor  #: [2]
    token_points: dict[str, torch.Tensor] = field(default_factory=dict)  #: label ("before"/"after") → [2]
    map_ranks: dict[str, int] = field(default_factory=dict)  #: label → rank by 2-D distance (paper's Algorithm 1)

    def to_dict(self) -> dict:
        return {
            "method": self.method, "class_word": self.class_word,
            "adjectives": {label: [round(float(v), 5) for v in p] for label, p in zip(self.labels, self.points)},
            "class_point": [round(float(v), 5) for v in self.class_point],
            "token_points": {k: [round(float(v), 5) for v in p] for k, p in self.token_points.items()},
            "map_ranks": dict(self.map_ranks), "total": len(self.labels) + 1,
        }


def rank_among(distances: torch.Tensor, distance: float) -> int:
    """1 + how many of ``distances`` are strictly smaller than ``distance`` (ties favour the token)."""
    return 1 + int((distances < distance).sum())


class DriftProbe:
    """Encodes the class phrase and the adjective phrases once (they never contain a trained token,
    and the text encoder is frozen), then measures any token vector with one or two more prompts.

    ``encode`` is a host's ``encode_text``; ``prompt`` is the concept's training template, whose
    token and class phrases ("a photo of a <tok> <class>" / "a photo of a <class>") SPL compares.
    """

    def __init__(self, encode: Encode, class_word: str, *, prompt: str = "a photo of a {}",
                 adjectives: Sequence[str] = ADJECTIVES):
        if not adjectives:
            raise InvalidInputError("The drift ranking needs at least one adjective phrase.")
        self.encode, self.class_word, self.prompt = encode, class_word, prompt
        self.adjectives = list(adjectives)
        with torch.no_grad():
            phrases = [CLASS_PHRASE.format(class_word), prompt.format(class_word)]
            phrases += [PHRASE.format(adjective, class_word) for adjective in self.adjectives]
            eos = self._eos(phrases, {})
        self.class_feature = eos[0]
        self.class_prompt_feature = eos[1]
        self.adjective_features = eos[2:]
        self.adjective_distances = 1.0 - F.cosine_similarity(self.adjective_features, self.class_feature[None], dim=-1)

    def _eos(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), 32):  # bounded batches: SD1.5's CLIP-L on small GPUs
            out.append(self.encode(prompts[start:start + 32], vectors, eos_only=True).eos.float())
        return torch.cat(out)

    @torch.no_grad()
    def token_features(self, token: str, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EOS features of ("a <tok> <class>", the training phrase) with ``vector`` as the token."""
        eos = self._eos([PHRASE.format(token, self.class_word), self.prompt.format(f"{token} {self.class_word}")],
                        {token: vector})
        return eos[0], eos[1]

    @torch.no_grad()
    def measure(self, token: str, vector: torch.Tensor) -> DriftMeasure:
        phrase, train = self.token_features(token, vector)
        distance = float(1.0 - F.cosine_similarity(phrase, self.class_feature, dim=0))
        cosine = float(F.cosine_similarity(train, self.class_prompt_feature, dim=0))
        return DriftMeasure(token=token, class_word=self.class_word, cosine=cosine,
                            rank=rank_among(self.adjective_distances.cpu(), distance),
                            total=len(self.adjectives) + 1, distance=distance)

    @torch.no_grad()
    def drift_map(self, token: str, vectors: Mapping[str, torch.Tensor], method: str = "pca",
                  seed: int = 0) -> DriftMap:
        """One 2-D map with the adjective phrases, the class phrase and the token phrase for each
        labelled vector (e.g. {"before": initial, "after": trained}), fitted jointly."""
        labels = list(vectors)
        token_eos = [self.token_features(token, vectors[label])[0] for label in labels]
        features = torch.cat([self.adjective_features, self.class_feature[None], torch.stack(token_eos)]).cpu()
        points = project_2d(features, method=method, seed=seed)
        n = len(self.adjectives)
        adjective_points, class_point = points[:n], points[n]
        result = DriftMap(method=method, class_word=self.class_word, labels=list(self.adjectives),
                          points=adjective_points, class_point=class_point)
        adjective_2d = (adjective_points - class_point).norm(dim=-1)
        for k, label in enumerate(labels):
            point = points[n + 1 + k]
            result.token_points[label] = point
            result.map_ranks[label] = rank_among(adjective_2d, float((point - class_point).norm()))
        return result


def project_2d(features: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """[N, D] → [N, 2]. "pca": principal components of the L2-normalised features (deterministic,
    signs fixed); "tsne": scikit-learn's t-SNE as the paper uses (optional dependency)."""
    x = F.normalize(features.double(), dim=-1)
    if method == "pca":
        centred = x - x.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        components = vh[:2]
        signs = torch.sign(components[torch.arange(components.shape[0]), components.abs().argmax(1)])
        points = centred @ (components * signs[:, None]).T
        if points.shape[1] < 2:  # fewer than 2 distinct directions: pad
            points = torch.cat([points, torch.zeros(points.shape[0], 2 - points.shape[1], dtype=points.dtype)], 1)
        return points.float()
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as exc:
            raise InvalidInputError(
                "The t-SNE map needs scikit-learn: pip install scikit-learn (or use the PCA map)."
            ) from exc
        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3)))
        embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                        metric="cosine").fit_transform(x.numpy())
        return torch.from_numpy(embedded).float()
    raise InvalidInputError(f"Unknown map method {method!r}; use 'pca' or 'tsne'.")


def concept_drift(encode: Encode, token: str, class_word: str, initial: torch.Tensor, trained: torch.Tensor,
                  *, prompt: str = "a photo of a {}", method: str = "pca") -> dict:
    """Before/after drift of one token: cosines, ranks and the 2-D map (as a JSON-able dict plus
    the DriftMap under "map")."""
    probe = DriftProbe(encode, class_word, prompt=prompt)
    before, after = probe.measure(token, initial), probe.measure(token, trained)
    drift_map = probe.drift_map(token, {"before": initial, "after": trained}, method=method)
    return {"token": token, "class_word": class_word, "before": before.to_dict(), "after": after.to_dict(),
            "map_ranks": dict(drift_map.map_ranks), "map_method": method, "map": drift_map}


def concept_drifts(encode: Encode, word_embedding: Callable[[str], torch.Tensor], concept, *,
                   method: str = "pca", device: torch.device | str = "cpu") -> list[dict]:
    """:func:`concept_drift` for each token of a loaded concept (a ``Concept``), starting from the
    vector its initializer word gives (what training started from). The tokenizer must already
    know the concept's tokens."""
    initializers = concept.meta.initializers or ["ktn"] * len(concept.tokens)
    prompts = concept.meta.prompts or ["a photo of a {}"] * len(concept.tokens)
    return [
        concept_drift(encode, token, class_word, word_embedding(initializers[k]).to(device),
                      concept.token_vectors[k].to(device), prompt=prompts[k], method=method)
        for k, (token, class_word) in enumerate(zip(concept.tokens, concept.class_words))
    ]


def summary(drift: Mapping) -> str:
    """One line: cosine and rank before → after."""
    b, a = drift["before"], drift["after"]
    line = (f"{drift['token']} vs '{drift['class_word']}': EOS cos {b['cosine']:.4f} → {a['cosine']:.4f}, "
            f"rank {b['rank']}/{b['total']} → {a['rank']}/{a['total']} (1 = closest to the class)")
    ranks = drift.get("map_ranks")
    if ranks and "before" in ranks and "after" in ranks:
        line += f"; 2-D {drift.get('map_method', 'map')} rank {ranks['before']} → {ranks['after']}"
    return line
