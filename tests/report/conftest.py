"""One real 3-seed sweep for every report test: `launch.py sweep=ablation_seeds` with baseline and a1_alpha on the
tiny model (6 runs of 3 steps at 64 px, about 1.5 min on 2 cores), then each run evaluated once in this process
with small settings (what eval.enabled=true runs at the end of a run, cut down), and the report CLI run on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from flux_lora.compose import PROJECT_ROOT

# The tiny model's ops take microseconds: a second OpenMP thread only adds waits on a shared 2-core machine.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SWEEP_ARGS = [
    "sweep=ablation_seeds",
    "ablation=baseline,a1_alpha",
    "ablation.baseline_steps=3",
    "profile.lr_warmup_steps=1",
    "profile.save_every_n_steps=1",
    "profile.sample_every_n_steps=1",
    "profile.sample_steps=1",
    "profile.resolution=64",
    "dataset.min_bucket_reso=64",
]


@dataclass(frozen=True)
class Sweep:
    path: Path
    launch_output: str
    report_md_at_sweep_end: str  # what launch.py wrote before anything was evaluated


def run_cli(*args: str, cwd: Path = PROJECT_ROOT, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def seed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    root = tmp_path_factory.mktemp("seedsweep")
    sweep_dir = root / "sweep"
    done = run_cli(str(PROJECT_ROOT / "launch.py"), *SWEEP_ARGS, f"hydra.sweep.dir={sweep_dir}", f"paths.outputs={root / 'outputs'}",
                   f"paths.cache={root / 'cache'}", cwd=root, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md = (sweep_dir / "report.md").read_text()
    return Sweep(sweep_dir, done.stdout + done.stderr, md)


@pytest.fixture(scope="session")
def evaluated_sweep(seed_sweep: Sweep) -> Path:
    """The sweep with every run evaluated (eval/eval.json) and the report written again by the CLI."""
    import torch

    from flux_lora.eval import EvalSettings, evaluate_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = EvalSettings(resolution=64, sample_steps=1, strengths=(0.5, 1.0), seeds=(0, 1), max_prompts_per_set=1)
        for run_dir in sorted(p.parent for p in seed_sweep.path.glob("*/run.json")):
            evaluate_run(run_dir, settings)
    finally:
        torch.set_num_threads(threads)
    done = run_cli("-m", "flux_lora.report", str(seed_sweep.path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return seed_sweep.path


def copy_sweep(sweep_dir: Path, target: Path) -> Path:
    """A copy to change (ratings, failures) without touching the shared sweep; resume states left out."""
    return Path(shutil.copytree(sweep_dir, target, ignore=shutil.ignore_patterns("*-state", "report_files", "report.*")))


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
