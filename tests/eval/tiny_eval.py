"""Settings shared by the evaluation tests: a 4-step tiny run and a small, fast evaluation of it."""

from __future__ import annotations

import shutil
from pathlib import Path

TRAIN_4_STEPS = [
    "profile.max_train_steps=4",
    "profile.lr_warmup_steps=1",
    "profile.save_every_n_steps=2",
    "profile.sample_every_n_steps=4",
    "profile.sample_steps=2",
    "profile.resolution=128",
    "dataset.validation_split=0.25",  # 2 of the 8 sample photos held out: the evaluator's "held-out" set
]
# What the CLI test evaluates with; a test that expects its cache to hit uses the same values.
SMALL_EVAL_ARGS = [
    "--resolution",
    "64",
    "--steps",
    "2",
    "--strengths",
    "0.5,1.0",
    "--seeds",
    "0,1",
    "--max-prompts",
    "1",
]
SMALL_EVAL = dict(resolution=64, sample_steps=2, strengths=(0.5, 1.0), seeds=(0, 1), max_prompts_per_set=1)
# Every top-level key of eval.json with every part enabled, whichever engine trained the run.
EVAL_SECTIONS = {
    "schema_version",
    "cache_key",
    "evaluated_at",
    "run_dir",
    "settings",
    "device",
    "run",
    "basis",
    "loras",
    "comfy_keys",
    "likeness_by_step",
    "load_check",
    "validation",
    "likeness",
    "diversity",
    "grids",
    "samples",
    "seconds",
    "cached",
}


def copy_run(run_dir: Path, target: Path) -> Path:
    """The run's record and LoRA files without its evaluation or resume states, for tests that change things."""
    return Path(shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("eval", "*-state", "sample", "logs")))
