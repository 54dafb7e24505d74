"""The gate stops a bad dataset with lines that name the files, and passes a good one."""

from __future__ import annotations

from pathlib import Path

from flux_lora.dataset import AnalysisSettings, GateSettings, analyze_dataset, evaluate_gate
from tests.dataset.conftest import TRIGGER


def _report(folder: Path):
    return analyze_dataset(folder, AnalysisSettings(resolution=512, trigger=TRIGGER, detect_faces=False, workers=1))


def test_good_dataset_passes(good_dataset: Path) -> None:
    result = evaluate_gate(_report(good_dataset), GateSettings())
    assert result.passed and result.problems == []


def test_bad_dataset_fails_naming_files(bad_dataset: Path) -> None:
    result = evaluate_gate(_report(bad_dataset), GateSettings())
    assert not result.passed
    text = "\n".join(result.problems)
    for name in (
        "truncated.jpg",
        "zero.jpg",
        "text.jpg",
        "bomb.png",
        "no_trigger.jpg",
        "latin1_caption.jpg",
        "sharp.jpg",
    ):
        assert name in text, name
    assert all("\n" not in problem for problem in result.problems)


def test_thresholds_and_warn_only(good_dataset: Path) -> None:
    report = _report(good_dataset)
    too_few = evaluate_gate(report, GateSettings(min_images=50))
    assert not too_few.passed and "usable images" in too_few.problems[0]
    warn_only = evaluate_gate(report, GateSettings(min_images=50, enforce=False))
    assert warn_only.passed and warn_only.problems == []
    assert any("usable images" in warning for warning in warn_only.warnings)


def test_missing_captions_threshold(good_dataset: Path) -> None:
    (good_dataset / "photo_0.txt").unlink()
    report = _report(good_dataset)
    assert not evaluate_gate(report, GateSettings()).passed
    assert evaluate_gate(report, GateSettings(max_missing_captions=1)).passed
