"""One owner per run on a real two-node SLURM (tests/slurm_two_node.py: two slurmd in namespaces of their own on this
machine, one shared disk): `python launch.py -m ... hydra/launcher=slurm` submits real jobs that train the tiny model.

- scancel of a training job: interrupted with a state saved; the same command resumes it. Then a power cut of the node
  it trains on: SLURM requeues the job onto the other node, where its restart takes the run over at once and resumes.
- A job suspended past the heartbeat limit while the same sweep is submitted again: SLURM says the suspended job
  holds the run, the newcomer leaves it alone, and after `scontrol resume` the first finishes alone.

A requeued job waits about two minutes (BeginTime) before SLURM starts it again; the tests start it at once with
`scontrol update starttime=now`, as an idle cluster would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from flux_lora.lifecycle.outcome import LOSS_TAG, scalar_series
from tests.cli import start_cli
from tests.slurm_two_node import TwoNodeCluster  # the two_node_slurm fixture is registered in tests/conftest.py

CELL = [
    "ablation=baseline",
    "profile.lr_warmup_steps=1",
    "profile.sample_every_n_steps=1000",
    "profile.sample_steps=2",
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=4",
]


def launch(cluster: TwoNodeCluster, args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    """A sweep submitted to this cluster (SLURM_CONF, as cluster.env() sets it), never inside a job of the shell's own."""
    in_a_job = [k for k in os.environ if k.startswith("SLURM_JOB")]
    return start_cli("-m", *args, folder=tmp_path, env={"SLURM_CONF": cluster.env()["SLURM_CONF"]}, drop=in_a_job)


def status_of(cell: Path) -> dict:
    try:
        return json.loads((cell / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def trained_steps(cell: Path) -> list[int]:
    return [step for step, _, _ in scalar_series(cell / "logs", LOSS_TAG)]


def wait_until(what: str, check, timeout_s: float = 300, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(every_s)
    return found


def job_of(sweep_dir: Path) -> str:
    return wait_until(
        "the sweep's job id",
        lambda: (sweep_dir / "slurm_jobs.json").is_file()
        and json.loads((sweep_dir / "slurm_jobs.json").read_text())["jobs"][0],
    )


def newest_state_step(cell: Path) -> int:
    steps = [
        int(m[1])
        for p in (cell / "output").glob("flux-lora-step*-state")
        if (m := re.search(r"step(\d{8})-state$", p.name))
    ]
    return max(steps, default=0)


@pytest.mark.slow
def test_scancel_then_the_same_command_resumes_and_a_node_failure_resumes_on_the_other_node(
    two_node_slurm, tmp_path: Path
) -> None:
    cluster: TwoNodeCluster = two_node_slurm
    steps = 40
    sweep_dir = tmp_path / "sweep"
    args = [
        *CELL,
        f"ablation.baseline_steps={steps}",
        "profile.save_every_n_steps=5",
        "launch.detach=true",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    cell = sweep_dir / "0_tiny-smoke-cpu-native-baseline"

    # 1. scancel mid-training: SIGTERM reaches the launcher, the trainer saves at the step reached.
    assert launch(cluster, args, tmp_path).communicate(timeout=120)[0]
    job = job_of(sweep_dir)
    wait_until("a first state", lambda: newest_state_step(cell) >= 5)
    assert cluster.run(["scancel", job]).returncode == 0
    wait_until("the cancelled attempt's record", lambda: status_of(cell).get("state") == "interrupted", timeout_s=120)
    cancelled = status_of(cell)["attempts"][0]
    assert "stopped by a signal; resume from:" in cancelled["reason"] and "nothing saved" not in cancelled["reason"], (
        cancelled
    )
    saved = newest_state_step(cell)

    # 2. The same command: a new job resumes the run in its folder from that state.
    output = launch(cluster, args, tmp_path).communicate(timeout=120)[0]
    second_job = json.loads((sweep_dir / "slurm_jobs.json").read_text())["jobs"][0]
    assert second_job != job, output[-2000:]
    node = wait_until("the resumed job on a node", lambda: cluster.node_of(second_job))
    wait_until(
        "the resumed attempt training",
        lambda: len(status_of(cell).get("attempts", [])) == 2 and trained_steps(cell)[-1:] > [saved + 3],
    )
    assert status_of(cell)["attempts"][1]["from_step"] == saved

    # 3. Power cut of its node, marked down: SLURM requeues the job; it starts on the other node as restart 1, whose
    #    launcher takes the lease over at once (SLURM says it is the same job again) and resumes. No second submission.
    wait_until("a state of the second attempt", lambda: newest_state_step(cell) > saved)
    cluster.power_cut(node)
    cut_at = time.monotonic()
    cluster.wait_job(second_job, ["PENDING"], timeout=30)
    cluster.start_pending_now(second_job)
    other = wait_until("the requeued job running", lambda: cluster.node_of(second_job))
    assert other != node
    wait_until("the run finished", lambda: status_of(cell).get("state") in ("succeeded", "failed"), timeout_s=600)
    print(f"node failure -> succeeded in {time.monotonic() - cut_at:.0f} s (requeue started at once)")
    cluster.restart_node(node)

    status = status_of(cell)
    assert status["state"] == "succeeded", json.dumps(status, indent=1)[-3000:]
    attempts = status["attempts"]
    assert [a["state"] for a in attempts] == ["interrupted", "interrupted", "succeeded"], attempts
    assert [a["host"] for a in attempts[1:]] == [node, other]
    assert attempts[2]["slurm"]["queue_id"] == second_job and attempts[2]["slurm"]["restart_count"] == 1
    assert "owner" in attempts[1]["reason"] and attempts[2]["from_step"] > saved
    # The requeued job's own log (sbatch truncates it at the restart): it took the run over because SLURM said so.
    (log,) = (sweep_dir / ".submitit").glob(f"{second_job}_*log.out")
    assert f"SLURM started its job {second_job} again (restart 1)" in log.read_text(), log.read_text()[-3000:]
    assert trained_steps(cell) == list(range(1, steps + 1))  # every step once, in the lineage the LoRA descends from
    assert (cell / "output" / "flux-lora.safetensors").is_file()
    assert len(list(sweep_dir.glob("0_*"))) == 1


@pytest.mark.slow
def test_a_suspended_job_keeps_its_run_from_a_second_submission_and_finishes_alone(
    two_node_slurm, tmp_path: Path
) -> None:
    cluster: TwoNodeCluster = two_node_slurm
    steps = 25
    # The heartbeat limit lowered to 5 s: the suspended job is silent far longer, and still nobody takes its run.
    common = [*CELL, f"ablation.baseline_steps={steps}", "profile.save_every_n_steps=10", "launch.lease_stale_s=5"]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    assert launch(cluster, [*common, "launch.detach=true", f"hydra.sweep.dir={first_dir}"], tmp_path).communicate(
        timeout=120
    )[0]
    job = job_of(first_dir)
    cell = first_dir / "0_tiny-smoke-cpu-native-baseline"
    wait_until("training", lambda: len(trained_steps(cell)) >= 3)
    node = cluster.node_of(job)
    assert cluster.run(["scontrol", "suspend", job]).returncode == 0
    cluster.wait_job(job, ["SUSPENDED"], timeout=30)
    time.sleep(8)  # silent past launch.lease_stale_s
    before = trained_steps(cell)

    other = next(n for n in cluster.nodes if n != node)  # the newcomer on the other node: only SLURM can speak for it
    second = launch(cluster, [*common, f"hydra.launcher.exclude={node}", f"hydra.sweep.dir={second_dir}"], tmp_path)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 1, output[-3000:]
    assert (
        re.search(r"│ busy .*", output)
        and (second_dir / "0_tiny-smoke-cpu-native-baseline" / "run_pointer.json").is_file()
    ), output[-3000:]
    pointer = json.loads((second_dir / "0_tiny-smoke-cpu-native-baseline" / "run_pointer.json").read_text())
    assert f"SLURM job {job} is SUSPENDED" in pointer["note"] and f"on {node}" in pointer["note"], pointer
    assert trained_steps(cell) == before  # nobody trained it meanwhile
    assert not list(second_dir.rglob("events.out.tfevents.*"))

    assert cluster.run(["scontrol", "resume", job]).returncode == 0
    wait_until(
        "the first job's run finished", lambda: status_of(cell).get("state") in ("succeeded", "failed"), timeout_s=600
    )
    status = status_of(cell)
    assert status["state"] == "succeeded" and len(status["attempts"]) == 1, json.dumps(status, indent=1)[-3000:]
    assert trained_steps(cell) == list(range(1, steps + 1))
    log_steps = [int(m[1]) for m in re.finditer(rf"^step (\d+)/{steps}", (cell / "train.log").read_text(), re.M)]
    assert log_steps == sorted(set(log_steps))  # one trainer's lines, never two interleaved
    assert len(list((cell / "logs").rglob("events.out.tfevents.*"))) == 1
    assert other != node
