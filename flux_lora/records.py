"""The run folder's records: status.json (the run's state and one entry per attempt), the pointer a sweep
cell leaves when its run lives elsewhere, and how a process is named so that a reused pid is not taken
for its predecessor (pid + start time + boot id).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from flux_lora.checkpoint_files import WriteFailed, fsync_dir

STATUS_FILE = "status.json"
LOG_FILE = "train.log"
POINTER_FILE = "run_pointer.json"  # a sweep cell whose run lives elsewhere (skipped as done, resumed there, busy)
ASIDE_FOLDER = "set-aside"  # output/set-aside/attempt-N: files a dead attempt left that the next one must not mix in


class RunState(str, Enum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    interrupted = "interrupted"
    refused = "refused"
    dry_run = "dry_run"


@dataclass
class RunStatus:
    state: RunState
    exit_code: int | None = None
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None  # over all attempts
    reason: str | None = None
    host: str | None = None
    pid: int | None = None  # the launcher's, while it runs the job
    heartbeat: str | None = None
    # One entry per start of the job: started, ended, duration_s, state, exit_code, from_step, steps_trained,
    # host, pid, command, python, engine, slurm, reason.
    attempts: list[dict] = field(default_factory=list)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: object) -> None:
    # Replaced in one step: a reader deciding whether a run is alive never reads half a file. The data reaches the
    # disk before the rename and the rename before we go on, so a crash leaves the old record or the new one, whole.
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)  # a full disk leaves no half-written temporary beside the record
        raise WriteFailed(path, exc) from None
    fsync_dir(path.parent)


def write_status(run_dir: Path, status: RunStatus) -> None:
    data = asdict(status)
    data["state"] = status.state.value
    write_json_atomic(run_dir / STATUS_FILE, data)


def read_status(run_dir: Path) -> RunStatus | None:
    """The run's status; None when there is none or it cannot be read (a corrupt file is not a state)."""
    try:
        data = json.loads((run_dir / STATUS_FILE).read_text())
        known = {f.name for f in fields(RunStatus)}
        data = {k: v for k, v in data.items() if k in known}
        data["state"] = RunState(data["state"])
        return RunStatus(**data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def total_duration(attempts: list[dict]) -> float | None:
    durations = [a["duration_s"] for a in attempts if a.get("duration_s") is not None]
    return round(sum(durations), 2) if durations else None


def close_dead_attempt(run_dir: Path, why: str) -> RunStatus | None:
    """A `running` status whose owner is gone: end its open attempt as interrupted, saying why. None if not running."""
    status = read_status(run_dir)
    if status is None or status.state != RunState.running:
        return None
    ended = now_iso()
    for attempt in status.attempts:
        if attempt.get("ended") is None:
            attempt.update(ended=ended, state=RunState.interrupted.value, reason=why)
            try:
                began = datetime.fromisoformat(attempt["started"]).timestamp()
                attempt["duration_s"] = round(datetime.fromisoformat(ended).timestamp() - began, 2)
            except (KeyError, TypeError, ValueError):
                pass
    closed = RunStatus(
        state=RunState.interrupted,
        started=status.started,
        ended=ended,
        reason=why,
        host=status.host,
        duration_s=total_duration(status.attempts),
        attempts=status.attempts,
    )
    write_status(run_dir, closed)
    return closed


def write_pointer(cell_dir: Path, state: str, run_dir: Path, run_id: str, note: str = "") -> None:
    """Leave a note in a sweep cell's folder that its run lives in run_dir (the summary follows it)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        cell_dir / POINTER_FILE, {"state": state, "run_dir": str(run_dir), "run_id": run_id, "note": note}
    )


RUN_INDEX_DIR = ".runs"  # paths.outputs/.runs/<run id>.txt: every folder that froze that run id, wherever it lies


def register_run_dir(outputs: Path, run_id: str, run_dir: Path) -> None:
    """Note where a run of this id lives, so a launch into any other folder (a sweep outside paths.outputs) finds it."""
    index = Path(outputs) / RUN_INDEX_DIR / f"{run_id}.txt"
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index, "a", encoding="utf-8") as handle:  # one short appended line: whole or absent
        handle.write(f"{Path(run_dir).absolute()}\n")


def registered_run_dirs(outputs: Path, run_id: str) -> list[Path]:
    try:
        lines = (Path(outputs) / RUN_INDEX_DIR / f"{run_id}.txt").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [Path(line) for line in dict.fromkeys(lines) if line]


# ------------------------------------------------------------------------------------ which process is whose


def pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"): a pid names a process only inside its own namespace
    (a container with host networking shares the host name and boot id, not the pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def boot_id() -> str:
    """Changes at every boot: a pid recorded before a reboot names nobody after it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22); None when it does not exist
    or has exited and waits to be reaped (a zombie holds nothing).

    A pid with a different start time is another process that reused the number.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None if not _pid_exists(pid) else -1
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return -1


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_process_alive(pid: int | None, start_time: int | None) -> bool:
    """Whether the process recorded as (pid, start time) on this host still runs; -1 means "not readable here"."""
    if pid is None:
        return False
    now = process_start_time(pid)
    if now is None:
        return False
    if start_time in (None, -1) or now == -1:
        return True  # cannot tell a reused pid apart without /proc: assume alive rather than train twice
    return now == start_time
