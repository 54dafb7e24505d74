"""One owner per run id: a lease file under `paths.outputs/.leases/<run id>.json`.

Taken before the skip/resume/start decision and held until the run's final status is written
(including the guard's save window after a launcher dies: the guard is named in the lease too).

The primitive is an exclusively created file (open with O_CREAT|O_EXCL): atomic on a local
filesystem and on NFSv3 and later (open(2)), the usual shared `paths.outputs` of a cluster, unlike
flock, which NFS emulates with byte-range locks and a dead client holds until the server's grace
period ends. The lease records host, boot id, pid and process start time of the launcher (and of
the job's guard once it starts); its modification time is the heartbeat, refreshed by the
launcher and the guard. It is taken over only when its owner is provably gone:
  - same host and boot: neither recorded process exists with its recorded start time (a reused pid is
    another process, so it does not hold the lease);
  - another host: the heartbeat is older than STALE_HEARTBEAT_S (a silent node is taken for dead;
    the limit is twenty heartbeats, far above clock skew and NFS attribute caching).
A takeover is serialised by a second exclusively created file (`<run id>.takeover`) and re-reads
the lease inside it, so two launches that both saw a dead owner cannot both take the run.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from flux_lora.lifecycle.records import boot_id, now_iso, process_start_time, same_process_alive, write_json_atomic

LEASE_DIR = ".leases"
HEARTBEAT_S = 30.0
STALE_HEARTBEAT_S = 600.0
# A takeover lasts milliseconds; a takeover file older than this was left by a launcher that died inside one.
STALE_TAKEOVER_S = 60.0


@dataclass(frozen=True)
class LeaseHolder:
    run_id: str
    token: str
    host: str
    boot_id: str
    pid: int
    pid_start: Optional[int]
    since: str
    run_dir: Optional[str] = None
    guard_pid: Optional[int] = None
    guard_start: Optional[int] = None
    slurm_job: Optional[str] = None
    heartbeat: float = 0.0  # the lease file's modification time, not stored in it

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        where = f" in {self.run_dir}" if self.run_dir else ""
        return f"pid {self.pid} on {self.host}{job} since {self.since} (heartbeat {age:.0f} s ago){where}"

    def gone(self, now: Optional[float] = None) -> bool:
        """Provably gone: this host and boot, and no recorded process lives on; elsewhere, a stale heartbeat."""
        if self.host == socket.gethostname() and self.boot_id == boot_id():
            return not (same_process_alive(self.pid, self.pid_start) or same_process_alive(self.guard_pid, self.guard_start))
        return (now or time.time()) - self.heartbeat > STALE_HEARTBEAT_S


class LeaseHeld(RuntimeError):
    def __init__(self, holder: LeaseHolder) -> None:
        self.holder = holder
        super().__init__(f"run {holder.run_id} is held by {holder.describe()}")


def lease_path(outputs: Path, run_id: str) -> Path:
    return Path(outputs) / LEASE_DIR / f"{run_id}.json"


def read_holder(path: Path) -> Optional[LeaseHolder]:
    """The lease's holder; None when there is no lease. An unreadable lease (being written) reads as a fresh one."""
    try:
        heartbeat = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return LeaseHolder(**{**data, "heartbeat": heartbeat})
    except (ValueError, TypeError):
        # Created but not yet filled (the creator writes right after O_EXCL): alive by its fresh mtime.
        return LeaseHolder(run_id=path.stem, token="", host="?", boot_id="", pid=-1, pid_start=None,
                           since="just now", heartbeat=heartbeat)  # fmt: skip


def _slurm_job() -> Optional[str]:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return job or os.environ.get("SLURM_JOB_ID")


class Lease:
    """A held lease. Use `Lease.acquire(...)`; release it (or leave the `with` block) after the final status."""

    def __init__(self, path: Path, holder: LeaseHolder, took_over: Optional[LeaseHolder]) -> None:
        self.path = path
        self.holder = holder
        self.took_over = took_over  # the dead owner this launch replaced, if any

    @classmethod
    def acquire(cls, outputs: Path, run_id: str, run_dir: Optional[Path] = None) -> "Lease":
        """Take the lease of run_id, or raise LeaseHeld naming its live holder."""
        path = lease_path(outputs, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        holder = LeaseHolder(run_id=run_id, token=uuid.uuid4().hex, host=socket.gethostname(), boot_id=boot_id(), pid=pid,
                             pid_start=process_start_time(pid), since=now_iso(), run_dir=str(run_dir) if run_dir else None,
                             slurm_job=_slurm_job())  # fmt: skip
        if _create(path, holder):
            return cls(path, holder, None)
        current = read_holder(path)
        if current is None:  # released between our two looks: try once more
            if _create(path, holder):
                return cls(path, holder, None)
            current = read_holder(path)
        if current is None or not current.gone():
            raise LeaseHeld(current or holder)
        return cls(path, holder, _take_over(path, current, holder))

    def update(self, **changes: object) -> None:
        """Record more about the holder (the guard's pid, the run folder); refreshes the heartbeat too."""
        fields = {k: v for k, v in asdict(self.holder).items() if k != "heartbeat"}
        fields.update(changes)
        self.holder = LeaseHolder(**fields)
        write_json_atomic(self.path, fields)

    def beat(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create(path: Path, holder: LeaseHolder) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        data = {k: v for k, v in asdict(holder).items() if k != "heartbeat"}
        handle.write(json.dumps(data, indent=2) + "\n")
    return True


def _take_over(path: Path, dead: LeaseHolder, holder: LeaseHolder) -> LeaseHolder:
    """Replace a dead holder's lease with ours, one taker at a time; raise LeaseHeld if someone else got there first."""
    mutex = path.with_suffix(".takeover")
    _clear_stale_takeover(mutex)
    try:
        fd = os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise LeaseHeld(read_holder(path) or dead) from None
    try:
        os.write(fd, f"{holder.host} {holder.pid}\n".encode())
        os.close(fd)
        current = read_holder(path)
        if current is not None and current.token != dead.token:
            raise LeaseHeld(current)  # another launch took it over and holds it now
        path.unlink(missing_ok=True)
        if not _create(path, holder):
            raise LeaseHeld(read_holder(path) or dead)
        return dead
    finally:
        mutex.unlink(missing_ok=True)


def _clear_stale_takeover(mutex: Path) -> None:
    try:
        age = time.time() - mutex.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_TAKEOVER_S:
        aside = mutex.with_name(f"{mutex.name}.{uuid.uuid4().hex}")
        try:
            os.rename(mutex, aside)  # only one remover wins the rename
            aside.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

