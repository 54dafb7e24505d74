"""prepare writes a clean copy and a manifest, and never touches the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from flux_lora.dataset import (
    AnalysisSettings,
    DatasetError,
    PrepareSettings,
    analyze_dataset,
    parse_aspect,
    prepare_dataset,
)
from flux_lora.dataset.fingerprint import hash_file
from flux_lora.dataset.prepare import face_centred_crop_box
from tests.dataset.conftest import TRIGGER


def test_prepare_cleans_a_copy(bad_dataset: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in bad_dataset.iterdir()}
    out = tmp_path / "clean"
    manifest = prepare_dataset(bad_dataset, out, PrepareSettings(trigger=TRIGGER, crop_aspect=1.0))
    assert {p.name: p.read_bytes() for p in bad_dataset.iterdir()} == before

    by_source = {entry["source"]: entry for entry in manifest["files"]}
    dropped = {entry["source"] for entry in manifest["dropped"]}
    assert {"truncated.jpg", "zero.jpg", "text.jpg", "bomb.png", "sharp_small_copy.jpg"} <= dropped
    assert "sharp.jpg" in by_source  # the larger copy of the duplicate pair is kept
    assert "exif_rotated" in by_source["rotated.jpg"]["actions"]
    assert "face_centred_crop" in by_source["sixteen.png"]["actions"]  # 450x400 portrait cropped to square
    assert "16_bit" in by_source["sixteen.png"]["actions"]
    assert "trigger_inserted" in by_source["no_trigger.jpg"]["actions"]
    for entry in manifest["files"]:
        image = Image.open(out / entry["output"])
        assert image.mode == "RGB" and image.width == image.height
        assert hash_file(out / entry["output"])[0] == entry["output_hash"]
        caption = (out / entry["caption_output"]).read_text(encoding="utf-8")
        assert caption.startswith(TRIGGER)
    assert "café" in (out / by_source["latin1_caption.jpg"]["caption_output"]).read_text(encoding="utf-8")
    assert json.loads((out / "manifest.json").read_text()) == manifest

    report = analyze_dataset(out, AnalysisSettings(resolution=512, trigger=TRIGGER, detect_faces=False, workers=1))
    assert not any(image.unusable for image in report.images)
    assert not report.with_flag("exif_rotated") and not report.with_flag("trigger_missing")


def test_prepare_refuses_unsafe_destinations(good_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="inside the dataset"):
        prepare_dataset(good_dataset, good_dataset / "clean", PrepareSettings(trigger=TRIGGER))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        prepare_dataset(good_dataset, occupied, PrepareSettings(trigger=TRIGGER))


def test_crop_box_follows_the_face() -> None:
    face = [{"x": 0.8, "y": 0.1, "w": 0.1, "h": 0.1}]
    assert face_centred_crop_box(1000, 500, 1.0, face) == (500, 0, 1000, 500)  # clamped to the right edge
    assert face_centred_crop_box(1000, 500, 1.0, None) == (250, 0, 750, 500)
    assert parse_aspect("3:4") == 0.75 and parse_aspect("1") == 1.0
    with pytest.raises(ValueError):
        parse_aspect("wide")
