"""One real tiny run for every evaluation test: `launch.py` trains 4 steps once per session (about 30 s),
and the evaluation CLI runs on it once (small settings: 64 px, 2 steps, 2 strengths, 2 seeds, 2 prompts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from flux_lora.compose import PROJECT_ROOT
from tests.eval.tiny_eval import SMALL_EVAL_ARGS, TRAIN_4_STEPS

# The tiny model's ops take microseconds: a second OpenMP thread only adds barrier waits, which on a
# shared 2-core machine cost milliseconds per op (measured 3.2 ms vs 24 us for one 80x32 linear).
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A succeeded 4-step native run of the tiny model on data/sample (6 photos trained, 2 held out): step-2 and
    final LoRA files."""
    root = tmp_path_factory.mktemp("evalrun")
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "launch.py"), *TRAIN_4_STEPS, f"paths.outputs={root / 'outputs'}",
         f"paths.cache={root / 'cache'}"],
        cwd=root, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run_dir,) = [p.parent for p in (root / "outputs").rglob("run.json")]
    return run_dir


@pytest.fixture(scope="session")
def evaluated_run(tiny_run: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The CLI run once on the tiny run: (run dir, the finished process)."""
    done = subprocess.run(
        [sys.executable, "-m", "flux_lora.eval", str(tiny_run), *SMALL_EVAL_ARGS],
        cwd=PROJECT_ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return tiny_run, done
