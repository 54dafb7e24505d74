"""The training job's guard: it dies with the launcher, and the job goes with it, after a chance to save.

    python -m flux_lora.lifecycle.job_guard [--heartbeat LEASE_FILE --token TOKEN]... <argv of the job...>

The runner starts this (standard library only, so it never slows the start) as a session leader; it
starts the job in its own process group and:
  - adopts the job's descendants (Linux child subreaper), so it exits only when every process of
    the job has exited (accelerate's launcher process dies at once on SIGTERM while the trainer is
    still saving its state);
  - notices the launcher's death (Linux parent-death signal, and the parent pid changing, checked
    once a second), then stops the job as the launcher would: SIGTERM to its group, SIGKILL after
    GRACE_S seconds. So `kill -9` of the launcher leaves no orphan holding a GPU;
  - relays the job's output, and keeps draining it once the launcher is gone (a write into a closed pipe
    would kill the job before it saves);
  - touches the run's lease file (--heartbeat) while the job runs and the lease still carries our token
    (--token), so a run whose launcher died but whose job is still saving reads as held, also from another
    host; once the lease carries another token (the run was taken over), it kills the job at once
    (SIGKILL, nothing more is written) and exits LEASE_LOST_EXIT_CODE. A packed job (launch.pack) names one
    lease per run: the guard keeps those it still holds fresh and kills the job once it holds none (the job
    stops writing for a run taken over by itself);
  - gives the job default SIGINT, SIGTERM and SIGUSR2 handling, even when the launcher was started in the
    background by a shell (which makes it ignore SIGINT), and forwards those signals to every process of
    the job (its group and every descendant: torch elastic starts its workers in sessions of their own):
    a stop always reaches the job, and SLURM's SIGUSR2 never kills the guard itself.
It exits with the job's exit status (a signal as 128 + its number).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

GRACE_S = 120.0  # long enough for a FLUX LoRA state to be written; then the job is killed
HEARTBEAT_S = 30.0  # as the launcher's (lifecycle.lease.HEARTBEAT_S); this module imports nothing of ours
LEASE_CHECK_S = 1.0  # how often the lease's token is read: a job that lost its run stops within this
LEASE_LOST_EXIT_CODE = 75  # EX_TEMPFAIL: the run was taken over; its new owner records it
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # not Linux: the parent-pid poll still notices the launcher's death


def _restore_default_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)


def descendants(root: int) -> list[int]:
    """Every live process below `root` (children, theirs, ...), from /proc; orphans are ours as the subreaper."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_job(pgid: int, signum: int) -> bool:
    """Send `signum` to the job's group and to every descendant of the guard (some start sessions of their own);
    False when none of them is left."""
    reached = False
    try:
        os.killpg(pgid, signum)
        reached = True
    except ProcessLookupError:
        pass
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signum)
            reached = True
        except ProcessLookupError:
            pass
    return reached


def _stop_group(pgid: int) -> None:
    if not signal_job(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        if not descendants(os.getpid()):
            return
        time.sleep(0.5)
    signal_job(pgid, signal.SIGKILL)


def _relay_output(source: int) -> None:
    """Pass the job's output on; once the launcher is gone, keep draining it so the job never writes into a
    closed pipe (it would die of that before saving its state)."""
    sink: int | None = sys.stdout.fileno()
    while chunk := os.read(source, 1 << 16):
        if sink is None:
            continue
        try:
            os.write(sink, chunk)
        except OSError:
            sink = None


def _holds(path: str, token: str | None) -> bool:
    if token is None:
        return True
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle).get("token") == token
    except (OSError, ValueError, AttributeError):
        return False


def _beat(leases: list[tuple[str, str | None]], job: subprocess.Popen, lost: threading.Event) -> None:
    """Keep the leases fresh while they are ours; the moment none is, kill the job: it must not write another byte."""
    last_beat = 0.0
    while job.poll() is None:
        held = [path for path, token in leases if _holds(path, token)]
        if not held:
            lost.set()
            signal_job(job.pid, signal.SIGKILL)
            print(
                f"job_guard: the lease {leases[0][0]} carries another token: the run was taken over; job killed"
                if len(leases) == 1
                else "job_guard: every run's lease carries another token: the runs were taken over; job killed",
                file=sys.stderr,
                flush=True,
            )
            return
        if time.monotonic() - last_beat >= HEARTBEAT_S:
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass
            last_beat = time.monotonic()
        time.sleep(LEASE_CHECK_S)


def main(argv: list[str]) -> int:
    leases: list[tuple[str, str | None]] = []
    while argv[:1] == ["--heartbeat"] and len(argv) >= 2:
        path, token, argv = argv[1], None, argv[2:]
        if argv[:1] == ["--token"] and len(argv) >= 2:
            token, argv = argv[1], argv[2:]
        leases.append((path, token))
    if not argv:
        print(
            "usage: python -m flux_lora.lifecycle.job_guard [--heartbeat LEASE_FILE --token TOKEN]... <job argv...>",
            file=sys.stderr,
        )
        return 2
    launcher = os.getppid()
    # SLURM's warning before the time limit reaches every process of the job: it is for the trainer (which saves
    # and stops; forwarded below), never a reason for the guard to die and orphan the job.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    job = subprocess.Popen(
        argv,
        process_group=0,
        preexec_fn=_restore_default_stop_signals,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    relay = threading.Thread(target=_relay_output, args=(job.stdout.fileno(),), daemon=True)
    relay.start()
    stopping = threading.Event()

    def launcher_gone(_signum: int = 0, _frame: FrameType | None = None) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=_stop_group, args=(job.pid,), daemon=True).start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        signal_job(job.pid, signum)

    signal.signal(signal.SIGHUP, launcher_gone)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGHUP)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, forward)

    def watch_parent() -> None:
        while job.poll() is None:
            if os.getppid() != launcher:
                launcher_gone()
                return
            time.sleep(1.0)

    threading.Thread(target=watch_parent, daemon=True).start()
    lost = threading.Event()
    if leases:
        threading.Thread(target=_beat, args=(leases, job, lost), daemon=True).start()
    code = job.wait()
    # Wait for every adopted descendant too: the job is over only when all of its processes are.
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    relay.join(timeout=5)  # the last lines of the last process
    if lost.is_set():
        return LEASE_LOST_EXIT_CODE
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
