"""How the native job stops early: a signal saves a state to resume from, a non-finite loss saves nothing;
both write train_summary.json saying why, and exit with a code that says it too."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_lora.checkpoint_files import state_problem
from flux_lora.compose import PROJECT_ROOT
from flux_lora.engines.native.config import CONFIG_FILE, NativeTrainConfig
from flux_lora.engines.native.stopping import prune_step_states
from flux_lora.engines.native.train import main
from tests.engines.native.native_tiny_run import make_dataset, tiny_config

STEP_STATE = re.compile(r"flux-lora-step(\d{8})-state")


def freeze(config: NativeTrainConfig) -> Path:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    return run_dir


def step_states(output: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in output.iterdir() if (m := STEP_STATE.fullmatch(p.name)))


def stop_job_at_step(run_dir: Path, signum: int, step: int) -> tuple[int, str]:
    """Run the job as the launcher does (its own process) and send `signum` once it reports `step` or later."""
    job = subprocess.Popen(
        [sys.executable, "-m", "flux_lora.engines.native.train", str(run_dir)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    watchdog = threading.Timer(300, job.kill)
    watchdog.start()
    seen = []
    try:
        assert job.stdout is not None
        for line in job.stdout:
            seen.append(line)
            reported = re.match(r"step (\d+)/", line)
            if reported and int(reported.group(1)) >= step:
                job.send_signal(signum)
                break
        seen.append(job.communicate()[0])
    finally:
        watchdog.cancel()
    return job.returncode, "".join(seen)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_a_state_and_the_run_resumes(tmp_path: Path, signum: int, code: int) -> None:
    dataset = make_dataset(tmp_path / "ds", count=3)
    config = tiny_config(tmp_path, dataset, max_train_steps=16, save_every_n_steps=3, keep_last_states=2)
    returncode, log = stop_job_at_step(freeze(config), signum, step=6)
    assert returncode == code, log[-3000:]

    output = Path(config.output_dir)
    summary = json.loads((output / "train_summary.json").read_text())
    stopped = summary["steps"]
    assert 6 <= stopped < 16 and summary["stop_reason"] == "signal" and summary["signal"] == signal.Signals(signum).name
    state = output / f"flux-lora-step{stopped:08d}-state"
    assert summary["resume_state"] == str(state)
    assert state_problem(state) is None
    assert json.loads((state / "train_state.json").read_text())["current_step"] == stopped
    assert (output / f"flux-lora-step{stopped:08d}.safetensors").is_file()
    # Only the newest two step states are kept: the periodic ones (every 3 steps) and the one the signal saved.
    saved = sorted({s for s in range(3, stopped + 1, 3)} | {stopped})
    assert step_states(output) == saved[-2:]
    assert not (output / "flux-lora-state").exists()

    if signum == signal.SIGTERM:  # one resume is enough to show the state is a real one
        # As the launcher resumes: the frozen config unchanged, the state on the command line.
        resumed = tiny_config(
            tmp_path, dataset, "resumed", max_train_steps=16, save_every_n_steps=3, keep_last_states=2
        )
        assert main([str(freeze(resumed)), "--resume", str(state)]) == 0
        summary = json.loads((Path(resumed.output_dir) / "train_summary.json").read_text())
        assert (summary["first_step"], summary["steps"], summary["stop_reason"]) == (stopped + 1, 16, None)
        assert state_problem(Path(resumed.output_dir) / "flux-lora-state") is None


def test_a_non_finite_loss_stops_at_once_and_saves_nothing_from_the_broken_weights(tmp_path: Path) -> None:
    # lr 1e12: the first update blows the LoRA up, and the next loss is NaN.
    config = tiny_config(
        tmp_path,
        make_dataset(tmp_path / "ds", count=2),
        learning_rate=1e12,
        max_train_steps=20,
        save_every_n_steps=1,
        keep_last_states=0,
    )
    assert main([str(freeze(config))]) == 3

    output = Path(config.output_dir)
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["stop_reason"] == "nonfinite_loss" and summary["nonfinite_step"] <= 3
    assert summary["steps"] == summary["nonfinite_step"]
    assert summary["average_loss"] is None or math.isfinite(summary["average_loss"])  # JSON has no NaN
    assert step_states(output) == list(range(1, summary["nonfinite_step"]))
    if summary["last_good_checkpoint"] is not None:
        assert summary["last_good_checkpoint"] == str(
            output / f"flux-lora-step{summary['nonfinite_step'] - 1:08d}-state"
        )
        assert state_problem(Path(summary["last_good_checkpoint"])) is None
    for lora in output.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(lora).values()), lora.name
    assert not (output / "flux-lora.safetensors").exists()


def test_pruning_keeps_the_newest_step_states(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        (tmp_path / f"flux-lora-step{step:08d}-state").mkdir()
    (tmp_path / "flux-lora-state").mkdir()
    (tmp_path / "other-step00000002-state").mkdir()
    assert prune_step_states(tmp_path, "flux-lora", 8, keep=0) == []
    removed = prune_step_states(tmp_path, "flux-lora", 6, keep=2)  # a newer state (8) is not counted against 6
    assert [p.name for p in removed] == ["flux-lora-step00000002-state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flux-lora-state",
        "flux-lora-step00000004-state",
        "flux-lora-step00000006-state",
        "flux-lora-step00000008-state",
        "other-step00000002-state",
    ]
