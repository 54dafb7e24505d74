"""What the report counts: a run with lineage is not a seed of its clean recipe; time adds up over attempts."""

from __future__ import annotations

from pathlib import Path

import pytest

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
