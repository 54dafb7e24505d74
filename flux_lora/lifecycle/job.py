"""Launch: start the frozen run as an `accelerate launch` job and record how it ended.

The job gets an argument list (never a shell string) and runs under flux_lora.lifecycle.job_guard, so it dies
with the launcher (after a chance to save) and leaves no orphan. Its output is streamed to the
console and to `train.log` with secret values redacted and watched for a non-finite loss (the job
is stopped within a step of it) and out-of-memory crashes. `status.json` says what happened: the
state comes from what the job did (its exit status, the steps it logged, the LoRA and states it
saved), not from which signal the launcher saw. SIGINT and SIGTERM (Ctrl-C, SLURM's cancel or time
limit) are forwarded as SIGTERM, SIGUSR2 (submitit's warning before the time limit) as itself.
Only the holder of the run id's lease (lifecycle.lease) starts a job; the lease names the job's guard
too and both keep its heartbeat fresh. Every attempt is appended to status.json's `attempts` with the
exact command, the interpreter, the engine's code version, the SLURM job, the step it started from
and how long it took.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from flux_lora.check_report import CheckReport
from flux_lora.checkpoint_files import WriteFailed
from flux_lora.engines.base import EngineInputs
from flux_lora.lifecycle.job_guard import LEASE_LOST_EXIT_CODE
from flux_lora.lifecycle.lease import HEARTBEAT_S, LEASES_ENV, Lease, LeaseLost, read_holder
from flux_lora.lifecycle.outcome import (
    KILLED_EXIT_CODE,
    STOPPED_EXIT_CODES,
    JobWatch,
    gather_evidence,
    training_shortfall,
)
from flux_lora.lifecycle.slurm import slurm_record
from flux_lora.lifecycle.states import finished_state, latest_good_state, state_step
from flux_lora.provenance import embed_in_outputs
from flux_lora.records import (
    LOG_FILE,
    RunState,
    RunStatus,
    now_iso,
    process_start_time,
    read_status,
    total_duration,
    write_status,
)
from flux_lora.redaction import redact, secret_values
from flux_lora.schema import Accelerator, RunConfig
from flux_lora.snapshot import FrozenRun, LaunchCommand


def accelerate_argv(run: RunConfig, inputs: EngineInputs) -> list[str]:
    """`accelerate launch` with the tier's process count, precision and device flags, then the job."""
    gpu = run.gpu
    argv = [
        run.engine.python or sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(gpu.num_gpus),
        "--mixed_precision",
        run.profile.mixed_precision.value,
        "--dynamo_backend",
        "no",
        "--quiet",  # a job that fails says why in its own words; accelerate's traceback of its exit adds nothing
    ]
    if gpu.accelerator == Accelerator.cpu and gpu.num_gpus > 1:
        # Several CPU processes (gloo): torch elastic starts them, as for GPUs; the job itself asks for the CPU.
        argv += ["--multi_gpu", "--num_cpu_threads_per_process", str(max(1, cpu_threads() // gpu.num_gpus))]
    elif gpu.accelerator == Accelerator.cpu:
        argv += ["--cpu", "--num_cpu_threads_per_process", str(cpu_threads())]
    elif gpu.num_gpus > 1:
        argv.append("--multi_gpu")
    return argv + list(inputs.script_argv)


def cpu_threads() -> int:
    """Threads for a CPU job: OMP_NUM_THREADS where the user set it (accelerate's flag below would override it), else
    every core."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def launch_command(run: RunConfig, inputs: EngineInputs) -> LaunchCommand:
    # Unbuffered, so the job's lines reach the log as they happen.
    return LaunchCommand(argv=accelerate_argv(run, inputs), cwd=inputs.cwd, env={"PYTHONUNBUFFERED": "1", **inputs.env})


def refuse_run(run_dir: Path, reason: str) -> RunStatus:
    status = RunStatus(state=RunState.refused, reason=reason, ended=now_iso())
    write_status(run_dir, status)
    return status


def mark_dry_run(run_dir: Path) -> RunStatus:
    status = RunStatus(state=RunState.dry_run, reason="launch.dry_run=true: frozen, not started", ended=now_iso())
    write_status(run_dir, status)
    return status


@dataclass(frozen=True)
class ExpectedTraining:
    """What the run's artefacts must show for it to count as succeeded (outcome.py)."""

    max_train_steps: int
    output_name: str
    from_step: int = 0  # steps already trained when this attempt starts (a resume)
    memory_advice: str = ""  # the tier's settings that would use less memory, for an out-of-memory report


def _read_summary(run_dir: Path, since: float) -> dict:
    # The native job's own account of how it stopped; an older attempt's file says nothing about this one.
    path = run_dir / "output" / "train_summary.json"
    try:
        if path.stat().st_mtime >= since:
            return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    return {}


def lost_steps(run_dir: Path, expect: ExpectedTraining | None, saved: str | None) -> str:
    """What a stop cost: the steps trained past the state a resume will start from (sd-scripts cannot save on a signal)."""
    if expect is None:
        return ""
    reached = gather_evidence(run_dir, expect.output_name).last_step
    kept = (state_step(Path(saved)) if saved else None) or 0
    return (
        f"; {reached - kept} step(s) trained after it (up to step {reached}) are lost"
        if reached and reached > kept
        else ""
    )


def judge_attempt(
    run_dir: Path, exit_code: int, expect: ExpectedTraining | None, watch: JobWatch, signalled: bool, began: float
) -> tuple[RunState, str | None]:
    """The attempt's state and reason, from what the job did and left behind."""
    summary = _read_summary(run_dir, began)
    log = run_dir / LOG_FILE
    # Out-of-memory text decides only for a job that failed: a line that merely mentions it proves nothing.
    if watch.out_of_memory and exit_code != 0:
        advice = f"; to use less memory: {expect.memory_advice}" if expect and expect.memory_advice else ""
        return RunState.failed, f"out of memory ({watch.out_of_memory}){advice}"
    nonfinite = (
        summary.get("nonfinite_step") if summary.get("stop_reason") == "nonfinite_loss" else watch.nonfinite_step
    )
    if nonfinite is not None:
        kept = summary.get("last_good_checkpoint") or (
            latest_good_state(run_dir, expect.output_name) if expect else None
        )
        return RunState.failed, f"loss became NaN at step {nonfinite}; last good checkpoint: {kept or 'none'}"
    if (
        exit_code != 0
        and expect is not None
        and finished_state(run_dir / "output", expect.output_name, expect.max_train_steps)
    ):
        # The trainer saved its final state and LoRA, then a stop signal took accelerate's launcher down: done.
        if training_shortfall(gather_evidence(run_dir, expect.output_name), expect.max_train_steps) is None:
            return (
                RunState.succeeded,
                f"finished (final state at step {expect.max_train_steps} and LoRA written) before exit code {exit_code}",
            )
    if exit_code == 0:
        if expect is None:
            return RunState.succeeded, None
        reason = training_shortfall(gather_evidence(run_dir, expect.output_name), expect.max_train_steps)
        return (RunState.failed, reason) if reason else (RunState.succeeded, None)
    stopped = summary.get("stop_reason") == "signal" or exit_code in STOPPED_EXIT_CODES or signalled
    if stopped:
        saved = latest_good_state(run_dir, expect.output_name) if expect else None
        return RunState.interrupted, f"stopped by a signal; resume from: {saved or 'nothing saved yet'}" + lost_steps(
            run_dir, expect, saved
        )
    if exit_code == KILLED_EXIT_CODE or watch.killed:
        return RunState.failed, "out of memory (killed by SIGKILL, as the kernel's OOM killer does; see dmesg)"
    return RunState.failed, f"exit code {exit_code}: {watch.last_error or 'see ' + str(log)}"


def _summary_facts(run_dir: Path, since: float) -> dict:
    summary = _read_summary(run_dir, since)
    facts = {"train_seconds": summary.get("seconds"), "peak_memory_gb": summary.get("peak_memory_gb")}
    if summary.get("steps") is not None and summary.get("first_step") is not None:
        facts["steps_trained"] = max(0, int(summary["steps"]) - int(summary["first_step"]) + 1)
    return {k: v for k, v in facts.items() if v is not None}


@dataclass
class PlannedRun:
    """One run of a job: a job trains one, a packed job (launch.pack) several, each with its folder, lease and record."""

    run_dir: Path
    expect: ExpectedTraining | None = None
    finish: Callable[[], object] | None = None  # called for its effect on the files (what it returns is not used)
    lease: Lease | None = None
    engine_record: dict | None = None
    label: str = ""  # what starts its lines in a packed job's output ("[folder name] ")


def launch_run(
    run_dir: Path,
    command: LaunchCommand,
    expect: ExpectedTraining | None = None,
    finish: Callable[[], object] | None = None,  # called for its effect on the files (what it returns is not used)
    lease: Lease | None = None,
    engine_record: dict | None = None,
) -> RunStatus:
    """Run one attempt of the job and record it; the caller holds the run id's lease (None only in unit tests).
    Every write into the run folder first checks that the lease is still ours: raises LeaseLost, having written
    nothing more, once another launch took the run over."""
    (status,) = launch_runs([PlannedRun(run_dir, expect, finish, lease, engine_record)], command)
    if status is None:
        assert lease is not None
        raise LeaseLost(lease.holder.run_id, read_holder(lease.path))
    return status


def _cell_exit_code(run_dir: Path, since: float, job_exit_code: int) -> int:
    """A packed run's own exit code, from its train_summary.json (the job's says how the job as a whole ended)."""
    summary = _read_summary(run_dir, since)
    if not summary:
        return job_exit_code
    if summary.get("stop_reason") == "nonfinite_loss":
        return 3
    if summary.get("stop_reason") == "signal":
        return 128 + signal.Signals[summary["signal"]].value if summary.get("signal") else job_exit_code
    return 0


def launch_runs(runs: list[PlannedRun], command: LaunchCommand) -> list[RunStatus | None]:
    """Run one attempt of a job that trains `runs` (one, or a packed job's several) and record it in each run's
    folder; None for a run that another launch took over (nothing more was written for it)."""
    started_at, began = time.monotonic(), time.time()
    packed = len(runs) > 1
    for run in runs:
        if run.lease is not None:
            run.lease.check()
    host, pid = socket.gethostname(), os.getpid()
    attempts, statuses = [], []
    for run in runs:
        previous = read_status(run.run_dir)
        earlier = list(previous.attempts) if previous else []
        attempt = {
            "started": now_iso(),
            "ended": None,
            "duration_s": None,
            "state": RunState.running.value,
            "exit_code": None,
            "from_step": run.expect.from_step if run.expect else 0,
            "host": host,
            "pid": pid,
            "command": command.argv,
            "python": command.argv[0],
            "engine": run.engine_record,
            "slurm": slurm_record(),
            "reason": None,
        }
        if packed:  # the job trained these runs together: each run's record names the others
            attempt["packed_with"] = [str(other.run_dir) for other in runs if other is not run]
        status = RunStatus(
            state=RunState.running,
            started=(previous.started if previous and earlier else None) or attempt["started"],
            host=host,
            pid=pid,
            heartbeat=now_iso(),
            attempts=[*earlier, attempt],
        )
        write_status(run.run_dir, status)
        attempts.append(attempt)
        statuses.append(status)
    secrets = secret_values()
    leases = [run.lease for run in runs if run.lease is not None]
    env = {**os.environ, **command.env}
    if packed and leases:
        env[LEASES_ENV] = json.dumps(
            {str(r.run_dir.absolute()): [str(r.lease.path), r.lease.holder.token] for r in runs if r.lease}
        )
    elif leases:
        env.update(leases[0].job_env())
    guard = [sys.executable, "-m", "flux_lora.lifecycle.job_guard"]
    for lease in leases:
        guard += ["--heartbeat", str(lease.path), "--token", lease.holder.token]

    # A session of its own, so a terminal's Ctrl-C reaches only us and we decide how the job stops; the guard
    # takes the job down with it if this process dies.
    child = subprocess.Popen(
        [*guard, *command.argv],
        cwd=command.cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    for run in runs:
        if run.lease is not None:
            # The guard outlives a killed launcher while the job saves: the lease names it, so nobody resumes meanwhile.
            run.lease.update(guard_pid=child.pid, guard_start=process_start_time(child.pid), run_dir=str(run.run_dir))
    signalled = False
    warned = False  # SLURM's SIGUSR2 before the time limit (submitit's signal_delay_s), or a preemption warning

    def stop_job(signum: int) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal signalled, warned
        signalled = True
        if signum == signal.SIGUSR2:
            # Passed on as it is: the trainer saves and stops on it, and SLURM may have sent it to every process
            # already (a copy within seconds is one stop to the trainer). Requeued below once the job has ended.
            warned = True
            stop_job(signal.SIGUSR2)
            return
        # SIGTERM for Ctrl-C too: the trainer saves and stops on it, and accelerate's launcher process exits
        # quietly instead of printing a KeyboardInterrupt traceback.
        stop_job(signal.SIGTERM)

    beating = threading.Event()
    lost = [threading.Event() for _ in runs]  # the run's lease carries another token: write nothing more for it

    def heartbeat() -> None:
        while not beating.wait(HEARTBEAT_S):
            for run, status, gone in zip(runs, statuses, lost):
                if gone.is_set():
                    continue
                if run.lease is not None and not run.lease.beat():
                    gone.set()
                    continue
                status.heartbeat = now_iso()
                try:
                    write_status(run.run_dir, status)
                except OSError:
                    pass  # a full disk: the lease's heartbeat still says we live; the final status says how it ended

    previous_handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    watches = [JobWatch() for _ in runs]
    logs: list[TextIO | None] = []
    try:
        for run in runs:
            logs.append(open(run.run_dir / LOG_FILE, "a", encoding="utf-8"))
        try:
            assert child.stdout is not None
            for line in child.stdout:
                line = redact(line, secrets)
                sys.stdout.write(line)
                sys.stdout.flush()
                # A packed job's run says which it is; a line that does not (accelerate's, a warning) is every run's.
                owner = next((i for i, run in enumerate(runs) if packed and line.startswith(run.label)), None)
                text = line[len(runs[owner].label) :] if owner is not None else line
                for index, run in enumerate(runs):
                    if owner is not None and index != owner:
                        continue
                    if lost[index].is_set() or (run.lease is not None and not run.lease.holds()):
                        lost[index].set()  # the guard or the job stops within a second; its lines are not ours
                        continue
                    logs[index] = _append_line(logs[index], run.run_dir, text)
                    watch = watches[index]
                    if watch.feed(text) and watch.nonfinite_step is not None and not watch.stop_sent and not packed:
                        watch.stop_sent = True  # the loss is NaN: nothing later can be trusted; stop now
                        stop_job(signal.SIGTERM)  # (a packed job drops that run itself and goes on with the others)
        finally:
            for log in logs:
                if log is not None:
                    try:
                        log.close()
                    except OSError:
                        pass
        exit_code = child.wait()
    finally:
        beating.set()
        beat.join()  # no heartbeat may land after the final status
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)

    ended: list[RunStatus | None] = []
    for run, status, attempt, watch, gone in zip(runs, statuses, attempts, watches, lost):
        lease = run.lease
        if lease is not None and (gone.is_set() or exit_code == LEASE_LOST_EXIT_CODE or not lease.holds()):
            ended.append(None)
            continue
        if run.finish is not None:
            run.finish()  # e.g. a resumed sd-scripts attempt's files renumbered before they are judged
        embed_in_outputs(run.run_dir)  # LoRAs the engine saved without the run's record (sd-scripts) get it
        code = _cell_exit_code(run.run_dir, began, exit_code) if packed else exit_code
        state, reason = judge_attempt(run.run_dir, code, run.expect, watch, signalled, began)
        attempt.update(
            ended=now_iso(),
            duration_s=round(time.monotonic() - started_at, 2),
            state=state.value,
            exit_code=code,
            reason=reason,
            **_summary_facts(run.run_dir, began),
        )
        final = RunStatus(
            state=state,
            exit_code=code,
            started=status.started,
            ended=attempt["ended"],
            duration_s=total_duration(status.attempts),
            reason=reason,
            host=host,
            attempts=status.attempts,
        )
        if lease is not None:
            lease.check()
        write_status(run.run_dir, final)
        ended.append(final)
    requeue = previous_handlers[signal.SIGUSR2]
    stopped = [
        (run.run_dir, final, attempt, run.lease)
        for run, final, attempt in zip(runs, ended, attempts)
        if final is not None and final.state == RunState.interrupted
    ]
    if warned and stopped and callable(requeue):
        request_requeue(stopped, requeue)
    return ended


def _append_line(log: TextIO | None, run_dir: Path, line: str) -> TextIO | None:
    """The job's line into the run's train.log; a full disk closes the log (the line still reached the terminal)."""
    if log is None:
        return None
    try:
        log.write(line)
        log.flush()
        return log
    except OSError as exc:
        print(
            f"warning: {WriteFailed(run_dir / LOG_FILE, exc)}; the job's output goes to the terminal only",
            file=sys.stderr,
        )
        try:
            log.close()
        except OSError:
            pass
        return None


def request_requeue(stopped: list[tuple[Path, RunStatus, dict, Lease | None]], requeue: Callable) -> None:
    """Let submitit's own handler (hydra-submitit-launcher's checkpoint: the same cell or cells again) requeue the job
    with `scontrol requeue`, counting time-outs against max_num_timeout; it exits when it did. "requeued" is recorded
    in each stopped run's attempt only then; otherwise the reason it was not."""
    outcome = "not requeued: submitit's handler returned without requeueing"
    try:
        requeue(signal.SIGUSR2, None)
    except SystemExit:
        outcome = "requeued to resume"
        for _, _, attempt, _ in stopped:
            attempt["requeued"] = True
        raise
    except subprocess.CalledProcessError as failed:
        outcome = f"not requeued: {' '.join(map(str, failed.cmd))} failed (exit {failed.returncode})"
        raise
    except Exception as refused:  # submitit's UncompletedJobError: timed out too often, or not checkpointable
        outcome = f"not requeued: {refused}"
        raise
    finally:
        note = f"SLURM's warning before the time limit or a preemption: {outcome}"
        for run_dir, status, attempt, lease in stopped:
            attempt["reason"] = status.reason = f"{status.reason}; {note}"
            if lease is None or lease.holds():
                write_status(run_dir, status)


def evaluation_argv(run: RunConfig, run_dir: Path) -> list[str]:
    e = run.eval
    argv = [
        sys.executable,
        "-m",
        "flux_lora.eval",
        str(run_dir),
        "--lora",
        e.lora,
        "--strengths",
        ",".join(repr(float(s)) for s in e.strengths),
        "--seeds",
        ",".join(str(s) for s in e.seeds),
    ]
    if e.max_prompts is not None:
        argv += ["--max-prompts", str(e.max_prompts)]
    if not e.heldout_prompts:
        argv.append("--no-heldout")
    if not e.likeness:
        argv.append("--no-likeness")
    return argv


def evaluate_after_run(run: RunConfig, run_dir: Path) -> str | None:
    """Run the evaluator on a finished run (in its own process: the launcher never loads a model); a warning or None."""
    secrets = secret_values()
    done = subprocess.run(evaluation_argv(run, run_dir), capture_output=True, text=True, errors="replace")
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
        for line in (done.stdout + done.stderr).splitlines(keepends=True):
            line = redact(line, secrets)
            sys.stdout.write(line)
            log.write(line)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
    return f"evaluation of {run_dir} exited {done.returncode}: {last[0]}"


def start_run(
    frozen: FrozenRun,
    report: CheckReport,
    *,
    dry_run: bool,
    expect: ExpectedTraining | None = None,
    finish: Callable[[], object] | None = None,  # called for its effect on the files (what it returns is not used)
    lease: Lease | None = None,
    engine_record: dict | None = None,
    launch: Callable[..., RunStatus] | None = None,  # launch_run, or a packed sweep's (lifecycle.packing)
) -> RunStatus:
    """Refuse, stop after freezing (dry run), or launch: the one place that decides."""
    if report.errors:
        return refuse_run(frozen.run_dir, "; ".join(report.errors))
    if report.refusal:
        return refuse_run(frozen.run_dir, report.refusal)
    if dry_run:
        return mark_dry_run(frozen.run_dir)
    assert frozen.command is not None
    return (launch or launch_run)(frozen.run_dir, frozen.command, expect, finish, lease, engine_record)
