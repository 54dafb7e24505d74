"""What a job knows about SLURM: which job (array task, restart) it is, and whether another job is still queued.

Read from the environment SLURM gives a job (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID,
SLURM_RESTART_COUNT, the last absent before a first requeue) and from `squeue`, which works without
an accounting daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

JOBS_FILE = "slurm_jobs.json"  # in a SLURM sweep's folder: its job ids and cells (flux_lora.cluster writes it)

QUEUED_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SUSPENDED",
    "RESIZING",
}


def slurm_record() -> dict | None:
    """This attempt's SLURM job, array task and restart count; None outside SLURM."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    return {
        "job_id": env["SLURM_JOB_ID"],
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": restart_count(),
        "queue_id": queue_id(),
    }


def queue_id() -> str | None:
    """How squeue and scontrol name this job: <array job>_<task> for an array task, else the job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times SLURM requeued this job (0 on a first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


# A job in these states has processes on a node (SUSPENDED ones stopped): whoever it is still holds what it held.
ALIVE_STATES = {"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}
# Requeued and waiting to start again: it has no process now, and its next start goes on where it stopped.
COMING_BACK_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
NOT_IN_QUEUE = "NOT_IN_QUEUE"  # squeue answered and does not know the job (purged after MinJobAge)


def job_state(job: str) -> str | None:
    """The job's state in the queue (PENDING, RUNNING, ...); None when squeue does not know it or is absent."""
    state = queue_state(job)
    return None if state == NOT_IN_QUEUE else state


def queue_state(job: str) -> str | None:
    """What SLURM says of a job: its state (ended ones too, until MinJobAge), NOT_IN_QUEUE when the controller
    does not know it, or None when SLURM cannot be asked (no squeue here, the controller does not answer)."""
    if shutil.which("squeue") is None:
        return None
    try:
        done = subprocess.run(
            ["squeue", "-h", "-r", "--states=all", "-j", job, "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == job:
            return parts[1]
    if done.returncode == 0 or "Invalid job id" in done.stderr:
        return NOT_IN_QUEUE
    return None


def queued_elsewhere(attempt: dict) -> str | None:
    """The queue id of the job that requeued this attempt, when it is still queued or running and is not us."""
    slurm = attempt.get("slurm") or {}
    job = slurm.get("queue_id") or slurm.get("job_id")
    if not attempt.get("requeued") or not job or job == queue_id():
        return None
    state = job_state(job)
    return job if state in QUEUED_STATES else None


def sweep_cells_expected(sweep_dir: Path) -> int | None:
    """How many cells a SLURM sweep queued; None for a sweep that was not submitted to SLURM."""
    try:
        return len(json.loads((Path(sweep_dir) / JOBS_FILE).read_text())["cells"])
    except (OSError, ValueError, KeyError):
        return None
