"""Identity likeness: generated faces against the training faces, with a ceiling and a floor to read it by.

Ceiling: the training faces against each other (what the same person scores). Floor: the base model
without the LoRA at the same prompts and seeds (what "any face" scores). Every metric is null when there
is no face to measure (the tiny random model never draws one): no face is reported, never scored as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from statistics import fmean

import numpy as np
from PIL import Image, ImageOps

from flux_lora.eval.face_embedding import SAME_PERSON_DISTANCE, FaceEmbedder, cosine, distance


@dataclass(frozen=True)
class FaceScore:
    found: bool
    distance: float | None = None  # mean Euclidean distance to the reference faces
    cosine: float | None = None  # mean cosine similarity to the reference faces


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))


def reference_faces(embedder: FaceEmbedder, images: dict[str, Path]) -> dict[str, np.ndarray]:
    """Key (the path relative to the dataset) -> embedding, for the images where a face was found."""
    found = {}
    for key, path in images.items():
        embedding = embedder.embed(read_rgb(path))
        if embedding is not None:
            found[key] = embedding
    return found


def score_face(embedding: np.ndarray | None, reference: list[np.ndarray]) -> FaceScore:
    if embedding is None or not reference:
        return FaceScore(found=embedding is not None)
    return FaceScore(
        found=True,
        distance=fmean(distance(embedding, r) for r in reference),
        cosine=fmean(cosine(embedding, r) for r in reference),
    )


def _mean(values: list[float]) -> float | None:
    return fmean(values) if values else None


def summarize(scores: list[FaceScore]) -> dict:
    """Shares over all images; an image without a face counts as not the same person."""
    measured = [s for s in scores if s.distance is not None]
    return {
        "images": len(scores),
        "faces_found": sum(s.found for s in scores),
        "face_found_share": sum(s.found for s in scores) / len(scores) if scores else 0.0,
        "mean_cosine": _mean([s.cosine for s in measured]),
        "mean_distance": _mean([s.distance for s in measured]),
        "same_person_share": (
            sum(s.distance < SAME_PERSON_DISTANCE for s in measured) / len(scores) if measured else None
        ),
    }


def ceiling(reference: dict[str, np.ndarray], image_count: int) -> dict:
    """The training faces against each other: every pair once."""
    pairs = list(combinations(reference.values(), 2))
    return {
        "images": image_count,
        "faces_found": len(reference),
        "face_found_share": len(reference) / image_count if image_count else 0.0,
        "pairs": len(pairs),
        "mean_cosine": _mean([cosine(a, b) for a, b in pairs]),
        "mean_distance": _mean([distance(a, b) for a, b in pairs]),
        "same_person_share": _mean([float(distance(a, b) < SAME_PERSON_DISTANCE) for a, b in pairs]),
    }


def against_training_and_held_out(
    faces: list[np.ndarray | None], training: list[np.ndarray], held_out: list[np.ndarray]
) -> dict:
    """The same generated faces scored against the training faces and, apart, against the held-out faces. A LoRA that
    pastes its training photos scores high on the first only: `copy_indicator` is set when the generated faces are the
    same person as the training faces on average but not as the held-out ones (None when either cannot be told)."""
    trained = summarize([score_face(f, training) for f in faces])
    held = summarize([score_face(f, held_out) for f in faces]) if held_out else None
    copy = None
    if held is not None and trained["mean_distance"] is not None and held["mean_distance"] is not None:
        copy = trained["mean_distance"] < SAME_PERSON_DISTANCE <= held["mean_distance"]
    return {"training_faces": trained, "held_out_faces": held, "copy_indicator": copy}


def best_step_by_likeness(points: list[dict]) -> tuple[int | None, str | None]:
    """The step whose faces are closest to the held-out faces (to the training faces when none are held out); None
    when no generated image had a face."""
    for block, words in (("held_out_faces", "held-out faces"), ("training_faces", "training faces")):
        scored = [p for p in points if (p.get(block) or {}).get("mean_cosine") is not None]
        if scored:
            return max(scored, key=lambda p: p[block]["mean_cosine"])["step"], words
    return None, None
