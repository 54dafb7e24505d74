"""A real one-node SLURM for the tests: find it, or start one on this machine.

``slurm_skip_reason()`` answers None when ``sinfo`` shows a usable node. When the Debian
packages (``slurm-wlm``, ``munge``; ``.ci/install-slurm``) are installed but the daemons are not
running, it writes ``/etc/slurm/slurm.conf`` for this host (only when there is none, or when
the one there was written by this module: see ``CONF_MARK``) and starts ``munged``,
``slurmctld`` and ``slurmd``. The daemons keep running after the tests.

Tests take the ``slurm`` fixture (``from tests.slurm_cluster import slurm``), which skips with
the reason when no cluster can be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SLURM_CONF = Path("/etc/slurm/slurm.conf")
CONF_MARK = "# Written by tests/slurm_cluster.py: a one-node test cluster; it may rewrite this file."
STATE_DIR = Path("/var/spool/slurmctld")
SLURMD_SPOOL = Path("/var/spool/slurmd")
LOG_DIR = Path("/var/log/slurm")
MUNGE_RUN_DIR = Path("/run/munge")
START_TIMEOUT_S = 30.0
# Node states in which jobs can run (sinfo %t, short form; a trailing flag such as "*" is cut).
USABLE_STATES = frozenset({"idle", "mix", "alloc", "comp"})
INSTALL_HINT = "apt-get install slurm-wlm munge (or .ci/install-slurm)"

_UNSET = object()
_cached: object = _UNSET


def _run(args: list[str], *, timeout: float = 20.0, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (argument list, never a shell string); a timeout or a missing binary reads as rc 127."""
    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: {exc}")


def _as_root(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return args
    return ["sudo", "-n", *args]


def _start_daemon(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Start a daemon that forks into the background; its output must not hold our pipes open."""
    try:
        proc = subprocess.run(
            _as_root(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=20.0,
            check=False,
        )
        return subprocess.CompletedProcess(args, proc.returncode, "", proc.stderr)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: {exc}")


def _node_states() -> dict[str, str]:
    """Node name -> short state ("idle", "down", ...) from sinfo; empty when sinfo fails."""
    proc = _run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10.0)
    if proc.returncode != 0:
        return {}
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].rstrip("*~#!%$@^-")
    return states


def _usable() -> bool:
    return any(state in USABLE_STATES for state in _node_states().values())


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, ValueError, IndexError):
        return False
    return True


def _munge_ok() -> bool:
    cred = _run(["munge", "-n"], timeout=10.0)
    if cred.returncode != 0:
        return False
    return _run(["unmunge"], timeout=10.0, stdin=cred.stdout).returncode == 0


def _ours_or_absent() -> bool:
    if not SLURM_CONF.exists():
        return True
    try:
        return CONF_MARK in SLURM_CONF.read_text()
    except OSError:
        return False


def render_conf(host: str, node_line: str) -> str:
    """slurm.conf for a one-node cluster on ``host``; ``node_line`` is ``slurmd -C``'s NodeName line."""
    fields: dict[str, str] = {}
    for item in node_line.split():
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    fields["NodeName"] = host
    cpus = max(1, int(fields.get("CPUs", "1")))
    machine_mb = int(fields.get("RealMemory", "1024"))
    # A little under the machine's memory, so that slurmd never reports less than configured.
    real_mb = max(256, machine_mb - max(256, machine_mb // 20))
    fields["RealMemory"] = str(real_mb)
    node = " ".join(f"{key}={value}" for key, value in fields.items())
    lines = [
        CONF_MARK,
        "ClusterName=testcluster",
        f"SlurmctldHost={host}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # Jobs without --mem get a share per CPU, not the whole node, so two run side by side.
        f"DefMemPerCPU={real_mb // cpus}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "ReturnToService=2",
        f"StateSaveLocation={STATE_DIR}",
        f"SlurmdSpoolDir={SLURMD_SPOOL}",
        "SlurmctldPidFile=/run/slurmctld.pid",
        "SlurmdPidFile=/run/slurmd.pid",
        f"SlurmctldLogFile={LOG_DIR}/slurmctld.log",
        f"SlurmdLogFile={LOG_DIR}/slurmd.log",
        f"{node} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]
    return "\n".join(lines)


def _write_conf() -> str | None:
    """Write slurm.conf for this host; a reason string when it cannot."""
    host = _run(["hostname", "-s"], timeout=5.0).stdout.strip()
    probe = _run(["slurmd", "-C"], timeout=10.0)
    node_line = next((ln for ln in probe.stdout.splitlines() if ln.startswith("NodeName=")), "")
    if not host or not node_line:
        return f"cannot describe this node: slurmd -C failed ({probe.stderr.strip()[:200]})"
    text = render_conf(host, node_line)
    if SLURM_CONF.exists() and SLURM_CONF.read_text() == text:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as tmp:
        tmp.write(text)
    try:
        proc = _run(_as_root(["install", "-D", "-m", "644", tmp.name, str(SLURM_CONF)]))
    finally:
        os.unlink(tmp.name)
    if proc.returncode != 0:
        return f"cannot write {SLURM_CONF}: {proc.stderr.strip()[:200]}"
    return None


def _start_cluster() -> str | None:
    """Start munged, slurmctld and slurmd as needed; None once a node is usable."""
    if os.geteuid() != 0 and _run(["sudo", "-n", "true"], timeout=10.0).returncode != 0:
        return "SLURM is installed but not running, and starting it needs root (or sudo -n)"
    if not _ours_or_absent():
        return f"SLURM has no usable node, and {SLURM_CONF} belongs to another cluster: left alone"
    reason = _write_conf()
    if reason:
        return reason
    mkdir = _run(_as_root(["mkdir", "-p", str(STATE_DIR), str(SLURMD_SPOOL), str(LOG_DIR), str(MUNGE_RUN_DIR)]))
    if mkdir.returncode != 0:
        return f"cannot create the spool directories: {mkdir.stderr.strip()[:200]}"
    if not _munge_ok():
        started = _start_daemon(["munged", "--force"])
        if not _munge_ok():
            return f"munged does not authenticate (munge -n | unmunge): {started.stderr.strip()[:200]}"
    if not _pid_alive(Path("/run/slurmctld.pid")):
        started = _start_daemon(["slurmctld"])
        if started.returncode != 0:
            return f"slurmctld did not start: {started.stderr.strip()[:200]}"
    if not _pid_alive(Path("/run/slurmd.pid")):
        started = _start_daemon(["slurmd"])
        if started.returncode != 0:
            return f"slurmd did not start: {started.stderr.strip()[:200]}"
    deadline = time.monotonic() + START_TIMEOUT_S
    resumed = False
    while time.monotonic() < deadline:
        states = _node_states()
        if any(state in USABLE_STATES for state in states.values()):
            return None
        if not resumed and any(state in {"down", "drain", "drng"} for state in states.values()):
            # A node left down by an earlier run of this test cluster: bring it back.
            for name in states:
                _run(_as_root(["scontrol", "update", f"nodename={name}", "state=resume"]), timeout=10.0)
            resumed = True
        time.sleep(1.0)
    return f"SLURM started but no node became idle within {START_TIMEOUT_S:.0f} s: sinfo says {_node_states()}"


def _find_or_start() -> str | None:
    for tool in ("sbatch", "squeue", "sinfo", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} not installed: {INSTALL_HINT}"
    if _usable():
        return None
    if SLURM_CONF.exists() and not _ours_or_absent():
        return f"SLURM is configured ({SLURM_CONF}) but sinfo shows no usable node"
    for tool in ("slurmctld", "slurmd", "munged", "munge", "unmunge"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} not installed: {INSTALL_HINT}"
    return _start_cluster()


def slurm_skip_reason() -> str | None:
    """None when a working SLURM is reachable (started here when need be), else why not, in one line."""
    global _cached
    if _cached is _UNSET:
        _cached = _find_or_start()
    assert _cached is None or isinstance(_cached, str)
    return _cached


@pytest.fixture
def slurm() -> None:
    """Skip the test when no real SLURM can be had on this machine."""
    reason = slurm_skip_reason()
    if reason is not None:
        pytest.skip(reason)


def start_pending_now(job_id: str) -> None:
    """Let a pending job (e.g. a requeued one held with Reason=BeginTime) start at once."""
    proc = _run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], timeout=15.0)
    if proc.returncode != 0:
        raise RuntimeError(f"scontrol update jobid={job_id} starttime=now: {proc.stderr.strip()}")


def _squeue(job_id: str) -> list[tuple[str, str, str]]:
    # -r lists each array task on its own line ("12_0", "12_1"); --states=all keeps jobs that have
    # ended (COMPLETED, FAILED, CANCELLED...) for MinJobAge (300 s by default).
    proc = _run(["squeue", "-h", "-r", "--states=all", "-j", job_id, "-o", "%i %T %r"], timeout=15.0)
    if proc.returncode != 0:
        return []  # "Invalid job id specified": gone from the controller
    rows: list[tuple[str, str, str]] = []
    for line in proc.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            rows.append((parts[0], parts[1], parts[2] if len(parts) == 3 else ""))
    return rows


def job_states(job_id: str) -> dict[str, str]:
    """Job (or array task) id -> state (PENDING, RUNNING, COMPLETED...); {} when unknown."""
    return {jid: state for jid, state, _ in _squeue(job_id)}


def job_reasons(job_id: str) -> dict[str, str]:
    """Job (or array task) id -> squeue's reason (None, Priority, BeginTime...); {} when unknown."""
    return {jid: reason for jid, _, reason in _squeue(job_id)}


def wait_for(job_id: str, states: set[str], timeout_s: float = 120.0) -> dict[str, str]:
    """Poll until every listed task of ``job_id`` is in one of ``states``; the last states seen."""
    deadline = time.monotonic() + timeout_s
    seen = job_states(job_id)
    while time.monotonic() < deadline:
        seen = job_states(job_id)
        if seen and all(state in states for state in seen.values()):
            return seen
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: {seen}")
