"""A real two-node SLURM on this one machine, for tests that need "another node".

Shape (see /work/shared/reference/slurm-two-node.md): its own config ``WORK/etc/slurm.conf`` (ClusterName
``CLUSTER_NAME``, ports ``CTLD_PORT``/``SLURMD_PORT``), its own munged (own key and socket, named with
``AuthInfo=socket=...``), slurmctld on the host listening on a bridge (``HOST_ADDR``), and two nodes ``node1`` and
``node2``, each a network namespace joined to the bridge by a veth pair plus, inside it, fresh uts/mount/pid
namespaces with a small PID 1 that sets the hostname, binds a hosts file over /etc/hosts, starts ``slurmd -D`` and
reaps orphans. The mount namespaces are copies of the host's, so both nodes see the same files.

It runs beside the one-node cluster of ``tests/slurm_cluster.py`` without touching it: clients reach this cluster
only with ``SLURM_CONF`` set, as in ``TwoNodeCluster.env()``; jobs inherit it (sbatch exports the environment), so
``squeue``/``scontrol`` inside a job talk to this cluster too. Only root can build it (namespaces, bridge).

Tests take the session fixture ``two_node_slurm`` (``from tests.slurm_two_node import two_node_slurm``), which skips
with the reason when the cluster cannot be had, and tears everything down at the end of the session.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import pytest

WORK = Path("/tmp/flux-lora-two-node")
LOCK_FILE = Path("/tmp/flux-lora-two-node.lock")  # held by the session that owns the cluster
CLUSTER_NAME = "fluxtwonode"
CTLD_PORT = 7817
SLURMD_PORT = 7818
SUBNET = "10.199.0"
HOST_ADDR = f"{SUBNET}.1"
NODES: tuple[str, str] = ("node1", "node2")
NODE_ADDRS = {"node1": f"{SUBNET}.11", "node2": f"{SUBNET}.12"}
BRIDGE = "fl2n-br"
NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "fl2n-"  # network namespace fl2n-node1, host side of its veth pair fl2nv-node1
VETH_PREFIX = "fl2nv-"
NODE_MEMORY_MB = 16000
START_TIMEOUT_S = 30.0
INSTALL_HINT = "apt-get install slurm-wlm munge (or .ci/install-slurm)"

# PID 1 of a node: hostname, hosts file, slurmd in the foreground, then reap every orphan until killed.
# Signals from outside reach a namespace's PID 1 only where it set a handler (SIGKILL excepted): none is set.
_PID1 = """
import os, signal, socket, subprocess, sys, time
node, hosts, out, *slurmd = sys.argv[1:]
signal.signal(signal.SIGINT, signal.SIG_DFL)
socket.sethostname(node)
subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
with open(out, "ab", buffering=0) as log:
    child = subprocess.Popen(slurmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1.0)
"""


def _run(
    args: list[str], *, timeout: float = 20.0, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (argument list, never a shell string); a timeout or a missing binary reads as rc 127."""
    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: {exc}")


def _must(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = _run(args, **kwargs)  # type: ignore[arg-type]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: rc {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:300]}")
    return proc


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _ns_link(pid: int, ns: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{ns}")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> None:
    pids = [pid for pid in pids if pid != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _ancestors() -> set[int]:
    seen: set[int] = set()
    pid: int | None = os.getpid()
    while pid and pid not in seen:
        seen.add(pid)
        pid = _ppid(pid)
    return seen


class TwoNodeCluster:
    """A two-node SLURM (node1, node2) on this machine; ``start()`` builds it, ``stop()`` removes every trace."""

    def __init__(self, work: Path = WORK) -> None:
        self.work = work
        self.nodes: tuple[str, str] = NODES
        self.conf = work / "etc" / "slurm.conf"
        self.munge_socket = work / "munge" / "munge.socket"
        self._pid1: dict[str, int] = {}  # node -> host pid of its PID 1
        self._unshare: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: IO[str] | None = None
        self._made_netns_dir = False  # /run/netns was made by `ip netns add` here: remove it again when empty

    # ----- clients -----------------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF: sbatch/squeue/scontrol (submitit, and the jobs) then use this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, args: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """A client command against this cluster (rc 127 on a timeout or a missing binary)."""
        return _run(args, timeout=timeout, env=self.env())

    def node_states(self) -> dict[str, str]:
        """Node -> short state from sinfo ("idle", "alloc", "down", ...; a trailing flag such as "*" cut)."""
        proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10)
        states: dict[str, str] = {}
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1].rstrip("*~#!%$@^-")
        return states

    def wait_idle(self, timeout: float = 30, nodes: Iterable[str] | None = None) -> None:
        """Wait until the nodes (all by default) read idle in sinfo; TimeoutError naming what they read."""
        wanted = tuple(nodes) if nodes is not None else self.nodes
        deadline = time.monotonic() + timeout
        states = self.node_states()
        while not all(states.get(node) == "idle" for node in wanted):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {list(wanted)} not idle after {timeout:.0f} s: sinfo says {states}")
            time.sleep(0.2)
            states = self.node_states()

    def job_state(self, job_id: str) -> tuple[str, str] | None:
        """(state, reason) from squeue, e.g. ("PENDING", "BeginTime"); None once the controller forgot the job."""
        proc = self.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T|%r"], timeout=10)
        line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
        state, sep, reason = line.partition("|")
        return (state, reason) if sep else None

    def wait_job(self, job_id: str, states: Iterable[str], timeout: float = 30) -> tuple[str, str]:
        """Poll until the job is in one of ``states``; its (state, reason), or TimeoutError."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        seen = self.job_state(job_id)
        while seen is None or seen[0] not in wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s: {seen}")
            time.sleep(0.2)
            seen = self.job_state(job_id)
        return seen

    def node_of(self, job_id: str) -> str | None:
        """The node the job runs on (squeue %N), or None unless it is RUNNING (or SUSPENDED, still on its node)."""
        proc = self.run(["squeue", "-h", "-j", job_id, "-o", "%T|%N"], timeout=10)
        state, _, node = proc.stdout.strip().partition("|") if proc.returncode == 0 else ("", "", "")
        return node.strip() or None if state in {"RUNNING", "SUSPENDED"} else None

    def start_pending_now(self, job_id: str) -> None:
        """Let a pending job (a requeued one is held ~2 min with Reason=BeginTime) start at once."""
        proc = self.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], timeout=15)
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol update jobid={job_id} starttime=now: {proc.stderr.strip()}")

    # ----- processes of a node -----------------------------------------------------------------------------------

    def node_pids(self, node: str) -> list[int]:
        """Host pids of the processes in the node's pid namespace (its PID 1, slurmd, slurmstepd, job processes)."""
        pid1 = self._pid1.get(node)
        link = _ns_link(pid1, "pid") if pid1 else None
        if link is None or link == _ns_link(os.getpid(), "pid"):
            return []
        return sorted(pid for pid in _pids() if _ns_link(pid, "pid") == link and _alive(pid))

    def job_pids(self, job_id: str) -> list[int]:
        """Host pids of the job's processes on its node: those whose environment has SLURM_JOB_ID=<job_id>."""
        node = self.node_of(job_id)
        marker = f"SLURM_JOB_ID={job_id}".encode()
        found: list[int] = []
        for pid in self.node_pids(node) if node else []:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                found.append(pid)
        return found

    # ----- faults ------------------------------------------------------------------------------------------------

    def power_cut(self, node: str, mark_down: bool = True) -> None:
        """SIGKILL the node's PID 1 (the kernel kills slurmd and every job process of the node at once), wait until
        they are gone, then mark the node down, so that SLURM requeues its batch jobs at once. With
        ``mark_down=False`` SLURM finds out itself: "not responding" after ~SlurmdTimeout (30 s), then DOWN."""
        self._kill_node(node)
        if not mark_down:
            return
        proc = self.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=test"], timeout=15)
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol update nodename={node} state=down: {proc.stderr.strip()}")

    def restart_node(self, node: str, timeout: float = 30) -> None:
        """Boot the node again (fresh uts/mount/pid namespaces, same network namespace) and wait until it is idle."""
        if node in self._pid1:
            self._kill_node(node)
        self._start_node(node)
        self.wait_idle(timeout, nodes=[node])

    # ----- bring-up and tear-down --------------------------------------------------------------------------------

    def start(self) -> None:
        """Build the cluster from nothing (a clean state directory) and wait until both nodes are idle."""
        if self._lock is None:
            LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
            lock = open(LOCK_FILE, "w")  # noqa: SIM115 - held for the cluster's life
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise RuntimeError(f"another test session holds the two-node cluster ({LOCK_FILE})") from None
            self._lock = lock
        self._clear()
        for sub in ("etc", "state", "log", "run", "munge", *(f"spool/{node}" for node in self.nodes)):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)
        self._start_munged()
        self._made_netns_dir = self._made_netns_dir or not NETNS_DIR.exists()
        self._build_network()
        self._write_files()
        env = self.env()
        started = _run(["slurmctld", "-f", str(self.conf)], env=env)
        if started.returncode != 0:
            raise RuntimeError(f"slurmctld did not start: {started.stderr.strip()[:300]}")
        for node in self.nodes:
            self._start_node(node)
        try:
            self.wait_idle(START_TIMEOUT_S)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; logs in {self.work / 'log'}") from None

    def stop(self, keep_logs: bool = False) -> None:
        """Tear everything down: node namespaces, slurmctld, munged, veths, bridge, network namespaces, the work dir
        (``keep_logs``: all but WORK/log, for a bring-up that failed). The one-node cluster is not touched."""
        for node in list(self._pid1):
            self._kill_node(node)
        self._clear(keep_logs)
        if self._made_netns_dir and NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()):
            _run(["umount", str(NETNS_DIR)], timeout=10)
            try:
                NETNS_DIR.rmdir()
            except OSError:
                pass
            self._made_netns_dir = False
        if self._lock is not None:
            LOCK_FILE.unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def _clear(self, keep_logs: bool = False) -> None:
        """Remove whatever this cluster (or a crashed session before it) left: processes, network, files."""
        spared = _ancestors()
        netns_links = {f"net:[{os.stat(path).st_ino}]" for path in self._netns_paths() if path.exists()}
        # SIGKILL for all (the state is thrown away): node PID 1s (that kills every process of the node), slurmctld,
        # munged, and anything else started with our paths or in our network namespaces.
        strays = [
            pid
            for pid in _pids()
            if pid not in spared and (str(self.work) in _cmdline(pid) or _ns_link(pid, "net") in netns_links)
        ]
        strays += [pid for pid in _pids() if _ppid(pid) in strays and pid not in strays]  # slurmctld's slurmscriptd
        _kill_and_wait(strays)
        for proc in self._unshare.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._unshare.clear()
        self._pid1.clear()
        for node in self.nodes:
            _run(["ip", "link", "del", VETH_PREFIX + node], timeout=10)
            _run(["ip", "netns", "del", NETNS_PREFIX + node], timeout=10)
        _run(["ip", "link", "del", BRIDGE], timeout=10)
        if not keep_logs:
            shutil.rmtree(self.work, ignore_errors=True)
            return
        for entry in self.work.iterdir() if self.work.is_dir() else []:
            if entry.name != "log":
                shutil.rmtree(entry, ignore_errors=True)

    def _netns_paths(self) -> list[Path]:
        return [NETNS_DIR / (NETNS_PREFIX + node) for node in self.nodes]

    def _start_munged(self) -> None:
        key = self.work / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        os.chmod(key.parent, 0o755)
        sock = str(self.munge_socket)
        started = _run(
            [
                "munged",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={self.work / 'run' / 'munged.pid'}",
                f"--log-file={self.work / 'log' / 'munged.log'}",
                f"--seed-file={self.work / 'munge' / 'munged.seed'}",
            ]
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            cred = _run(["munge", "-n", f"--socket={sock}"], timeout=5)
            if (
                cred.returncode == 0
                and _run(["unmunge", f"--socket={sock}"], timeout=5, stdin=cred.stdout).returncode == 0
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"munged ({sock}) does not authenticate: {started.stderr.strip()[:300]}")

    def _build_network(self) -> None:
        _must(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _must(["ip", "addr", "add", f"{HOST_ADDR}/24", "dev", BRIDGE])
        _must(["ip", "link", "set", BRIDGE, "up"])
        for node in self.nodes:
            netns, veth = NETNS_PREFIX + node, VETH_PREFIX + node
            _must(["ip", "netns", "add", netns])
            _must(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
            _must(["ip", "link", "set", veth, "master", BRIDGE, "up"])
            inside = ["nsenter", f"--net={NETNS_DIR / netns}", "ip"]
            _must([*inside, "addr", "add", f"{NODE_ADDRS[node]}/24", "dev", "eth0"])
            _must([*inside, "link", "set", "eth0", "up"])
            _must([*inside, "link", "set", "lo", "up"])

    def _write_files(self) -> None:
        host = socket.gethostname().split(".")[0]
        hosts = ["127.0.0.1 localhost", f"{HOST_ADDR} {host}", *(f"{NODE_ADDRS[n]} {n}" for n in self.nodes), ""]
        (self.work / "etc" / "hosts").write_text("\n".join(hosts))
        cpus = os.cpu_count() or 1
        try:
            machine_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError):
            machine_mb = NODE_MEMORY_MB
        real_mb = max(1024, min(NODE_MEMORY_MB, machine_mb * 9 // 10))  # slurmd must not see less than this
        w = self.work
        lines = [
            "# Written by tests/slurm_two_node.py: a two-node test cluster in network namespaces; removed at the end.",
            f"ClusterName={CLUSTER_NAME}",
            f"SlurmctldHost={host}({HOST_ADDR})",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            # A submitted batch job starts within ~1 s, not the default ~3 s (the first one after bring-up: ~3 s).
            "SchedulerParameters=batch_sched_delay=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            # Jobs without --mem get a share per CPU, not the whole node.
            f"DefMemPerCPU={max(256, real_mb // (2 * cpus))}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ReturnToService=2",
            "SlurmdTimeout=30",
            "JobRequeue=1",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool' / '%n'}",
            f"SlurmctldPidFile={w / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={w / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'log' / 'slurmd-%n.log'}",
            *(
                f"NodeName={n} NodeHostname={n} NodeAddr={NODE_ADDRS[n]} CPUs={cpus} RealMemory={real_mb} State=UNKNOWN"
                for n in self.nodes
            ),
            f"PartitionName=two Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
        self.conf.write_text("\n".join(lines))

    def _start_node(self, node: str) -> None:
        """A fresh PID 1 (uts/mount/pid namespaces) in the node's network namespace, slurmd inside it."""
        log = self.work / "log"
        args = [
            "nsenter",
            f"--net={NETNS_DIR / (NETNS_PREFIX + node)}",
            "unshare",
            "--uts",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            sys.executable,
            "-I",
            "-S",
            "-c",
            _PID1,
            node,
            str(self.work / "etc" / "hosts"),
            str(log / f"{node}.out"),
            "slurmd",
            "-D",
            "-f",
            str(self.conf),
            "-N",
            node,
        ]
        with open(log / f"{node}.unshare.err", "ab") as err:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=self.env(),
                start_new_session=True,
            )
        self._unshare[node] = proc
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            child = next((pid for pid in _pids() if _ppid(pid) == proc.pid), None)
            if child is not None and _ns_link(child, "pid") != _ns_link(proc.pid, "pid"):
                self._pid1[node] = child
                return
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{node} did not start (unshare rc {proc.poll()}); see {log / f'{node}.unshare.err'}")

    def _kill_node(self, node: str) -> None:
        pid1 = self._pid1.pop(node, None)
        if pid1 is not None:
            link = _ns_link(pid1, "pid")
            _kill_and_wait([pid1])
            deadline = time.monotonic() + 10.0
            while link and any(_ns_link(pid, "pid") == link for pid in _pids()) and time.monotonic() < deadline:
                time.sleep(0.05)
        proc = self._unshare.pop(node, None)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _missing_tool() -> str | None:
    for tool in ("sbatch", "squeue", "sinfo", "scontrol", "munge", "unmunge", "nsenter", "unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed: {INSTALL_HINT}"
    for tool in ("slurmctld", "slurmd", "munged"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} not installed: {INSTALL_HINT}"
    return None


_UNSET = object()
_cached: object = _UNSET
_cluster: TwoNodeCluster | None = None


def two_node_skip_reason() -> str | None:
    """None once the two-node cluster is up (started here, once per process), else why not, in one line."""
    global _cached, _cluster
    if _cached is _UNSET:
        reason = _missing_tool()
        if reason is None and os.geteuid() != 0:
            reason = "the two-node SLURM needs root (network namespaces, a bridge)"
        if reason is None:
            cluster = TwoNodeCluster()
            try:
                cluster.start()
                _cluster = cluster
            except (RuntimeError, OSError, TimeoutError) as exc:
                cluster.stop(keep_logs=True)
                reason = " ".join(f"two-node SLURM did not start: {exc}".split())
        _cached = reason
    assert _cached is None or isinstance(_cached, str)
    return _cached


@pytest.fixture(scope="session")
def two_node_slurm() -> Iterator[TwoNodeCluster]:
    """The two-node cluster, up for the whole session (skips with the reason when it cannot be had)."""
    global _cached, _cluster
    reason = two_node_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    assert _cluster is not None
    try:
        yield _cluster
    finally:
        if _cluster is not None:
            _cluster.stop()
        _cluster, _cached = None, _UNSET
