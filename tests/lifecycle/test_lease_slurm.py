"""SLURM is the referee for SLURM holders: a real one-node SLURM (tests/slurm_cluster.py) runs, suspends and ends a
real job, and the lease of a holder on "another node" in that job is judged by what squeue says, not by its heartbeat."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from flux_lora.lifecycle.lease import Lease, LeaseHeld, lease_path
from tests.slurm_cluster import wait_for


def _submit_sleeper(tmp_path: Path) -> str:
    script = tmp_path / "sleeper.sh"
    script.write_text("#!/bin/sh\nsleep 300\n")
    done = subprocess.run(
        ["sbatch", "--parsable", "--mem=100M", "-c", "1", "-o", str(tmp_path / "sleeper.out"), str(script)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().split(";")[0]


def _lease_of_job(outputs: Path, job: str, restart: int = 0, heartbeat_age_s: float = 0) -> Path:
    """What a launcher inside `job` on another node leaves: its pids mean nothing here."""
    path = lease_path(outputs, "run1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "run_id": "run1",
                "token": "t0",
                "host": "node-b",
                "boot_id": "other-boot",
                "pid": 4242,
                "pid_start": 1,
                "since": "2026-12-07T00:00:00+00:00",
                "slurm_job": job,
                "slurm_restart": restart,
            }
        )
    )
    stamp = time.time() - heartbeat_age_s
    os.utime(path, (stamp, stamp))
    return path


def test_slurm_decides_whether_a_slurm_holder_is_gone(slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = _submit_sleeper(tmp_path)
    try:
        wait_for(job, {"RUNNING"}, timeout_s=60)
        # Running: it holds, and the message says what to wait for.
        _lease_of_job(tmp_path, job)
        with pytest.raises(LeaseHeld, match=rf"SLURM job {job} is RUNNING.*squeue -j {job}.*scancel {job}"):
            Lease.acquire(tmp_path, "run1")
        # Suspended (every process stopped, SIGSTOP) and silent for an hour: still holds, whatever the heartbeat says.
        subprocess.run(["scontrol", "suspend", job], check=True, capture_output=True)
        wait_for(job, {"SUSPENDED"}, timeout_s=30)
        _lease_of_job(tmp_path, job, heartbeat_age_s=3600)
        with pytest.raises(LeaseHeld, match=rf"SLURM job {job} is SUSPENDED"):
            Lease.acquire(tmp_path, "run1", stale_after_s=60)
        # The same job started again by SLURM (a requeue after a node failure): its successor takes over at once.
        subprocess.run(["scontrol", "resume", job], check=True, capture_output=True)
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with Lease.acquire(tmp_path, "run1") as lease:
            assert lease.took_over is not None and "restart 1" in lease.took_over_why
            assert lease.holder.slurm_job == job and lease.holder.slurm_restart == 1
        # ... and the same restart count is not a successor (a second launcher in the same incarnation).
        _lease_of_job(tmp_path, job, restart=1)
        with pytest.raises(LeaseHeld, match="RUNNING"):
            Lease.acquire(tmp_path, "run1")
        monkeypatch.delenv("SLURM_JOB_ID")
        monkeypatch.delenv("SLURM_RESTART_COUNT")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    # Ended: gone at once, with a fresh heartbeat.
    wait_for(job, {"CANCELLED", "COMPLETED"}, timeout_s=60)
    _lease_of_job(tmp_path, job)
    with Lease.acquire(tmp_path, "run1") as lease:
        assert lease.took_over is not None and f"SLURM job {job} ended (CANCELLED)" in lease.took_over_why
    # A job the controller does not know (purged after MinJobAge): gone too.
    _lease_of_job(tmp_path, "999999")
    with Lease.acquire(tmp_path, "run1") as lease:
        assert "no longer knows its job 999999" in lease.took_over_why
    assert socket.gethostname() != "node-b"
