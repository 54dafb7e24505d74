"""One real tiny run for every evaluation test: `launch.py` trains 4 steps once per session (about 30 s),
and the evaluation CLI runs on it once (small settings: 64 px, 2 steps, 2 strengths, 2 seeds, 2 prompts)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.cli import ONE_THREAD, run_cli
from tests.eval.tiny_eval import SMALL_EVAL_ARGS, TRAIN_4_STEPS


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
    done = run_cli(*TRAIN_4_STEPS, folder=root, env=ONE_THREAD)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run_dir,) = [p.parent for p in (root / "outputs").rglob("run.json")]
    return run_dir


@pytest.fixture(scope="session")
def evaluated_run(tiny_run: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The CLI run once on the tiny run: (run dir, the finished process)."""
    return tiny_run, run_cli(str(tiny_run), *SMALL_EVAL_ARGS, module="flux_lora.eval", env=ONE_THREAD)
