"""Faults on one machine, through the real CLI on the embedded default (real processes, real signals, real training):
a run taken over stops without writing, a stop after the last step leaves a finished run, an unreadable status.json
never hides the states beside it, two processes stop together, a full disk fails the run in one line and the next
launch resumes. (The cluster faults are in tests/test_slurm_two_node_e2e.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flux_lora.lifecycle.lease import LEASE_DIR
from flux_lora.lifecycle.outcome import LOSS_TAG, scalar_series
from tests.cli import run_cli, start_cli
from tests.test_launch_e2e import run_dirs
from tests.test_resume_e2e import SHORT, descendants, finish, start, wait_for_state, wait_until_gone


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder: its size and modification time (a byte written changes one of them)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _is_trainer(pid: int) -> bool:
    """A training worker itself (not the guard or accelerate's launcher, whose arguments name the module too)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return b"flux_lora.engines.native.train" in argv and not any(
        b"launch" in a or b"job_guard" in a or b"torchrun" in a for a in argv
    )


def _read_until(process, pattern: str, timeout_s: float = 240) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        assert time.monotonic() < deadline, "".join(lines[-40:])
    raise AssertionError(f"ended before {pattern!r}:\n" + "".join(lines[-60:]))


@pytest.mark.slow
def test_an_owner_whose_lease_was_taken_stops_at_its_next_step_without_writing_a_byte(tmp_path: Path) -> None:
    args = [*SHORT, "ablation=baseline", "ablation.baseline_steps=200", "profile.save_every_n_steps=1000"]
    launcher = start(args, tmp_path)
    _read_until(launcher, r"^step \d+/200")  # training
    (run_dir,) = run_dirs(tmp_path)
    (lease,) = (tmp_path / "outputs" / LEASE_DIR).glob("*.json")
    tree = descendants(launcher.pid)
    # What a takeover leaves: the lease file now carries another owner's token. (A write the owner began after its
    # last check, microseconds before this, would still land: the check is a read, not a lock.)
    record = json.loads(lease.read_text())
    lease.write_text(json.dumps({**record, "token": "taken-by-another-launch", "pid": 1, "host": "elsewhere"}))
    before = _files(run_dir)
    output = finish(launcher)
    wait_until_gone(tree)
    assert launcher.returncode == 1, output[-3000:]
    assert "lost the lease to pid 1 on elsewhere" in output and "stopped without writing" in output, output[-3000:]
    assert _files(run_dir) == before  # status.json, train.log, TensorBoard, outputs: not a byte more
    assert json.loads(lease.read_text())["token"] == "taken-by-another-launch"  # nor released


@pytest.mark.slow
def test_a_stop_signal_after_the_last_step_leaves_a_finished_run_that_no_launch_trains_again(tmp_path: Path) -> None:
    """SIGTERM while the final LoRA and samples are written: the trainer finishes, accelerate's launcher process dies
    of the signal (exit 143); the artefacts decide: succeeded. The next launch skips it; the LoRA is the same file."""
    args = [*SHORT, "ablation=baseline", "profile.sample_steps=12", "launch.resume=auto"]  # a sample pass of seconds
    launcher = start(args, tmp_path)
    lines = _read_until(launcher, r"^step 6/6")
    launcher.send_signal(signal.SIGTERM)
    output = "".join(lines) + finish(launcher)
    assert launcher.returncode == 0, output[-3000:]
    assert re.search(r"SIGTERM: \d of \d samples written at step 6", output), output[-3000:]  # the stop landed there
    (run_dir,) = run_dirs(tmp_path)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["attempts"][0]["exit_code"] == 143, status
    lora = run_dir / "output" / "flux-lora.safetensors"
    digest = hashlib.sha256(lora.read_bytes()).hexdigest()

    again = start(args, tmp_path)
    output = finish(again)
    assert again.returncode == 0 and "skipped: done: run" in output and "resuming" not in output, output[-3000:]
    assert hashlib.sha256(lora.read_bytes()).hexdigest() == digest
    assert len(json.loads((run_dir / "status.json").read_text())["attempts"]) == 1  # nothing trained
    assert [step for step, _, _ in scalar_series(run_dir / "logs", LOSS_TAG)] == list(range(1, 7))


@pytest.mark.slow
def test_a_zero_length_status_beside_saved_states_resumes_from_the_newest_in_the_same_folder(tmp_path: Path) -> None:
    """A crash while status.json was replaced (power cut): the states at steps 4 and 8 beside it are what counts."""
    args = [
        *SHORT,
        "ablation=baseline",
        "ablation.baseline_steps=12",
        "profile.save_every_n_steps=4",
        "launch.resume=auto",
    ]
    launcher = start(args, tmp_path)
    wait_for_state(tmp_path, "step00000008", launcher)
    tree = [launcher.pid, *descendants(launcher.pid)]
    for pid in tree:  # everything at once, as a power cut would
        os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    wait_until_gone(tree)
    (run_dir,) = run_dirs(tmp_path)
    newest = max(int(p.name[len("flux-lora-step") :][:8]) for p in (run_dir / "output").glob("flux-lora-step*-state"))
    assert newest >= 8
    (run_dir / "status.json").write_bytes(b"")

    again = start(args, tmp_path)
    output = finish(again)
    assert again.returncode == 0, output[-3000:]
    assert (
        "resuming run" in output and f"in {run_dir} from flux-lora-step{newest:08d}-state (step {newest})" in output
    ), output[-3000:]
    assert "status.json cannot be read" in output and run_dirs(tmp_path) == [run_dir]  # the same folder, no `-2`
    (kept,) = run_dir.glob("status.json.unreadable-*")
    assert kept.stat().st_size == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["attempts"][-1]["from_step"] == newest, status
    assert [step for step, _, _ in scalar_series(run_dir / "logs", LOSS_TAG)] == list(range(1, 13))


@pytest.mark.slow
def test_a_sigusr2_reaches_both_processes_of_a_two_process_job_which_save_once_and_resume_to_the_last_step(
    tmp_path: Path,
) -> None:
    """Two CPU processes (gloo) under torch elastic, which starts its workers in sessions of their own: the guard
    passes SLURM's warning to every process of the job, both stop at the same step, one state is saved, and the run
    resumes to exactly max_train_steps."""
    args = [
        *SHORT,
        "ablation=baseline",
        "ablation.baseline_steps=16",
        "profile.save_every_n_steps=1000",
        "gpu.num_gpus=2",
        "launch.resume=auto",
    ]
    launcher = start(args, tmp_path)
    lines = _read_until(launcher, r"^step [2-9]/16")
    workers = [pid for pid in descendants(launcher.pid) if _is_trainer(pid)]
    assert len(workers) == 2 and len({os.getsid(pid) for pid in workers}) == 2  # each worker leads a session of its own
    launcher.send_signal(signal.SIGUSR2)
    output = "".join(lines) + finish(launcher)
    assert launcher.returncode == 130, output[-3000:]
    (stop_line,) = re.findall(r"SIGUSR2: stopping at step (\d+), saving a state", output)  # one process speaks for both
    (run_dir,) = run_dirs(tmp_path)
    states = sorted(p.name for p in (run_dir / "output").glob("flux-lora-step*-state"))
    assert states == [f"flux-lora-step{int(stop_line):08d}-state"]  # saved once, at one step
    assert sorted(p.name for p in (run_dir / "output" / states[0]).glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"

    again = start(args, tmp_path)
    output = finish(again)
    assert again.returncode == 0 and f"(step {stop_line})" in output, output[-3000:]
    assert [step for step, _, _ in scalar_series(run_dir / "logs", LOSS_TAG)] == list(range(1, 17))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"


@pytest.mark.slow
def test_a_full_disk_during_training_fails_the_run_in_one_line_keeps_its_states_and_the_next_launch_resumes(
    tmp_path: Path,
) -> None:
    """paths.outputs on a small tmpfs, filled once the run saved its step-4 state so that the next state (460 kB on
    the tiny model) no longer fits while small records still do: failed, the file and the free space named, no
    traceback; after freeing the space the same command resumes from the saved state."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        args = [
            *SHORT,
            "ablation=baseline",
            "ablation.baseline_steps=12",
            "profile.save_every_n_steps=2",
            "launch.resume=auto",
            "hydra.callbacks.preflight.min_free_gib=0.01",  # the 24 MB disk is what this test is about
            f"paths.outputs={disk / 'outputs'}",
            f"paths.cache={tmp_path / 'cache'}",
        ]
        launcher = start_cli(*args, cwd=tmp_path)
        deadline = time.monotonic() + 240
        while not list(disk.rglob("flux-lora-step00000004-state/manifest.json")):
            assert launcher.poll() is None and time.monotonic() < deadline, (
                launcher.stdout.read() if launcher.stdout else ""
            )
            time.sleep(0.1)
        filler = disk / "filler"
        with open(
            filler, "wb"
        ) as handle:  # fill the disk, then give back 200 kB: less than a state, more than a record
            try:
                while True:
                    handle.write(b"\0" * (1 << 16))
                    handle.flush()
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - 200_000))
        output = launcher.communicate(timeout=300)[0]
        assert launcher.returncode == 1 and "Traceback" not in output, output[-3000:]
        (run_dir,) = [p.parent for p in (disk / "outputs").rglob("run.json")]
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "failed", status
        assert re.search(
            r"could not write \S+-state: No space left on device \([\d.]+ \w?B free\)", status["reason"]
        ), status["reason"]
        saved = sorted(p.name for p in (run_dir / "output").glob("flux-lora-step*-state"))
        assert "flux-lora-step00000004-state" in saved and not list((run_dir / "output").glob(".*staging*"))

        filler.unlink()
        again = run_cli(*args, cwd=tmp_path)
        assert again.returncode == 0 and "resuming run" in again.stdout, again.stdout[-3000:] + again.stderr[-2000:]
        assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
        assert [step for step, _, _ in scalar_series(run_dir / "logs", LOSS_TAG)] == list(range(1, 13))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
