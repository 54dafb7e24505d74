"""Sweeps on a real one-node SLURM (tests/slurm_cluster.py starts one where it is installed; `.ci/run` installs it):
`python launch.py -m ... hydra/launcher=slurm` submits real jobs with sbatch, on the CPU tier, training the tiny model.

A requeued job waits about two minutes (BeginTime) before SLURM starts it again; the tests start it at once with
`scontrol update starttime=now`, as an idle cluster would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flux_lora.lifecycle.outcome import LOSS_TAG, scalar_series
from tests.cli import start_cli
from tests.slurm_cluster import job_reasons, job_states, start_pending_now

CELL = ["profile.lr_warmup_steps=1", "profile.sample_every_n_steps=1000", "profile.sample_steps=2"]
ON_SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4"]


def finish(process: subprocess.Popen[str], timeout_s: float = 600) -> str:
    return process.communicate(timeout=timeout_s)[0]


def status_of(cell: Path) -> dict:
    try:
        return json.loads((cell / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def keep_requeued_jobs_moving(jobs: list[str], held_since: dict[str, float]) -> None:
    """Start any of these jobs that SLURM holds back after a requeue (Reason=BeginTime), a few seconds after it was
    requeued: at once, the node may still be cleaning up the job's last run and refuses the start."""
    for job in jobs:
        for task, reason in job_reasons(job).items():
            if reason != "BeginTime":
                held_since.pop(task, None)
            elif time.monotonic() - held_since.setdefault(task, time.monotonic()) > 5:
                start_pending_now(task)
                held_since.pop(task)


def trainer_pid(cell: Path) -> int:
    """The training process of the cell's job (not its guard or accelerate's launcher, whose arguments name it too)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"flux_lora.engines.native.train" in argv
            and str(cell).encode() in argv
            and not any(b"launch" in a or b"job_guard" in a for a in argv)
        ):
            return int(entry.name)
    raise AssertionError(f"no trainer of {cell} running")


def hold_until_the_warning_is_pending(pid: int, timeout_s: float = 150) -> None:
    """Stop the process until SLURM's SIGUSR2 waits in it (/proc's pending masks), then let it go on and handle it.
    SLURM sends SIGCONT with its signals, so the process may already have gone on, handled it and exited."""
    usr2 = 1 << (signal.SIGUSR2 - 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except FileNotFoundError:
                return  # continued by SLURM, stopped by its warning, exited
            status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
            if (
                not status.get("State", "T").startswith("T")
                or (int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)) & usr2
            ):
                return  # pending, or SLURM's SIGCONT woke it to handle the warning
            assert time.monotonic() < deadline, f"no SIGUSR2 reached the trainer within {timeout_s:.0f} s"
            time.sleep(0.2)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_cell_that_hits_the_time_limit_or_is_requeued_resumes_in_its_folder_and_trains_every_step(
    slurm, tmp_path: Path
) -> None:
    """Two-minute limit with the warning 60 s before it: the trainer saves at the step reached, submitit requeues the
    job, and the restarted job resumes from that state in the same folder. Then `scontrol requeue` from outside
    (a preemption) mid-training does the same."""
    sweep_dir = tmp_path / "sweep"
    # SLURM sends the warning 0-30 s before `signal_delay_s` (its limits are checked every 30 s): with 60 s it comes
    # 30-60 s after the start. However fast this machine trains, the warning comes mid-training: the test holds the
    # trainer still (SIGSTOP) after its first steps until the warning is pending in it, then lets it go on.
    steps = 40
    sweep = start_cli(
        "-m",
        "ablation=baseline",
        f"ablation.baseline_steps={steps}",
        "profile.save_every_n_steps=20",
        "gpu.gradient_accumulation_steps=4",
        *CELL,
        *ON_SLURM,
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        f"hydra.sweep.dir={sweep_dir}",
        folder=tmp_path,
    )
    deadline = time.monotonic() + 900
    jobs: list[str] = []
    held_since: dict[str, float] = {}
    preempted = extended = False
    cell = sweep_dir / "0_tiny-smoke-cpu-native-baseline"
    frozen = False
    while sweep.poll() is None and time.monotonic() < deadline:
        if not frozen and len(scalar_series(cell / "logs", LOSS_TAG)) >= 2:
            hold_until_the_warning_is_pending(trainer_pid(cell))
            frozen = True
        if not jobs and (sweep_dir / "slurm_jobs.json").is_file():
            jobs = json.loads((sweep_dir / "slurm_jobs.json").read_text())["jobs"]
        keep_requeued_jobs_moving(jobs, held_since)
        attempts = status_of(cell).get("attempts", [])
        if not extended and len(attempts) >= 2:
            # The time limit did its part: give the job ten minutes, so that on a slow or busy machine it is not cut
            # every minute again (each attempt then trains a few steps between two warnings; 8 attempts were seen).
            subprocess.run(["scontrol", "update", f"JobId={jobs[0]}", "TimeLimit=10"], check=True, timeout=30)
            extended = True
        # Once it came back from the time limit and trains again: requeue it from outside, as a preemption would.
        if (
            not preempted
            and len(attempts) >= 2
            and attempts[-1]["state"] == "running"
            and attempts[-1]["from_step"] > 0
        ):
            live = scalar_series(cell / "logs", LOSS_TAG)
            if live and live[-1][0] > attempts[-1]["from_step"] + 2:
                subprocess.run(["scontrol", "requeue", jobs[0]], check=True, timeout=30)
                preempted = True
        time.sleep(2)
    output = finish(sweep, timeout_s=60)
    status = status_of(cell)
    assert status.get("state") == "succeeded", output[-4000:] + json.dumps(status, indent=1)[-3000:]
    attempts = status["attempts"]
    assert attempts[0]["state"] == "interrupted", (
        f"trained all {steps} steps before SLURM's warning came: {attempts[0]}"
    )
    assert preempted and len(attempts) >= 3, json.dumps(attempts, indent=1)
    assert attempts[0]["state"] == "interrupted" and attempts[0].get("requeued"), attempts[0]
    assert "SLURM's warning" in attempts[0]["reason"]
    # Every attempt in one folder, each with its SLURM job, array task and restart count; each resumed where the last saved.
    assert [a["slurm"]["restart_count"] for a in attempts] == list(range(len(attempts)))
    assert {a["slurm"]["job_id"] for a in attempts} == {jobs[0]}  # one cell: a plain job, requeued under its id
    for before, after in zip(attempts, attempts[1:]):
        assert after["from_step"] >= before["from_step"]
    assert (
        attempts[1]["from_step"] > 0
    )  # the time limit lost at most the steps since the signal: a state was saved on it
    losses = scalar_series(cell / "logs", LOSS_TAG)
    assert [step for step, _, _ in losses] == list(range(1, steps + 1))  # every step, once, in the final lineage
    assert (cell / "output" / "flux-lora.safetensors").is_file()
    assert len(list(sweep_dir.glob("0_*"))) == 1  # one run folder: never a second one for the same cell


@pytest.mark.slow
def test_a_packed_sweep_is_one_slurm_job_whose_cells_save_on_the_warning_and_resume_after_the_requeue(
    slurm, tmp_path: Path
) -> None:
    """launch.pack=true on SLURM: the two cells that share a base are one job (one array task, one trainer). SLURM's
    warning (SIGUSR2 to the job's processes, as before a time limit or a preemption; sent with `scancel --signal`)
    saves both cells and submitit requeues the job; the job that comes back decides each cell again (both resume)
    and trains them packed to their last step."""
    sweep_dir = tmp_path / "sweep"
    steps = 8
    sweep = start_cli(
        "-m",
        "ablation=baseline,a2_noise_offset",
        "launch.pack=true",
        f"ablation.baseline_steps={steps}",
        "profile.save_every_n_steps=4",
        *CELL,
        *ON_SLURM,
        f"hydra.sweep.dir={sweep_dir}",
        folder=tmp_path,
    )
    cells = [sweep_dir / "0_tiny-smoke-cpu-native-baseline", sweep_dir / "1_tiny-smoke-cpu-native-a2_noise_offset"]
    deadline = time.monotonic() + 600
    jobs: list[str] = []
    held_since: dict[str, float] = {}
    warned = False
    while sweep.poll() is None and time.monotonic() < deadline:
        if not jobs and (sweep_dir / "slurm_jobs.json").is_file():
            jobs = json.loads((sweep_dir / "slurm_jobs.json").read_text())["jobs"]
        if not warned and all(len(scalar_series(cell / "logs", LOSS_TAG)) >= 2 for cell in cells):
            # Held still (SIGSTOP) while the warning is sent, so it comes mid-training however fast this machine is.
            trainer = trainer_pid(cells[0])
            assert trainer == trainer_pid(cells[1])  # one trainer for both cells
            os.kill(trainer, signal.SIGSTOP)
            try:
                subprocess.run(["scancel", "--signal=USR2", jobs[0]], check=True, timeout=30)
                time.sleep(1)
            finally:
                os.kill(trainer, signal.SIGCONT)
            warned = True
        keep_requeued_jobs_moving(jobs, held_since)
        time.sleep(1)
    output = finish(sweep, timeout_s=60)
    assert warned, output[-4000:]
    record = json.loads((sweep_dir / "slurm_jobs.json").read_text())
    assert len(record["jobs"]) == 1 and record["packs"] == [[0, 1]], record
    for cell in cells:
        status = status_of(cell)
        assert status.get("state") == "succeeded", output[-4000:] + json.dumps(status, indent=1)[-3000:]
        attempts = status["attempts"]
        assert [a["state"] for a in attempts] == ["interrupted", "succeeded"], json.dumps(attempts, indent=1)
        assert attempts[0].get("requeued") and "SLURM's warning" in attempts[0]["reason"], attempts[0]
        assert [a["slurm"]["restart_count"] for a in attempts] == [0, 1]
        assert {a["slurm"]["job_id"] for a in attempts} == {jobs[0]}
        assert all(a["packed_with"] == [str(c) for c in cells if c != cell] for a in attempts)
        assert attempts[1]["from_step"] > 0  # resumed from the state saved on the warning
        losses = scalar_series(cell / "logs", LOSS_TAG)
        assert [step for step, _, _ in losses] == list(range(1, steps + 1))  # every step, once, in the final lineage
        summary = json.loads((cell / "output" / "train_summary.json").read_text())
        assert summary["steps"] == steps and (cell / "output" / "flux-lora.safetensors").is_file()
    assert (sweep_dir / "report.html").is_file()


@pytest.mark.slow
def test_a_sweep_submitted_twice_trains_each_cell_once_and_detach_returns_while_it_runs(slurm, tmp_path: Path) -> None:
    """The first submission is detached and runs one cell at a time; a second submission of the same sweep meets
    its running cell (busy, with its job) and trains the other; the first one's pending cell then finds it done.
    The report of the detached sweep is written by its last cell."""
    cells = [
        "-m",
        "ablation=baseline,a1_alpha",
        "ablation.baseline_steps=6",
        "profile.save_every_n_steps=3",
        *CELL,
        *ON_SLURM,
    ]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    began = time.monotonic()
    first = finish(
        start_cli(
            *cells,
            "launch.detach=true",
            "hydra.launcher.array_parallelism=1",
            f"hydra.sweep.dir={first_dir}",
            folder=tmp_path,
        )
    )
    assert (
        "this command returns now (launch.detach=true)" in first and f"python -m flux_lora.report {first_dir}" in first
    ), first[-3000:]
    assert time.monotonic() - began < 60  # returned while the jobs are queued or running
    jobs = json.loads((first_dir / "slurm_jobs.json").read_text())["jobs"]
    assert (first_dir / "sbatch.sh").is_file() and "--cpus-per-task=1" in (first_dir / "sbatch.sh").read_text()
    assert "--gpus-per-node" not in (first_dir / "sbatch.sh").read_text()  # the CPU tier asks for no GPU

    # Once the first submission's first cell has its trainer, hold that trainer still (SIGSTOP; its job stays RUNNING)
    # while the same sweep is submitted again, so the cell is still training however fast this machine is.
    deadline = time.monotonic() + 300
    trainer = None
    while trainer is None:
        assert time.monotonic() < deadline, "the first cell's trainer never started"
        try:
            trainer = trainer_pid(first_dir / "0_tiny-smoke-cpu-native-baseline")
        except AssertionError:
            time.sleep(0.1)
    os.kill(trainer, signal.SIGSTOP)
    try:
        resubmitted = start_cli(*cells, f"hydra.sweep.dir={second_dir}", folder=tmp_path)
        second = finish(resubmitted, timeout_s=900)
    finally:
        os.kill(trainer, signal.SIGCONT)
    # Its summary reports the cell the first submission is training as busy, with that job; the sweep is not done.
    busy = [line for line in second.splitlines() if "│ busy" in line]
    assert busy and "SLURM job " in " ".join(second.splitlines()[second.splitlines().index(busy[0]) :][:2]), second[
        -4000:
    ]
    assert resubmitted.returncode == 1

    deadline = time.monotonic() + 600
    while any(
        state not in ("COMPLETED", "FAILED", "CANCELLED") for state in job_states(jobs[0].split("_")[0]).values()
    ):
        assert time.monotonic() < deadline, job_states(jobs[0])
        time.sleep(2)
    trained = sorted(
        json.loads((d / "run.json").read_text())["ablation"]["name"]
        for d in {p.parent for p in tmp_path.rglob("status.json")}
        if (d / "run.json").is_file() and status_of(d).get("state") == "succeeded"
    )
    assert trained == ["a1_alpha", "baseline"], trained  # each cell trained once, by one of the two submissions
    assert all(len(status_of(d)["attempts"]) == 1 for d in {p.parent for p in tmp_path.rglob("run.json")})
    assert (first_dir / "report.html").is_file()  # written by the detached sweep's last cell


def test_a_setting_the_cluster_rejects_is_one_line_naming_the_key(slurm, tmp_path: Path) -> None:
    output = finish(
        start_cli(
            "-m",
            "ablation=baseline",
            "launch.dry_run=true",
            *ON_SLURM,
            "hydra.launcher.partition=nosuchpartition",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            folder=tmp_path,
        )
    )
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        "error: hydra.launcher.partition=nosuchpartition: the cluster rejected it"
    ), output[-2000:]
    nodes = finish(
        start_cli(
            "-m",
            "ablation=baseline",
            "launch.dry_run=true",
            *ON_SLURM,
            "hydra.launcher.nodes=2",
            f"hydra.sweep.dir={tmp_path / 'sweep2'}",
            folder=tmp_path,
        )
    )
    assert "error: hydra.launcher.nodes=2: one node per cell only" in nodes, nodes[-2000:]
