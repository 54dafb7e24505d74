"""dlib face embeddings on real photos: the sample dataset (one person) as the positive control, scikit-image's
cameraman (another man) as the negative one, and honest nulls where there is no face."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from flux_lora.compose import PROJECT_ROOT
from flux_lora.eval.face_embedding import SAME_PERSON_DISTANCE, FaceEmbedder, cosine, distance
from flux_lora.eval.likeness import (
    against_training_and_held_out,
    best_step_by_likeness,
    ceiling,
    read_rgb,
    reference_faces,
    score_face,
    summarize,
)

SAMPLE = PROJECT_ROOT / "data" / "sample"
# The cameraman's head in skimage.data.camera() (512 x 512 grey): rows, columns. HOG misses it in the whole frame.
CAMERAMAN_FACE = (slice(40, 240), slice(100, 320))


def cameraman_face() -> np.ndarray:
    return np.ascontiguousarray(np.repeat(data.camera()[CAMERAMAN_FACE][..., None], 3, axis=2))


@pytest.fixture(scope="module")
def embedder() -> FaceEmbedder:
    return FaceEmbedder()


def test_two_sample_photos_of_the_same_person_are_within_dlibs_threshold(embedder: FaceEmbedder) -> None:
    a = embedder.embed(read_rgb(SAMPLE / "02_head_shoulders.jpg"))
    b = embedder.embed(read_rgb(SAMPLE / "06_wide.jpg"))
    assert a is not None and b is not None and a.shape == (128,)
    assert distance(a, b) < SAME_PERSON_DISTANCE and cosine(a, b) > 0.9


def test_the_training_faces_set_the_ceiling(embedder: FaceEmbedder) -> None:
    photos = sorted(SAMPLE.glob("*.jpg"))
    reference = reference_faces(embedder, {p.name: p for p in photos})
    assert len(reference) == len(photos) == 8
    top = ceiling(reference, len(photos))
    assert top["pairs"] == 28 and top["same_person_share"] == 1.0 and top["mean_distance"] < SAME_PERSON_DISTANCE


def test_no_face_gives_null_metrics_not_zero(embedder: FaceEmbedder) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    reference = list(reference_faces(embedder, {"03_close_up.jpg": SAMPLE / "03_close_up.jpg"}).values())
    assert embedder.embed(noise) is None
    block = summarize([score_face(None, reference), score_face(None, reference)])
    assert block == {
        "images": 2,
        "faces_found": 0,
        "face_found_share": 0.0,
        "mean_cosine": None,
        "mean_distance": None,
        "same_person_share": None,
    }


def test_an_image_without_a_face_counts_as_not_the_same_person(embedder: FaceEmbedder) -> None:
    reference = list(reference_faces(embedder, {"03_close_up.jpg": SAMPLE / "03_close_up.jpg"}).values())
    face = embedder.embed(read_rgb(SAMPLE / "07_warm_close.jpg"))
    block = summarize([score_face(face, reference), score_face(None, reference)])
    assert block["face_found_share"] == 0.5 and block["same_person_share"] == 0.5
    assert block["mean_distance"] < SAME_PERSON_DISTANCE


def test_another_man_is_not_judged_the_same_person_as_the_sample_faces(embedder: FaceEmbedder) -> None:
    """Negative control (measured: 0.84-0.86 from every sample face, against 0.05-0.22 between sample faces)."""
    reference = list(reference_faces(embedder, {p.name: p for p in SAMPLE.glob("*.jpg")}).values())
    stranger = embedder.embed(cameraman_face())
    assert stranger is not None and len(reference) == 8
    assert min(distance(stranger, r) for r in reference) > SAME_PERSON_DISTANCE
    assert summarize([score_face(stranger, reference)])["same_person_share"] == 0.0
    # Not the grey scale: a grey copy of a sample photo still scores as the same person (measured 0.16-0.21).
    grey = np.repeat(read_rgb(SAMPLE / "02_head_shoulders.jpg").mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    assert summarize([score_face(embedder.embed(grey), reference)])["same_person_share"] == 1.0


def test_reference_faces_are_keyed_by_relative_path_so_two_img1_jpg_do_not_collide(embedder: FaceEmbedder) -> None:
    both = {"alice/img1.jpg": SAMPLE / "03_close_up.jpg", "bob/img1.jpg": SAMPLE / "06_wide.jpg"}
    assert sorted(reference_faces(embedder, both)) == ["alice/img1.jpg", "bob/img1.jpg"]


def test_training_and_held_out_faces_are_scored_apart_and_a_copy_is_flagged(embedder: FaceEmbedder) -> None:
    """No model draws faces here: sample photos stand in for generated images. A LoRA that pastes its training
    photos (the 'generated' faces are the training photos themselves) is the same person as the training faces; with a
    held-out face of someone else (the cameraman) it is not the same person as the held-out ones: flagged as a copy.
    With a held-out photo of the same person it is not."""
    training = list(reference_faces(embedder, {p.name: p for p in sorted(SAMPLE.glob("0[1-6]_*.jpg"))}).values())
    generated = [embedder.embed(read_rgb(p)) for p in sorted(SAMPLE.glob("0[1-3]_*.jpg"))]
    same_person = list(reference_faces(embedder, {"07": SAMPLE / "07_warm_close.jpg"}).values())
    stranger = [embedder.embed(cameraman_face())]
    copied = against_training_and_held_out(generated, training, stranger)
    assert copied["training_faces"]["same_person_share"] == 1.0 and copied["held_out_faces"]["same_person_share"] == 0.0
    assert copied["copy_indicator"] is True
    assert against_training_and_held_out(generated, training, same_person)["copy_indicator"] is False
    assert against_training_and_held_out(generated, training, [])["copy_indicator"] is None  # nothing held out: unknown
    points = [
        {"step": 2, **against_training_and_held_out(generated[:1], training, same_person)},
        {"step": 4, **against_training_and_held_out([embedder.embed(cameraman_face())], training, same_person)},
    ]
    assert best_step_by_likeness(points) == (2, "held-out faces")
    assert best_step_by_likeness([{"step": 2, **against_training_and_held_out([None], training, same_person)}]) == (
        None,
        None,
    )
