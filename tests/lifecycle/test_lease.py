"""One owner per run id: the lease, with real processes, real pids, kill -9 and concurrent takers."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_lora.lifecycle.lease import STALE_HEARTBEAT_S, Lease, LeaseHeld, LeaseLost, lease_path, read_holder
from flux_lora.records import boot_id, process_start_time

HOLD = (
    "import sys, time; from pathlib import Path; from flux_lora.lifecycle.lease import Lease; "
    "lease = Lease.acquire(Path(sys.argv[1]), 'run1'); print('held', flush=True); time.sleep(120)"
)


def _holding_process(outputs: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(outputs)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def _write_lease(outputs: Path, **fields: object) -> Path:
    path = lease_path(outputs, "run1")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "run_id": "run1",
        "token": "t0",
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "pid": 1,
        "pid_start": None,
        "since": "2026-12-01T00:00:00+00:00",
        **fields,
    }
    path.write_text(json.dumps(record))
    return path


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path: Path) -> None:
    holder = _holding_process(tmp_path)
    try:
        with pytest.raises(LeaseHeld) as held:
            Lease.acquire(tmp_path, "run1")
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(held.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release: the lease file stays behind
        holder.wait()
    assert lease_path(tmp_path, "run1").is_file()
    with Lease.acquire(tmp_path, "run1") as lease:
        assert lease.took_over is not None and lease.took_over.pid == holder.pid
        assert read_holder(lease.path).pid == os.getpid()
    assert not lease_path(tmp_path, "run1").exists()  # released


def test_a_pid_reused_by_an_unrelated_process_does_not_hold_the_lease(tmp_path: Path) -> None:
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        # The lease names this pid with another start time: the process that took the lease is gone and the
        # number now belongs to `sleep` (what a container's PID 1 or a busy node's pid wrap-around looks like).
        _write_lease(tmp_path, pid=unrelated.pid, pid_start=process_start_time(unrelated.pid) - 1)
        with Lease.acquire(tmp_path, "run1") as lease:
            assert lease.took_over is not None and lease.took_over.pid == unrelated.pid
        # The same pid with its own start time is the holder itself: refused.
        _write_lease(tmp_path, pid=unrelated.pid, pid_start=process_start_time(unrelated.pid))
        with pytest.raises(LeaseHeld):
            Lease.acquire(tmp_path, "run1")
    finally:
        unrelated.kill()
        unrelated.wait()


def test_the_guard_holds_the_lease_after_its_launcher_died(tmp_path: Path) -> None:
    guard = subprocess.Popen(["sleep", "60"])  # stands for the job's guard, still saving a state
    try:
        _write_lease(
            tmp_path, pid=2**22 + 11, pid_start=5, guard_pid=guard.pid, guard_start=process_start_time(guard.pid)
        )
        with pytest.raises(LeaseHeld, match=r"pid 4194315"):
            Lease.acquire(tmp_path, "run1")
    finally:
        guard.kill()
        guard.wait()
    with Lease.acquire(tmp_path, "run1") as lease:  # the save ended: the owner is gone
        assert lease.took_over is not None


def test_another_hosts_lease_is_dead_only_when_its_heartbeat_is_stale(tmp_path: Path) -> None:
    path = _write_lease(tmp_path, host="node-elsewhere", boot_id="other", pid=os.getpid())
    with pytest.raises(LeaseHeld, match="node-elsewhere"):
        Lease.acquire(tmp_path, "run1")
    old = time.time() - STALE_HEARTBEAT_S - 5
    os.utime(path, (old, old))
    with Lease.acquire(tmp_path, "run1") as lease:
        assert lease.took_over is not None and lease.took_over.host == "node-elsewhere"


def _race(outputs: str, barrier, results) -> None:
    barrier.wait()
    try:
        lease = Lease.acquire(Path(outputs), "run1")
        results.put(("won", os.getpid()))
        time.sleep(1.0)  # hold it while the others try
        lease.release()
    except LeaseHeld:
        results.put(("held", os.getpid()))


@pytest.mark.parametrize("dead_holder", [False, True], ids=["free", "dead-holder"])
def test_exactly_one_of_many_simultaneous_takers_wins(tmp_path: Path, dead_holder: bool) -> None:
    if dead_holder:
        _write_lease(tmp_path, pid=2**22 + 13, pid_start=7)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(8), context.Queue()
    workers = [context.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    outcomes = [results.get(timeout=5)[0] for _ in workers]
    assert outcomes.count("won") == 1, outcomes


def test_an_exited_owner_not_yet_reaped_holds_nothing(tmp_path: Path) -> None:
    owner = subprocess.Popen(["sleep", "60"])
    started = process_start_time(owner.pid)
    _write_lease(tmp_path, pid=owner.pid, pid_start=started)
    owner.kill()
    deadline = time.monotonic() + 10
    while "zombie" not in Path(f"/proc/{owner.pid}/status").read_text().lower() and time.monotonic() < deadline:
        time.sleep(0.05)  # killed, not waited for: a zombie with its pid and start time still in /proc
    try:
        with Lease.acquire(tmp_path, "run1") as lease:
            assert lease.took_over is not None and lease.took_over.pid == owner.pid
    finally:
        owner.wait()


def test_a_holder_in_another_pid_namespace_is_not_taken_for_dead(tmp_path: Path) -> None:
    """A container with host networking: the same host name and boot id, pids of its own (the holder is pid 1 there).
    Its pid names another process here, so only its heartbeat (or SLURM) can say it is gone."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --pid needs root here")
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        recorded = read_holder(lease_path(tmp_path, "run1"))
        assert recorded is not None and recorded.pid == 1 and recorded.host == socket.gethostname()
        with pytest.raises(LeaseHeld, match="heartbeat is 0 s old"):
            Lease.acquire(tmp_path, "run1")
        time.sleep(1.2)  # silent past a short limit: now the heartbeat rule says it is gone
        with Lease.acquire(tmp_path, "run1", stale_after_s=1.0) as lease:
            assert lease.took_over is not None and lease.took_over.pid == 1
            assert "heartbeat" in lease.took_over_why
    finally:
        holder.kill()
        holder.wait()


def test_a_taken_over_owner_stops_refreshing_and_releasing_the_new_owners_lease(tmp_path: Path) -> None:
    first = Lease.acquire(tmp_path, "run1")
    record = json.loads(first.path.read_text())
    first.path.write_text(json.dumps({**record, "token": "new-owner"}))  # what a takeover leaves
    old = time.time() - 100
    os.utime(first.path, (old, old))
    assert not first.holds() and first.beat() is False
    assert first.path.stat().st_mtime == pytest.approx(old)  # its heartbeat is not ours to refresh
    with pytest.raises(LeaseLost, match="lost the lease"):
        first.update(guard_pid=123)
    first.release()
    assert json.loads(first.path.read_text())["token"] == "new-owner"  # nor to release


def test_a_relaunch_waits_for_a_guard_still_saving_after_its_launcher_died_then_takes_over(tmp_path: Path) -> None:
    guard = subprocess.Popen(["sleep", "3"])  # stands for the job's guard: its launcher was killed, the job saves
    try:
        _write_lease(
            tmp_path, pid=2**22 + 11, pid_start=5, guard_pid=guard.pid, guard_start=process_start_time(guard.pid)
        )
        said: list[str] = []
        began = time.monotonic()
        with Lease.acquire(tmp_path, "run1", say=said.append) as lease:
            assert guard.poll() is not None and time.monotonic() - began > 1  # it waited for the guard to end
            assert lease.took_over is not None and lease.took_over.guard_pid == guard.pid
        assert (
            len(said) == 1
            and f"the job's guard, pid {guard.pid}, is stopping the job" in said[0]
            and "waiting" in said[0]
        )
    finally:
        guard.kill()
        guard.wait()
