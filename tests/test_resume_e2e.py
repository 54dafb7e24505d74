"""Runs you can trust, through the real CLI on the embedded default (real processes, real training on CPU).

kill -9 of the whole process tree mid-sweep, then the same command: the killed cell resumes from its
last state in its own folder and the sweep completes; once more: every cell is skipped as done. A
kill -9 of the launcher alone leaves no training process behind, and the job saves its state first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flux_lora.compose import PROJECT_ROOT
from tests.test_launch_e2e import run_dirs

SHORT = ["ablation.baseline_steps=6", "profile.lr_warmup_steps=1", "profile.save_every_n_steps=2",
         "profile.sample_every_n_steps=100", "profile.sample_steps=2"]  # fmt: skip
SWEEP = ["-m", "ablation=baseline,a1_alpha", "launch.resume=auto", *SHORT]


def start(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    command = [sys.executable, str(PROJECT_ROOT / "launch.py"), *args, f"paths.outputs={tmp_path / 'outputs'}",
               f"paths.cache={tmp_path / 'cache'}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SD_SCRIPTS_DIR"}
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below pid (read from /proc), whatever session or group it moved to."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def wait_for_state(tmp_path: Path, step_name: str, process: subprocess.Popen[str], timeout_s: float = 240) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list((tmp_path / "outputs").rglob(f"flux-lora-{step_name}-state/manifest.json"))
        if found:
            return found[0].parent
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        time.sleep(0.2)
    raise AssertionError(f"no {step_name} state within {timeout_s} s")


def finish(process: subprocess.Popen[str]) -> str:
    output, _ = process.communicate(timeout=600)
    return output


@pytest.mark.slow
def test_kill_9_of_the_tree_then_the_same_sweep_finishes_it_and_then_skips_it(tmp_path: Path) -> None:
    first = start(SWEEP, tmp_path)
    state = wait_for_state(tmp_path, "step00000002", first)
    tree = [first.pid, *descendants(first.pid)]
    for pid in tree:  # all at once, as the OOM killer or a reboot would: nobody gets to clean up
        os.kill(pid, signal.SIGKILL)
    first.wait(timeout=30)
    cell = state.parent.parent
    assert json.loads((cell / "status.json").read_text())["state"] == "running"  # left behind by the dead launcher

    time.sleep(1.1)  # a new timestamped sweep folder, as Hydra makes by default
    output = finish(start(SWEEP, tmp_path))
    assert f"resuming run" in output and str(cell) in output, output[-3000:]
    status = json.loads((cell / "status.json").read_text())
    assert status["state"] == "succeeded", status
    assert [a["state"] for a in status["attempts"]] == ["running", "succeeded"]
    assert status["attempts"][1]["from_step"] >= 2
    assert (cell / "output" / "flux-lora.safetensors").is_file()
    # The killed cell's frozen snapshot was not rewritten, and both cells now succeeded.
    assert json.loads((cell / "run.json").read_text())["run_id"]
    states = {json.loads((d / "status.json").read_text())["state"] for d in run_dirs(tmp_path)}
    assert states == {"succeeded"}

    time.sleep(1.1)
    output = finish(start(SWEEP, tmp_path))
    assert output.count("skipped: done") >= 2, output[-3000:]
    assert len(run_dirs(tmp_path)) == 2  # nothing trained again, no new run folder


@pytest.mark.slow
def test_kill_9_of_the_launcher_leaves_no_orphan_and_the_job_saves_first(tmp_path: Path) -> None:
    launcher = start([*SHORT, "ablation=baseline", "ablation.baseline_steps=400"], tmp_path)
    wait_for_state(tmp_path, "step00000002", launcher)
    job = descendants(launcher.pid)
    assert job, "no training job under the launcher"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in job):
        time.sleep(0.5)
    assert not [pid for pid in job if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "output" / "train_summary.json").read_text())
    assert summary["stop_reason"] == "signal"  # the guard stopped it gracefully: state saved at the step it reached
    saved = sorted((run_dir / "output").glob("flux-lora-step*-state/manifest.json"))
    assert saved and summary["steps"] >= 2


@pytest.mark.slow
def test_nan_fails_within_steps_and_a_rerun_retries_only_the_failed_cell(tmp_path: Path) -> None:
    """Two cells, one with an absurd learning rate: it fails with the NaN step named, the other succeeds;
    the same command again skips the good cell and retries only the failed one."""
    args = ["-m", "ablation=baseline", "profile.learning_rate=1e-3,1e12", "launch.resume=auto", *SHORT,
            "ablation.baseline_steps=8"]  # fmt: skip
    output = finish(start(args, tmp_path))
    by_lr = {yaml.safe_load((d / "config.yaml").read_text())["profile"]["learning_rate"]: d for d in run_dirs(tmp_path)}
    bad = json.loads((by_lr[1e12] / "status.json").read_text())
    assert bad["state"] == "failed" and bad["reason"].startswith("loss became NaN at step "), bad
    assert int(bad["reason"].split("step ")[1].split(";")[0]) <= 5  # stopped within a few steps, not after 8
    assert json.loads((by_lr[1e-3] / "status.json").read_text())["state"] == "succeeded"
    assert "loss became NaN" in output  # and the sweep table names the reason

    time.sleep(1.1)
    output = finish(start(args, tmp_path))
    assert output.count("skipped: done: run") == 1, output[-3000:]
    attempts = {lr: 0 for lr in by_lr}
    for d in run_dirs(tmp_path):
        lr = yaml.safe_load((d / "config.yaml").read_text())["profile"]["learning_rate"]
        attempts[lr] += len(json.loads((d / "status.json").read_text())["attempts"])
    assert attempts == {1e-3: 1, 1e12: 2}  # resumed from its last good state, or started again if it had none


def test_a_sweep_run_again_into_its_folder_with_a_changed_cell_is_refused_with_the_keys(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "outputs" / "sweeps" / "fixed"
    args = ["-m", "ablation=baseline", "launch.resume=auto", "launch.dry_run=true", f"hydra.sweep.dir={sweep_dir}", *SHORT]
    assert finish(start(args, tmp_path)) and (sweep_dir / "0_tiny-smoke-cpu-native-baseline" / "run.json").is_file()
    # Dry runs are never resumed, so freeze a real-looking earlier cell: same folder, now another learning rate.
    output = finish(start([a for a in args if a != "launch.dry_run=true"] + ["profile.learning_rate=5e-4"], tmp_path))
    assert "holds a run of another config (profile.learning_rate: 0.001 -> 0.0005)" in output, output[-2000:]
    assert json.loads((sweep_dir / "0_tiny-smoke-cpu-native-baseline" / "status.json").read_text())["state"] == "dry_run"
