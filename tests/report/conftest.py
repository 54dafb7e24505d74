"""The shared 3-seed sweep (tests/seed_sweep.py, the `seed_sweep` fixture in tests/conftest.py), each run evaluated
once in this process with small settings (what eval.enabled=true runs at the end of a run, cut down), and the
report CLI run on it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import ONE_THREAD, run_cli
from tests.seed_sweep import Sweep


@pytest.fixture(scope="session")
def evaluated_sweep(seed_sweep: Sweep) -> Path:
    """The sweep with every run evaluated (eval/eval.json) and the report written again by the CLI."""
    import torch

    from flux_lora.eval import EvalSettings, evaluate_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = EvalSettings(
            resolution=64, sample_steps=1, strengths=(0.5, 1.0), seeds=(0, 1), max_prompts_per_set=1
        )
        for run_dir in sorted(p.parent for p in seed_sweep.path.glob("*/run.json")):
            evaluate_run(run_dir, settings)
    finally:
        torch.set_num_threads(threads)
    done = run_cli(str(seed_sweep.path), module="flux_lora.report", env=ONE_THREAD)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return seed_sweep.path


def copy_sweep(sweep_dir: Path, target: Path) -> Path:
    """A copy to change (ratings, failures) without touching the shared sweep; resume states left out."""
    return Path(
        shutil.copytree(sweep_dir, target, ignore=shutil.ignore_patterns("*-state", "report_files", "report.*"))
    )


@pytest.fixture
def sweep_copy(evaluated_sweep: Path, tmp_path: Path) -> Iterator[Path]:
    yield copy_sweep(evaluated_sweep, tmp_path / "sweep")


def md_row(md: str, first_cell: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is first_cell."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{md}")


def md_column(md: str, header: str, first_cell: str) -> str:
    """One value of the cells table (the first table, whose header starts with `cell`)."""
    headers = md_row(md, "cell")
    return md_row(md, first_cell)[headers.index(header)]
