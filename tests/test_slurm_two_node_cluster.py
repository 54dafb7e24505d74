"""The two-node test cluster itself (tests/slurm_two_node.py): a requeueable job survives a power cut of its node by
starting again on the other node, and the cut node comes back idle."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_two_node import TwoNodeCluster  # the two_node_slurm fixture is registered in tests/conftest.py

# What the job writes, one line per start: restart count, hostname, pid namespace, its pid there, squeue's answer
# about itself (run inside the node, against this cluster through the inherited SLURM_CONF).
JOB = """#!/bin/sh
{python} -c 'import os, socket; print(os.environ.get("SLURM_RESTART_COUNT", "0"), socket.gethostname(), \
os.readlink("/proc/self/ns/pid"), os.getpid(), end=" ")' >> {out}
squeue -h -j "$SLURM_JOB_ID" -o %T >> {out} 2>&1
exec sleep 300
"""


def starts(out: Path) -> list[list[str]]:
    try:
        return [line.split() for line in out.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def wait_starts(out: Path, count: int, timeout_s: float = 20) -> list[list[str]]:
    deadline = time.monotonic() + timeout_s
    while len(seen := starts(out)) < count or len(seen[-1]) < 5:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{out}: {count} start(s) expected, read {seen}")
        time.sleep(0.2)
    return seen


@pytest.mark.slow
def test_a_power_cut_requeues_the_job_onto_the_other_node_and_the_node_comes_back(
    two_node_slurm: TwoNodeCluster, tmp_path: Path
) -> None:
    cluster = two_node_slurm
    out = tmp_path / "starts.txt"
    script = tmp_path / "job.sh"
    script.write_text(JOB.format(python=sys.executable, out=out))
    submitted = cluster.run(
        [
            "sbatch",
            "--parsable",
            "--requeue",
            "-J",
            "two-node-test",
            "-c",
            "1",
            "--mem=1G",
            "-o",
            str(tmp_path / "slurm-%j.out"),
            str(script),
        ]
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        cluster.wait_job(job, ["RUNNING"])
        first = cluster.node_of(job)
        assert first in cluster.nodes
        [(count, host, pid_ns, _, seen_by_squeue)] = wait_starts(out, 1)
        assert (count, host, seen_by_squeue) == ("0", first, "RUNNING")
        assert pid_ns != os.readlink("/proc/self/ns/pid")
        assert cluster.job_pids(job), cluster.node_pids(first)

        cluster.power_cut(first)
        assert cluster.node_states()[first] == "down"
        assert cluster.node_pids(first) == []
        cluster.wait_job(job, ["PENDING"], timeout=10)
        cluster.start_pending_now(job)
        cluster.wait_job(job, ["RUNNING"], timeout=20)
        second = cluster.node_of(job)
        assert second in cluster.nodes and second != first
        assert [start[:2] for start in wait_starts(out, 2)] == [["0", first], ["1", second]]
        assert starts(out)[1][4] == "RUNNING"

        cluster.restart_node(first)
        assert cluster.node_states()[first] == "idle"
    finally:
        cluster.run(["scancel", job])
