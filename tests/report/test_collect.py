"""What the report counts: a run with lineage is not a seed of its clean recipe; time adds up over attempts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux_lora.report import summary
from flux_lora.report.collect import cell_name, seconds_per_step


def test_a_run_with_lineage_is_a_cell_of_its_own() -> None:
    clean = {"ablation": {"name": "baseline"}}
    resumed = {**clean, "lineage": {"from_run": "abc123", "from_step": 8, "recipe_changes": []}}
    assert cell_name(clean, {}, Path("0_x")) == "baseline"
    assert cell_name(resumed, {}, Path("0_y")) == "baseline (from run abc123 step 8)"


def test_seconds_per_step_are_over_every_attempt() -> None:
    attempts = [
        {"duration_s": 30.0, "train_seconds": 10.0, "steps_trained": 4},  # interrupted after 4 steps
        {"duration_s": 40.0, "train_seconds": 18.0, "steps_trained": 6},  # resumed, the other 6
    ]
    assert seconds_per_step(attempts, 70.0, 10) == pytest.approx(28.0 / 10)
    # sd-scripts records no per-attempt training time: the wall time of all attempts over the steps.
    assert seconds_per_step([{"duration_s": 30.0}, {"duration_s": 40.0}], 70.0, 10) == pytest.approx(7.0)


def test_an_owner_that_finishes_while_its_run_is_read_is_not_called_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner writes its final status, then releases its lease. A reader that saw `running` and then found no
    lease (the owner finished in between: seen once in CI, `watch` ended on "owner gone" for a failed cell) reads
    the status again instead of calling the owner gone."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "abc"}))
    (run_dir / "config.yaml").write_text(f"paths:\n  outputs: {tmp_path}\n")
    (run_dir / "status.json").write_text(json.dumps({"state": "running"}))

    def owner_finishes_then_releases(config: dict, run_id: str) -> bool:
        (run_dir / "status.json").write_text(json.dumps({"state": "failed", "reason": "loss is NaN at step 3"}))
        return True  # and the lease file is gone

    monkeypatch.setattr(summary, "_owner_gone", owner_finishes_then_releases)
    row = summary.read_run(run_dir)
    assert (row.state, row.note) == ("failed", "loss is NaN at step 3")

    monkeypatch.setattr(summary, "_owner_gone", lambda config, run_id: True)  # still `running`: gone indeed
    (run_dir / "status.json").write_text(json.dumps({"state": "running"}))
    assert summary.read_run(run_dir).state == summary.OWNER_GONE
