"""One real 3-seed sweep shared by the report and provenance tests: `launch.py sweep=ablation_seeds` with baseline
and a1_alpha on the tiny model (6 runs of 3 steps at 64 px, packed into one job); the session fixture that
makes it is `seed_sweep` in tests/conftest.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli import ONE_THREAD, run_cli

SWEEP_ARGS = [
    "sweep=ablation_seeds",
    "ablation=baseline,a1_alpha",
    # One job trains the six runs (one base, an adapter each; each equal to its separate run, tests/engines/native/
    # test_packed.py): the report and provenance tests read their folders as any other's.
    "launch.pack=true",
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


def make_seed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    root = tmp_path_factory.mktemp("seedsweep")
    sweep_dir = root / "sweep"
    done = run_cli(*SWEEP_ARGS, f"hydra.sweep.dir={sweep_dir}", folder=root, env=ONE_THREAD, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md = (sweep_dir / "report.md").read_text()
    return Sweep(sweep_dir, done.stdout + done.stderr, md)
