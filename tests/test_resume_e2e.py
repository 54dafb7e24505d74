"""Runs you can trust, through the real CLI on the embedded default (real processes, real training on CPU).

kill -9 of a sweep's whole process tree, then the same command: the cell resumes in its own folder. kill -9 of the
launcher alone: its job saves first under a guard that holds the lease, the relaunch resumes from that state; an
allowed recipe change trains with the new lr. NaN, then a rerun that retries only the failed cell. Two sweeps at
once: each cell trained once; reruns into fixed folders skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
import yaml

from flux_lora.compose import PROJECT_ROOT
from flux_lora.lifecycle.outcome import LOSS_TAG, scalar_series
from flux_lora.records import process_start_time
from flux_lora.report import read_run
from tests.cli import child_env, command, start_cli
from tests.test_launch_e2e import run_dirs

SHORT = [
    "ablation.baseline_steps=6",
    "profile.lr_warmup_steps=1",
    "profile.save_every_n_steps=2",
    "profile.sample_every_n_steps=100",
    "profile.sample_steps=2",
]


def start(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    """The launcher in a session of its own, apart from pytest's, as a launch from its own terminal would be."""
    return start_cli(*args, folder=tmp_path, new_session=True)


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


def wait_until_gone(pids: list[int], timeout_s: float = 30) -> None:
    """SIGKILL is not instant: a process may still be tearing down its memory. Wait until each one has exited (gone or
    a zombie), as the next launch would find it after any real crash."""
    deadline = time.monotonic() + timeout_s
    while any(process_start_time(pid) is not None for pid in pids):
        assert time.monotonic() < deadline, f"still alive {timeout_s} s after SIGKILL: {pids}"
        time.sleep(0.1)


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
def test_kill_9_of_a_sweeps_whole_tree_then_the_same_command_finishes_it(tmp_path: Path) -> None:
    """A one-cell sweep in a fixed folder outside paths.outputs, killed with its whole process tree mid-run: the same
    command again closes the dead attempt, resumes the cell in its folder and exits 0 (it was refused as "another
    config" before runs had leases and an index)."""
    sweep = ["-m", "ablation=baseline", *SHORT, f"hydra.sweep.dir={tmp_path / 'elsewhere'}"]  # a multirun: resume=auto
    first = start(sweep, tmp_path)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "elsewhere").rglob("flux-lora-step00000002-state/manifest.json")):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
        time.sleep(0.2)
    tree = [first.pid, *descendants(first.pid)]
    for pid in tree:  # all at once, as the OOM killer or a reboot would: nobody gets to clean up
        os.kill(pid, signal.SIGKILL)
    first.wait(timeout=30)
    wait_until_gone(tree)
    (cell,) = [d for d in (tmp_path / "elsewhere").iterdir() if (d / "run.json").is_file()]
    assert json.loads((cell / "status.json").read_text())["state"] == "running"  # left behind by the dead launcher
    assert read_run(cell).state == "owner gone"  # and shown as what it is

    again = start(sweep, tmp_path)
    output = finish(again)
    assert again.returncode == 0 and "resuming run" in output and str(cell) in output, output[-3000:]
    status = json.loads((cell / "status.json").read_text())
    assert status["state"] == "succeeded", status
    # The dead launcher's attempt was closed (not left `running`) when the second launch took the lease over.
    assert [a["state"] for a in status["attempts"]] == ["interrupted", "succeeded"]
    assert "owner" in status["attempts"][0]["reason"] and status["attempts"][0]["ended"]
    assert status["attempts"][1]["from_step"] >= 2
    assert (cell / "output" / "flux-lora.safetensors").is_file()
    assert len(run_dirs(tmp_path)) == 0 and len(list((tmp_path / "elsewhere").glob("*/run.json"))) == 1  # one folder


@pytest.mark.slow
def test_kill_9_of_the_launcher_then_an_immediate_relaunch_resumes_from_what_the_job_saved(tmp_path: Path) -> None:
    """The guard holds the lease while the orphaned job saves; the relaunch waits for it and resumes from that very
    state, in one go. Then an allowed recipe change from one of its states trains with the new lr."""
    args = [*SHORT, "ablation=baseline", "ablation.baseline_steps=10", "launch.resume=auto"]
    launcher = start(args, tmp_path)
    wait_for_state(tmp_path, "step00000002", launcher)
    job = descendants(launcher.pid)
    assert job, "no training job under the launcher"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    relaunch = start(args, tmp_path)  # at once, while the orphaned job is still saving
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and any(
        Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in job
    ):
        time.sleep(0.2)
    assert not [
        pid for pid in job if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    ]
    (run_dir,) = run_dirs(tmp_path)
    dead = json.loads((run_dir / "output" / "train_summary.json").read_text())
    assert dead["stop_reason"] == "signal"  # the guard stopped it gracefully: state saved at the step it reached

    output = finish(relaunch)  # in one go: a guard still saving is waited for, never a refusal to retry by hand
    assert relaunch.returncode == 0 and "is held by" not in output, output[-3000:]
    assert f"from flux-lora-step{dead['steps']:08d}-state (step {dead['steps']})" in output, output[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded", status
    assert [a["state"] for a in status["attempts"]] == ["interrupted", "succeeded"]
    assert "owner" in status["attempts"][0]["reason"] and status["attempts"][1]["from_step"] == dead["steps"]
    assert status["attempts"][1]["command"][-2:] == [
        "--resume",
        str(run_dir / "output" / f"flux-lora-step{dead['steps']:08d}-state"),
    ]
    # Every step trained once: TensorBoard's steps 1-10 descend from one line of attempts, none set aside.
    losses = scalar_series(run_dir / "logs", LOSS_TAG)
    assert [step for step, _, _ in losses] == list(range(1, 11))
    # The summary's time is over both attempts.
    assert read_run(run_dir).duration_s == pytest.approx(sum(a["duration_s"] for a in status["attempts"]), abs=0.05)

    # An allowed recipe change from step 8 of that run: steps 9-10 train with the new learning rate (read back from
    # TensorBoard), and the run is labelled with its lineage under an id of its own (never the clean recipe's).
    state = run_dir / "output" / "flux-lora-step00000008-state"
    changed = finish(
        start(
            [
                *SHORT,
                "ablation=baseline",
                "ablation.baseline_steps=10",
                f"launch.resume_from={state}",
                "launch.allow_recipe_change=true",
                "profile.learning_rate=5e-4",
            ],
            tmp_path,
        )
    )
    assert "with this run's recipe: base lr 0.001 -> 0.0005" in changed, changed[-3000:]
    (lineage_dir,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    record = json.loads((lineage_dir / "run.json").read_text())
    assert record["lineage"]["from_run"] == json.loads((run_dir / "run.json").read_text())["run_id"]
    assert record["lineage"]["from_step"] == 8 and record["lineage"]["recipe_changes"]
    source_lr = {step: value for step, value, _ in scalar_series(run_dir / "logs", "lr/unet")}
    trained_lr = {step: value for step, value, _ in scalar_series(lineage_dir / "logs", "lr/unet")}
    assert sorted(trained_lr) == [9, 10]
    assert all(trained_lr[s] == pytest.approx(source_lr[s] / 2) for s in (9, 10)), (trained_lr, source_lr)
    lineage_status = json.loads((lineage_dir / "status.json").read_text())
    assert lineage_status["state"] == "succeeded" and lineage_status["attempts"][0]["from_step"] == 8
    clean = finish(
        start(
            [
                *SHORT,
                "ablation=baseline",
                "ablation.baseline_steps=10",
                "profile.learning_rate=5e-4",
                "launch.dry_run=true",
            ],
            tmp_path,
        )
    )
    assert record["run_id"] not in clean and "lineage: from run" in read_run(lineage_dir).note


@pytest.mark.slow
def test_nan_fails_within_steps_and_a_rerun_retries_only_the_failed_cell(tmp_path: Path) -> None:
    """Two cells, one with an absurd learning rate: it fails with the NaN step named, the other succeeds;
    the same command again skips the good cell and retries only the failed one. `python -m flux_lora.watch`, in a
    real pseudo-terminal, shows both cells moving while the sweep runs, moves its selection with the arrow keys, opens
    the selected cell's newest sample with `o`, and exits by itself when they have ended."""
    sweep_dir = tmp_path / "outputs" / "sweeps" / "nan"
    args = [
        "-m",
        "ablation=baseline",
        "profile.learning_rate=1e-3,1e12",
        "launch.resume=auto",
        *SHORT,
        "ablation.baseline_steps=8",
        "profile.sample_every_n_steps=4",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    sweep = start(args, tmp_path)
    while not (sweep_dir / "multirun.yaml").is_file():
        assert sweep.poll() is None
        time.sleep(0.1)
    viewer = (
        tmp_path / "viewer.sh"
    )  # stands in for xdg-open (no desktop here): it writes down what it was asked to show
    viewer.write_text('#!/bin/sh\nprintf "%s\\n" "$1" >> "$(dirname "$0")/opened.txt"\n')
    viewer.chmod(0o755)
    watcher, screen, keyboard = watch_in_a_terminal(sweep_dir, "--open-with", str(viewer))
    good_samples = sweep_dir / "0_tiny-smoke-cpu-native-baseline" / "output" / "sample"
    while "1_tiny-smoke-cpu-native-baseline" not in "".join(screen[-20:]):  # both cells on screen: one to move to
        assert sweep.poll() is None, finish(sweep)[-3000:]
        time.sleep(0.1)
    for key in ("\x1b[B", "\x1b[A", "o"):  # down to the NaN cell, back up to the good one, open its sample
        os.write(keyboard, key.encode())
        time.sleep(0.5)
    deadline = time.monotonic() + 15
    while not (tmp_path / "opened.txt").is_file():
        assert time.monotonic() < deadline, "".join(screen)[-3000:]
        time.sleep(0.1)
    (opened,) = (tmp_path / "opened.txt").read_text().splitlines()
    assert Path(opened).parent == good_samples and Path(opened).suffix == ".png"
    output = finish(sweep)
    watcher.wait(timeout=60)  # by itself: every cell has ended
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", "".join(screen))
    assert watcher.returncode == 0, frames[-3000:]
    assert (
        re.search(r"›\s*│\s*1_tiny-smoke-cpu-native-baseline", frames)
        and f"opened {Path(opened).name} with viewer.sh" in frames
    )
    steps = {
        cell: {int(m) for m in re.findall(rf"{cell}\s+│[^│]*│[^│]*│\s*(\d+)/8", frames)}
        for cell in ("0_tiny-smoke-cpu-native-baseline", "1_tiny-smoke-cpu-native-baseline")
    }
    # The good cell moved while it was watched; the NaN cell (it fails within ~3 steps, a second or two) showed up
    # training and ended failed in the last frame.
    assert len(steps["0_tiny-smoke-cpu-native-baseline"]) >= 2 and steps["1_tiny-smoke-cpu-native-baseline"], (
        steps,
        frames[-3000:],
    )
    states = re.findall(r"1_tiny-smoke-cpu-native-baseline\s+│\s*([^│]*?)\s*│", frames)
    assert states and states[-1] == "failed", (states[-3:], frames[-3000:])
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


def watch_in_a_terminal(sweep_dir: Path, *options: str) -> tuple[subprocess.Popen[bytes], list[str], int]:
    """`python -m flux_lora.watch` on a 220x50 pseudo-terminal; what it draws is collected as it comes, and what is
    written to the returned descriptor reaches it as typed keys."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 220, 0, 0))
    env = child_env(drop=["COLUMNS", "LINES"])  # the terminal's own size, not pytest's
    watcher = subprocess.Popen(
        command([str(sweep_dir), "--interval", "0.2", *options], module="flux_lora.watch"),
        cwd=PROJECT_ROOT,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
        env=env,
    )
    os.close(slave)
    screen: list[str] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed with the watcher
                return
            if not chunk:
                return
            screen.append(chunk.decode("utf-8", errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    return watcher, screen, master


@pytest.mark.slow
def test_a_sweep_run_again_into_its_folder_with_a_changed_cell_is_refused_with_the_keys(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "outputs" / "sweeps" / "fixed"
    args = [
        "-m",
        "ablation=baseline",
        "launch.resume=auto",
        "launch.dry_run=true",
        f"hydra.sweep.dir={sweep_dir}",
        *SHORT,
    ]
    assert finish(start(args, tmp_path)) and (sweep_dir / "0_tiny-smoke-cpu-native-baseline" / "run.json").is_file()
    # Dry runs are never resumed, so freeze a real-looking earlier cell: same folder, now another learning rate.
    output = finish(start([a for a in args if a != "launch.dry_run=true"] + ["profile.learning_rate=5e-4"], tmp_path))
    assert "holds a run of another config (profile.learning_rate: 0.001 -> 0.0005)" in output, output[-2000:]
    assert (
        json.loads((sweep_dir / "0_tiny-smoke-cpu-native-baseline" / "status.json").read_text())["state"] == "dry_run"
    )


@pytest.mark.slow
def test_a_sweep_submitted_twice_at_once_trains_each_cell_once_and_reruns_skip_in_fixed_folders(tmp_path: Path) -> None:
    """Two submissions of one sweep race for its cells: the lease gives each cell one owner. Run again into their
    fixed folders (one outside paths.outputs), every cell is skipped as done, never refused."""
    outside, inside = tmp_path / "elsewhere" / "sweep", tmp_path / "outputs" / "sweeps" / "fixed"
    sweep = [
        "-m",
        "ablation=baseline,a1_alpha",
        *SHORT,
        "ablation.baseline_steps=4",
    ]  # no launch.resume: a multirun means auto
    first, second = (
        start([*sweep, f"hydra.sweep.dir={outside}"], tmp_path),
        start([*sweep, f"hydra.sweep.dir={inside}"], tmp_path),
    )
    outputs = [finish(first), finish(second)]
    assert any("is held by pid" in output for output in outputs), outputs[0][-2000:] + outputs[1][-2000:]
    trained = sorted(
        (
            json.loads((d / "run.json").read_text())["ablation"]["name"],
            len(json.loads((d / "status.json").read_text())["attempts"]),
        )
        for d in {p.parent for p in tmp_path.rglob("status.json")}
        if (d / "run.json").is_file()
    )
    assert trained == [("a1_alpha", 1), ("baseline", 1)], trained  # each cell trained once, by one of the two
    assert {first.returncode, second.returncode} & {1}  # a sweep whose cell was busy elsewhere is not done

    for folder in (outside, inside):
        rerun = start([*sweep, f"hydra.sweep.dir={folder}"], tmp_path)
        output = finish(rerun)
        assert output.count("skipped: done: run") == 2 and "holds a run of another config" not in output, output[-3000:]
        assert rerun.returncode == 0, output[-2000:]
