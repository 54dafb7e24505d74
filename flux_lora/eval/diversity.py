"""Diversity and overfitting: do different seeds give different pictures, and does any copy a training image?

Image distance is the perceptual-hash Hamming distance (64-bit pHash, the dataset preflight's own hash),
face distance the dlib embedding distance. Collapse: every seed of a prompt gives nearly the same picture.
Copying: a generated image is a near-duplicate of a training image (or of its mirror image).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from statistics import fmean

import cv2
import numpy as np

from flux_lora.dataset.image_analysis import WORKING_SIDE, perceptual_hashes, resize_long_side
from flux_lora.eval.face_embedding import distance

# Seeds whose pHashes differ by at most this many of 64 bits on average show the same picture.
COLLAPSE_MAX_MEAN_BITS = 4.0
DEFAULT_COPY_MAX_BITS = 6  # the preflight's near-duplicate distance (dataset.analysis.duplicate_max_distance)


@dataclass(frozen=True)
class ImageHash:
    direct: str
    mirrored: str


def image_hash(rgb: np.ndarray) -> ImageHash:
    # Same working size and hash as the dataset preflight, so "copy" means what "duplicate" means there.
    gray = cv2.cvtColor(resize_long_side(np.ascontiguousarray(rgb), WORKING_SIDE), cv2.COLOR_RGB2GRAY)
    return ImageHash(*perceptual_hashes(gray))


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def seed_diversity(hashes: list[ImageHash], faces: list[np.ndarray | None]) -> dict:
    """Mean pairwise distances between the seeds' images of one prompt at one strength."""
    pairs = list(combinations(hashes, 2))
    face_pairs = list(combinations([f for f in faces if f is not None], 2))
    mean_bits = fmean(hamming(a.direct, b.direct) for a, b in pairs) if pairs else None
    return {
        "images": len(hashes),
        "mean_phash_distance": mean_bits,
        "mean_face_distance": fmean(distance(a, b) for a, b in face_pairs) if face_pairs else None,
        "collapsed": mean_bits is not None and mean_bits <= COLLAPSE_MAX_MEAN_BITS,
    }


def summarize_rows(rows: list[dict]) -> dict:
    """Over the prompts of one strength: mean of their seed distances, and how many collapsed."""
    bits = [r["mean_phash_distance"] for r in rows if r["mean_phash_distance"] is not None]
    faces = [r["mean_face_distance"] for r in rows if r["mean_face_distance"] is not None]
    return {
        "prompts": len(rows),
        "mean_phash_distance": fmean(bits) if bits else None,
        "mean_face_distance": fmean(faces) if faces else None,
        "collapsed_prompts": sum(r["collapsed"] for r in rows),
    }


def nearest_training_image(generated: ImageHash, training: dict[str, ImageHash]) -> tuple[str | None, int | None]:
    """(file, bits) of the closest training image, the mirror image counting as a copy too."""
    best: tuple[str | None, int | None] = (None, None)
    for name, known in training.items():
        bits = min(hamming(generated.direct, known.direct), hamming(generated.direct, known.mirrored))
        if best[1] is None or bits < best[1]:
            best = (name, bits)
    return best
