"""Cost before a run starts: from this machine's finished runs when there are some, else a stated per-tier estimate."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from flux_lora.cost import CostEstimate, signal_delay_warning, sweep_cost_line
from tests.cli import ONE_THREAD, run_cli
from tests.seed_sweep import SWEEP_ARGS, Sweep


def dry_run(sweep: Sweep, *overrides: str) -> str:
    outputs = Path(yaml.safe_load(next(sweep.path.glob("*/config.yaml")).read_text())["paths"]["outputs"])
    done = run_cli("launch.dry_run=true", f"paths.outputs={outputs}", *overrides, cwd=outputs.parent, env=ONE_THREAD)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_a_dry_run_prices_itself_from_the_machines_finished_runs(seed_sweep: Sweep) -> None:
    rates = []
    for status in seed_sweep.path.glob("*/status.json"):
        attempts = json.loads(status.read_text())["attempts"]
        rates.append(sum(a["train_seconds"] for a in attempts) / sum(a["steps_trained"] for a in attempts))
    same = [a for a in SWEEP_ARGS if a.startswith(("profile.resolution", "dataset.min_bucket_reso"))]
    line = next(
        text
        for text in dry_run(seed_sweep, *same, "profile.max_train_steps=200").splitlines()
        if text.startswith("cost:")
    )
    figure = float(re.search(r"x ([\d.]+) s/step", line).group(1))
    assert (
        abs(figure - statistics.median(rates)) <= 0.006
        and "median of 6 finished run(s) here: tiny, gpu=cpu, 64 px" in line
    ), line
    assert line.startswith("cost: 200 steps x ")
    # Another resolution has no history here: a per-tier estimate, said as such.
    other = next(text for text in dry_run(seed_sweep).splitlines() if text.startswith("cost:"))
    assert "per-tier estimate for gpu=cpu, not measured here" in other


def test_side_by_side_cells_shorten_the_wall_time_not_the_gpu_hours() -> None:
    cells = [CostEstimate(1000, 3.6, "estimate", False, 2) for _ in range(4)]
    assert sweep_cost_line(cells, 1) == (
        "sweep cost: 4 cells, 4.0 h in all, 8.00 GPU-hours (0 of 4 from measured runs, the rest per-tier estimates)"
    )
    assert "2 side by side: about 2.0 h of wall time, 8.00 GPU-hours" in sweep_cost_line(cells, 2)


def _seconds_and_rounding(figure: str, unit: str) -> tuple[float, float]:
    """A duration as cost.duration prints it ("40 s", "3 min", "2.5 h"): its seconds and how far rounding may move it."""
    scale, rounding = {"s": (1, 1), "min": (60, 30), "h": (3600, 180)}[unit]
    return float(figure) * scale, rounding


def test_after_the_sweep_the_estimate_stands_beside_what_it_took(seed_sweep: Sweep) -> None:
    estimated = took = 0.0
    for cell in seed_sweep.path.glob("*/run.json"):
        estimated += json.loads(cell.read_text())["cost_estimate"]["seconds"]
        # The seed sweep trains packed: one job's time counts once between the runs it trained.
        for attempt in json.loads((cell.parent / "status.json").read_text())["attempts"]:
            took += attempt["duration_s"] / (1 + len(attempt.get("packed_with") or []))
    # Any unit: a busy machine takes minutes where an idle one takes seconds.
    pattern = (
        r"[Cc]ost: estimated ([\d.]+) (s|min|h) for the 6 cell\(s\) that ran, took ([\d.]+) (s|min|h) \(([\d.]+)x\)"
    )
    for text in (seed_sweep.launch_output, seed_sweep.report_md_at_sweep_end):  # the terminal, then the report's notes
        found = re.search(pattern, text)
        assert found, text[-2000:]
        said_estimate, estimate_rounding = _seconds_and_rounding(found[1], found[2])
        said_took, took_rounding = _seconds_and_rounding(found[3], found[4])
        assert abs(said_estimate - estimated) <= estimate_rounding and abs(said_took - took) <= took_rounding
        assert float(found[5]) == pytest.approx(took / estimated, abs=0.01)


def test_a_signal_delay_too_short_for_a_stop_measured_here_is_warned_about(seed_sweep: Sweep, compose_run) -> None:
    """The sweep's runs recorded their longest step, sample image and state save; a SLURM warning that may come
    later than that before the time limit is said, with the figure to set."""
    outputs = Path(yaml.safe_load(next(seed_sweep.path.glob("*/config.yaml")).read_text())["paths"]["outputs"])
    summaries = [json.loads(p.read_text())["stop_lead_s"] for p in seed_sweep.path.glob("*/output/train_summary.json")]
    assert len(summaries) == 6 and all(s["step"] > 0 and s["save"] > 0 and s["sample_image"] > 0 for s in summaries)
    needed = sum(max(s[name] for s in summaries) for name in ("step", "sample_image", "save"))
    run = compose_run("profile.resolution=64", f"paths.outputs={outputs}")
    warning = signal_delay_warning(run, 30)
    assert (
        warning
        and warning.startswith("hydra.launcher.signal_delay_s=30 leaves at worst 0 s")
        and "in 6 run(s) here" in warning
    )
    assert f"set it to at least {int(needed + 30 + 0.999)}" in warning, (warning, needed)
    assert signal_delay_warning(run, int(needed + 31)) is None
    assert (
        signal_delay_warning(compose_run("profile.resolution=512", f"paths.outputs={outputs}"), 30) is None
    )  # nothing measured
