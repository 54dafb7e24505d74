"""One real 3-seed sweep shared by the report and provenance tests: `launch.py sweep=ablation_seeds` with baseline
and a1_alpha on the tiny model (6 runs of 3 steps at 64 px, about 1.5 min on 2 cores); the session fixture that
makes it is `seed_sweep` in tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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


def make_seed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    root = tmp_path_factory.mktemp("seedsweep")
    sweep_dir = root / "sweep"
    done = run_cli(str(PROJECT_ROOT / "launch.py"), *SWEEP_ARGS, f"hydra.sweep.dir={sweep_dir}", f"paths.outputs={root / 'outputs'}",
                   f"paths.cache={root / 'cache'}", cwd=root, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md = (sweep_dir / "report.md").read_text()
    return Sweep(sweep_dir, done.stdout + done.stderr, md)


