"""One owner per run id: a lease file under `paths.outputs/.leases/<run id>.json`.

Taken before the skip/resume/start decision and held until the run's final status is written
(including the guard's save window after a launcher dies: the guard is named in the lease too).

The primitive is an exclusively created file (open with O_CREAT|O_EXCL): atomic on a local
filesystem and on NFSv3 and later (open(2)), the usual shared `paths.outputs` of a cluster, unlike
flock, which NFS emulates with byte-range locks and a dead client holds until the server's grace
period ends. The lease records host, boot id, pid namespace, pid and process start time of the
launcher (and of the job's guard once it starts), and the SLURM job, array task and restart count
it runs in; its modification time is the heartbeat. Whether its holder is gone is decided by whoever
can know it (`judge_holder`):
  - same host, boot and pid namespace: the recorded processes (a reused pid is another process);
  - a SLURM job: SLURM. The same job started again (a higher restart count) takes over at once; a job
    SLURM no longer runs is gone at once; a job RUNNING, SUSPENDED or COMPLETING holds, however old its
    heartbeat (a stopped process is not a dead one), and one requeued and waiting comes back by itself;
  - anything else (another host or namespace, no SLURM, or SLURM cannot be asked): the heartbeat, taken
    for dead past `stale_after_s` (launch.lease_stale_s), far above clock skew and NFS attribute caching.
A takeover is serialised by a second exclusively created file (`<run id>.takeover`) and re-reads
the lease inside it, so two launches that both saw a dead owner cannot both take the run. An owner
that lost its lease all the same (a silent holder taken for dead, then back) finds another token in
the file: it stops writing (`Lease.holds`, `still_holds`), and its heartbeat and release leave the
new owner's lease alone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from flux_lora.lifecycle.job_guard import GRACE_S
from flux_lora.lifecycle.slurm import (
    ALIVE_STATES,
    COMING_BACK_STATES,
    NOT_IN_QUEUE,
    queue_id,
    queue_state,
    restart_count,
)
from flux_lora.records import boot_id, now_iso, pid_namespace, process_start_time, same_process_alive, write_json_atomic

LEASE_DIR = ".leases"
HEARTBEAT_S = 30.0
STALE_HEARTBEAT_S = 600.0  # launch.lease_stale_s's default
# A takeover lasts milliseconds; a takeover file older than this was left by a launcher that died inside one.
STALE_TAKEOVER_S = 60.0
# The job's owner passes its lease to the job in these, so the trainer checks it before it writes.
LEASE_FILE_ENV = "FLUX_LORA_LEASE_FILE"
LEASE_TOKEN_ENV = "FLUX_LORA_LEASE_TOKEN"
LEASES_ENV = "FLUX_LORA_LEASES"  # a packed job: {run dir: [lease file, token]} for each of its runs


@dataclass(frozen=True)
class LeaseHolder:
    run_id: str
    token: str
    host: str
    boot_id: str
    pid: int
    pid_start: int | None
    since: str
    run_dir: str | None = None
    guard_pid: int | None = None
    guard_start: int | None = None
    slurm_job: str | None = None  # squeue's name of the job: <array job>_<task> or the job id
    slurm_restart: int | None = None
    pid_ns: str | None = None
    heartbeat: float = 0.0  # the lease file's modification time, not stored in it

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        job = f", SLURM job {self.slurm_job} (restart {self.slurm_restart or 0})" if self.slurm_job else ""
        where = f" in {self.run_dir}" if self.run_dir else ""
        return f"pid {self.pid} on {self.host}{job} since {self.since} (heartbeat {age:.0f} s ago){where}"

    def on_this_machine(self) -> bool:
        """Its pids name processes here: the same host, boot and pid namespace."""
        same_ns = (
            self.pid_ns is None or self.pid_ns == pid_namespace()
        )  # leases written before namespaces were recorded
        return self.host == socket.gethostname() and self.boot_id == boot_id() and same_ns

    def gone(self, now: float | None = None, stale_after_s: float = STALE_HEARTBEAT_S) -> bool:
        return judge_holder(self, stale_after_s, now).gone


@dataclass(frozen=True)
class Verdict:
    gone: bool
    why: str  # what decided, in words: "SLURM job 5 is SUSPENDED: ..." / "its processes on this host are gone"
    dying_guard: int | None = None  # on this machine: the guard still saving after its launcher died


def judge_holder(holder: LeaseHolder, stale_after_s: float = STALE_HEARTBEAT_S, now: float | None = None) -> Verdict:
    """Whether the lease's holder is gone, decided by whoever can know: this machine's process table, SLURM, or
    (for holders neither can speak for) the heartbeat."""
    if holder.on_this_machine():
        launcher = same_process_alive(holder.pid, holder.pid_start)
        guard = same_process_alive(holder.guard_pid, holder.guard_start)
        if launcher:
            return Verdict(False, f"its launcher, pid {holder.pid}, runs on this host")
        if guard:
            return Verdict(
                False,
                f"its launcher (pid {holder.pid}) is gone and the job's guard, pid {holder.guard_pid}, "
                f"is stopping the job (saving a state), for at most {GRACE_S:.0f} s",
                holder.guard_pid,
            )
        return Verdict(True, "its processes on this host are gone")
    if holder.slurm_job:
        mine = queue_id()
        if mine == holder.slurm_job and restart_count() > (holder.slurm_restart or 0):
            return Verdict(
                True, f"SLURM started its job {mine} again (restart {restart_count()}): this is its successor"
            )
        state = queue_state(holder.slurm_job)
        if state == NOT_IN_QUEUE:
            return Verdict(True, f"SLURM no longer knows its job {holder.slurm_job}")
        if state in ALIVE_STATES:
            return Verdict(
                False,
                f"SLURM job {holder.slurm_job} is {state}: it holds the run however long it is silent; "
                f"wait for it to end (squeue -j {holder.slurm_job}) or cancel it (scancel {holder.slurm_job})",
            )
        if state in COMING_BACK_STATES:
            return Verdict(
                False,
                f"SLURM job {holder.slurm_job} is {state}: requeued, it resumes the run itself when it starts "
                f"again; cancel it (scancel {holder.slurm_job}) to take the run here",
            )
        if state is not None:
            return Verdict(True, f"SLURM job {holder.slurm_job} ended ({state})")
        # SLURM cannot be asked from here: the heartbeat decides.
    age = (now or time.time()) - holder.heartbeat
    if age > stale_after_s:
        return Verdict(True, f"its heartbeat is {age:.0f} s old (launch.lease_stale_s={stale_after_s:g})")
    until = datetime.fromtimestamp(holder.heartbeat + stale_after_s).strftime("%H:%M:%S")
    return Verdict(
        False,
        f"its heartbeat is {age:.0f} s old: taken for dead at {until} if it stays silent "
        f"(launch.lease_stale_s={stale_after_s:g})",
    )


class LeaseHeld(RuntimeError):
    def __init__(self, holder: LeaseHolder, why: str = "") -> None:
        self.holder = holder
        self.why = why
        super().__init__(f"run {holder.run_id} is held by {holder.describe()}" + (f"; {why}" if why else ""))


class LeaseLost(RuntimeError):
    """This owner's lease now carries another token: someone took the run over; nothing more may be written."""

    def __init__(self, run_id: str, holder: LeaseHolder | None) -> None:
        self.holder = holder
        to = holder.describe() if holder and holder.token else "nobody (the lease file is gone)"
        super().__init__(f"run {run_id}: lost the lease to {to}; stopped without writing")


def lease_path(outputs: Path, run_id: str) -> Path:
    return Path(outputs) / LEASE_DIR / f"{run_id}.json"


def read_holder(path: Path) -> LeaseHolder | None:
    """The lease's holder; None when there is no lease. An unreadable lease (being written) reads as a fresh one."""
    try:
        heartbeat = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        known = set(LeaseHolder.__dataclass_fields__) - {"heartbeat"}
        return LeaseHolder(**{k: v for k, v in data.items() if k in known}, heartbeat=heartbeat)
    except (ValueError, TypeError):
        # Created but not yet filled (the creator writes right after O_EXCL): alive by its fresh mtime.
        return LeaseHolder(
            run_id=path.stem,
            token="",
            host="?",
            boot_id="",
            pid=-1,
            pid_start=None,
            since="just now",
            heartbeat=heartbeat,
        )


def still_holds(path: Path, token: str) -> bool:
    """Whether the lease file still carries `token` (standard library only: the trainer asks before it writes)."""
    try:
        return json.loads(Path(path).read_text()).get("token") == token
    except (OSError, ValueError, AttributeError):
        return False


class Lease:
    """A held lease. Use `Lease.acquire(...)`; release it (or leave the `with` block) after the final status."""

    def __init__(self, path: Path, holder: LeaseHolder, took_over: LeaseHolder | None, why: str = "") -> None:
        self.path = path
        self.holder = holder
        self.took_over = took_over  # the dead owner this launch replaced, if any
        self.took_over_why = why

    @classmethod
    def acquire(
        cls,
        outputs: Path,
        run_id: str,
        run_dir: Path | None = None,
        stale_after_s: float = STALE_HEARTBEAT_S,
        say: Callable[[str], None] | None = None,
    ) -> Lease:
        """Take the lease of run_id, or raise LeaseHeld naming its live holder and what it waits for. A holder on this
        machine whose launcher died while its guard still saves is waited for (at most the guard's grace time),
        with a line through `say`; without `say` it is refused like any live holder."""
        path = lease_path(outputs, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        holder = LeaseHolder(
            run_id=run_id,
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            boot_id=boot_id(),
            pid=pid,
            pid_start=process_start_time(pid),
            since=now_iso(),
            run_dir=str(run_dir) if run_dir else None,
            slurm_job=queue_id(),
            slurm_restart=restart_count() if queue_id() else None,
            pid_ns=pid_namespace(),
        )
        deadline = time.monotonic() + GRACE_S + 15
        waited_for: int | None = None
        while True:
            if _create(path, holder):
                return cls(path, holder, None)
            current = read_holder(path)
            if current is None:  # released between our two looks: try again
                continue
            verdict = judge_holder(current, stale_after_s)
            if verdict.gone:
                return cls(path, holder, _take_over(path, current, holder), verdict.why)
            if verdict.dying_guard is None or say is None or time.monotonic() > deadline:
                raise LeaseHeld(current, verdict.why)
            if waited_for != verdict.dying_guard:
                waited_for = verdict.dying_guard
                say(f"run {run_id}: {verdict.why}; waiting for it, then going on from what it saved")
            time.sleep(0.5)

    def holds(self) -> bool:
        """Whether the lease file still carries our token (nobody took the run over)."""
        return still_holds(self.path, self.holder.token)

    def check(self) -> None:
        """Raise LeaseLost unless we still hold the lease: call it before every write into the run folder."""
        if not self.holds():
            raise LeaseLost(self.holder.run_id, read_holder(self.path))

    def update(self, **changes: object) -> None:
        """Record more about the holder (the guard's pid, the run folder); refreshes the heartbeat too."""
        self.check()
        fields = {k: v for k, v in asdict(self.holder).items() if k != "heartbeat"}
        fields.update(changes)
        self.holder = LeaseHolder(**fields)
        write_json_atomic(self.path, fields)

    def beat(self) -> bool:
        """Refresh the heartbeat while the lease is ours; False once it is not (it is left alone then)."""
        if not self.holds():
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            return False
        return True

    def job_env(self) -> dict[str, str]:
        """What the job needs to check the lease itself before it writes."""
        return {LEASE_FILE_ENV: str(self.path), LEASE_TOKEN_ENV: self.holder.token}

    def release(self) -> None:
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
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
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _take_over(path: Path, dead: LeaseHolder, holder: LeaseHolder) -> LeaseHolder:
    """Replace a dead holder's lease with ours, one taker at a time; raise LeaseHeld if someone else got there first."""
    mutex = path.with_suffix(".takeover")
    _clear_stale_takeover(mutex)
    try:
        fd = os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise LeaseHeld(read_holder(path) or dead, "another launch is taking it over") from None
    try:
        os.write(fd, f"{holder.host} {holder.pid}\n".encode())
        os.close(fd)
        current = read_holder(path)
        if current is not None and current.token != dead.token:
            raise LeaseHeld(current, "another launch took it over")
        path.unlink(missing_ok=True)
        if not _create(path, holder):
            raise LeaseHeld(read_holder(path) or dead, "another launch took it over")
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
