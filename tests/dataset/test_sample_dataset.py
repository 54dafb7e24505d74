"""The embedded sample dataset passes the gate with the default thresholds."""

from __future__ import annotations

from pathlib import Path

from flux_lora.dataset import AnalysisSettings, GateSettings, analyze_dataset, evaluate_gate

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def test_sample_dataset_passes_default_gate() -> None:
    report = analyze_dataset(SAMPLE, AnalysisSettings(resolution=512, trigger="TOK Woman", workers=1))
    result = evaluate_gate(report, GateSettings())
    assert result.passed, result.problems
    assert len(report.images) == 8
    assert sum(1 for image in report.images if image.faces) == 8  # one face in each framing, the wide one too
    assert not report.duplicate_groups and not report.leakage_hints
    for image in report.images:
        assert (
            image.format == "JPEG" and 256 <= min(image.width, image.height) and max(image.width, image.height) <= 384
        )
        assert image.bytes < 40_000
        assert image.caption.text.startswith("TOK Woman")
