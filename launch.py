"""flux-lora entry point: compose -> check -> freeze -> launch (-> report after a sweep).

python launch.py                                  # embedded default: tiny FLUX, sample data, CPU
python launch.py profile=final gpu=h200           # with conf/local/default.yaml pointing at real weights
python launch.py sweep=ablation                   # the nine-cell ablation matrix
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from flux_lora.check import check_run
from flux_lora.check_report import print_check_report
from flux_lora.compose import (
    PROJECT_ROOT,
    describe_config_error,
    load_run,
    print_config_tree,
    register,
    resolved_container,
)
from flux_lora.cost import estimate_cost, estimated_and_took
from flux_lora.engines import get_engine
from flux_lora.lifecycle.decision import RunNotStartable, continue_known_run
from flux_lora.lifecycle.job import ExpectedTraining, evaluate_after_run, launch_command, launch_run, start_run
from flux_lora.lifecycle.lease import Lease, LeaseHeld, LeaseLost
from flux_lora.lifecycle.packing import Deferred, Packer, PackQueue, run_waiting
from flux_lora.lifecycle.slurm import restart_count, sweep_cells_expected
from flux_lora.records import RunState, write_pointer
from flux_lora.redaction import redact_terminal
from flux_lora.report import SKIPPED_DONE, SweepDirRecorder, find_run_dirs, print_summary, read_run, write_sweep_report
from flux_lora.report.collect import run_home
from flux_lora.rules import memory_advice
from flux_lora.schema import ResumeMode
from flux_lora.snapshot import dataset_fingerprint, freeze_run, run_identity

register()


def error_line(exc: BaseException) -> str:
    return f"error: {describe_config_error(exc)}  (FLUX_LORA_TRACEBACK=1 shows the traceback)"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    redact_terminal()  # also in a SLURM job, which calls this function without cli()
    try:
        launch_one(cfg)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one line per error
        # A sweep's other cells still run and Hydra reports the failure with them.
        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("FLUX_LORA_TRACEBACK"):
            raise
        # Raised through Hydra, the error would come after a line of Hydra's own ("Error executing job ...").
        print(error_line(exc), file=sys.stderr)
        sys.exit(2)
    finally:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # however the cell ended: trained, skipped, refused
            report_if_last_cell(Path(HydraConfig.get().sweep.dir))


def launch_one(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if restart_count() > 0:  # SLURM requeued this job (time limit, preemption): go on where it stopped
        cfg.launch.resume = ResumeMode.auto.value
    elif cfg.launch.resume is None:  # a sweep run again finishes what it started; a single run starts anew
        cfg.launch.resume = ResumeMode.auto.value if hydra_cfg.mode == RunMode.MULTIRUN else ResumeMode.never.value
    run = load_run(cfg)  # first: a key outside the schema stops here, before anything is printed
    print_config_tree(cfg)

    engine = get_engine(run.engine.name.value)
    cost = estimate_cost(run)
    print(cost.line())
    report = check_run(run, engine, dry_run=run.launch.dry_run)
    resolved = resolved_container(cfg)
    run_id = run_identity(resolved, report, dataset_fingerprint(run, report))
    from_step = (report.resume_source or {}).get("step", 0)
    expect = ExpectedTraining(
        run.profile.max_train_steps, run.launch.output_name, from_step=from_step, memory_advice=memory_advice(run)
    )
    try:
        # One owner per run id, from before the skip/resume/start decision until the final status is written.
        lease = Lease.acquire(
            Path(run.paths.outputs), run_id, run_dir, run.launch.lease_stale_s, say=lambda line: print(f"info: {line}")
        )
    except LeaseHeld as held:
        print(f"error: {held}", file=sys.stderr)
        leave_note(
            run_dir,
            hydra_cfg.mode,
            "busy",
            Path(held.holder.run_dir or run_dir),
            run_id,
            f"{held.holder.describe()}; {held.why}",
        )
        refused_exit(hydra_cfg.mode)
        return
    deferred = False
    try:
        run_under_lease(run, engine, report, cost, resolved, run_id, expect, lease, run_dir)
    except Deferred:  # launch.pack: it trains in a packed job once every cell is decided; the lease stays held
        deferred = True
    except LeaseLost as lost:  # taken over while we ran: the new owner records the run; we wrote nothing more
        print(f"error: {lost}", file=sys.stderr)
        refused_exit(hydra_cfg.mode)
    finally:
        if not deferred:
            lease.release()


def run_under_lease(run, engine, report, cost, resolved, run_id, expect, lease: Lease, run_dir: Path) -> None:
    """Skip, resume or start the run, holding its lease."""
    hydra_cfg = HydraConfig.get()
    if lease.took_over:
        print(f"info: run {run_id}: took over the lease of {lease.took_over.describe()}: {lease.took_over_why}")
    launch = packed_launch(run, engine, run_id, lease, hydra_cfg.mode)
    if run.launch.resume == ResumeMode.auto and not (
        run.launch.dry_run or run.launch.resume_from or report.errors or report.refusal
    ):
        try:
            known = continue_known_run(run, engine, report, run_dir, run_id, resolved, expect, lease, launch)
        except RunNotStartable as refusal:
            print(f"error: {refusal}", file=sys.stderr)
            leave_note(run_dir, hydra_cfg.mode, "refused", run_dir, run_id, str(refusal))
            refused_exit(hydra_cfg.mode)
            return
        if known is not None:
            home, status = known
            if status is not None:
                end_run(run_id, status, home, hydra_cfg.mode, run)
            elif run.eval.enabled:  # done before: evaluate it now (cached if it was)
                evaluate_and_warn(run, home)
            return

    overrides = list(hydra_cfg.overrides.task)
    frozen = freeze_run(
        run, resolved, report, engine, run_dir, PROJECT_ROOT, launch_command, overrides, cost.as_record()
    )
    print_check_report(report)
    run_dir = frozen.run_dir
    status = start_run(
        frozen,
        report,
        dry_run=run.launch.dry_run,
        expect=expect,
        lease=lease,
        finish=lambda: engine.finish_attempt(run, run_dir),
        engine_record=engine.version_record(run),
        launch=launch,
    )
    end_run(frozen.run_id, status, run_dir, hydra_cfg.mode, run)


def packed_launch(run, engine, run_id: str, lease: Lease, mode):
    """launch.pack in a local sweep: the cell's launch waits for its packed job (lifecycle.packing); else launch_run."""
    if not (run.launch.pack and mode == RunMode.MULTIRUN):
        return launch_run
    if not PackQueue.runs_here:
        print("info: launch.pack: this cell runs as a job of its own (packing is built for local and SLURM sweeps)")
        return launch_run
    sweep_dir = Path(HydraConfig.get().sweep.dir)

    def on_end(run_dir: Path, status) -> None:
        try:
            if status is None:
                print(f"error: run {run_id} in {run_dir} was taken over by another launch; nothing more written")
            else:
                end_run(run_id, status, run_dir, mode, run)
        finally:
            lease.release()
            report_if_last_cell(sweep_dir)  # the cell's task ended before its packed job trained it

    return Packer(engine.pack_key, on_end).launch


def leave_note(cell_dir: Path, mode, state: str, home: Path, run_id: str, note: str) -> None:
    """A sweep cell that did not run says why in its folder, so the sweep's summary shows it (never over a run)."""
    if mode == RunMode.MULTIRUN and not (cell_dir / "run.json").exists():
        write_pointer(cell_dir, state, home, run_id, note=note)


def report_if_last_cell(sweep_dir: Path) -> None:
    """On a cluster nobody may wait for the sweep (launch.detach): the last cell to end writes its report."""
    expected = sweep_cells_expected(sweep_dir)
    if expected is None:
        return  # not a SLURM sweep: the launching process writes the report when the sweep ends
    rows = [read_run(d) for d in find_run_dirs(sweep_dir)]
    if len(rows) >= expected and all(r.state in FINISHED_STATES or r.state in ENDED_STATES for r in rows):
        write_sweep_report(sweep_dir)


def refused_exit(mode) -> None:
    # A single run that cannot start is a failed command; a sweep goes on with its other cells (and exits 1 at the end).
    if mode == RunMode.RUN:
        sys.exit(1)


def evaluate_and_warn(run, run_dir: Path) -> None:
    problem = evaluate_after_run(run, run_dir)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)


def end_run(run_id: str, status, run_dir: Path, mode, run) -> None:
    print(f"run {run_id} {status.state.value}: {run_dir}" + (f" ({status.reason})" if status.reason else ""))
    if run.eval.enabled and status.state == RunState.succeeded:
        evaluate_and_warn(run, run_dir)
    if status.state == RunState.interrupted:
        sys.exit(130)  # Ctrl-C or a scheduler's stop ends a sweep too, not just its current cell
    # A single run that did not happen is a failed command; a sweep goes on to its next cell.
    if mode == RunMode.RUN and status.state not in (RunState.succeeded, RunState.dry_run):
        sys.exit(1)


FINISHED_STATES = (RunState.succeeded.value, RunState.dry_run.value, SKIPPED_DONE)
ENDED_STATES = (RunState.failed.value, RunState.refused.value, "busy")  # ended, not finished: the sweep exits 1


def cli() -> int:
    # Let composition errors reach us whole, so each is printed as one line, not Hydra's page.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    redact_terminal()  # the config tree, a check's message, a one-line error: no secret reaches the terminal
    code = 0
    PackQueue.runs_here = True  # launch.pack: the cells' packed jobs start here once Hydra has decided every cell
    try:
        main()
        run_waiting(lambda line: print(f"info: {line}"))
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one line per error
        if os.environ.get("FLUX_LORA_TRACEBACK"):
            raise
        print(error_line(exc), file=sys.stderr)
        code = 2
    finally:
        cluster = sys.modules.get("flux_lora.cluster")  # imported only by hydra/launcher=slurm
        if cluster is not None and cluster.SlurmLauncher.detached:
            print("\n".join(cluster.follow_lines(cluster.SlurmLauncher.detached)))
        # Also after an interrupted sweep: the table shows what ran, what stopped and what never started.
        elif SweepDirRecorder.sweep_dir is not None:
            rows = [read_run(d) for d in find_run_dirs(SweepDirRecorder.sweep_dir)]
            print_summary(rows, title=f"sweep {SweepDirRecorder.sweep_dir}")
            took = estimated_and_took([run_home(r.run_dir) for r in rows])
            if took:
                print(took)
            write_sweep_report(SweepDirRecorder.sweep_dir)  # report.html and report.md beside the cells
            # Refused, failed, busy elsewhere or left unfinished: the sweep is not done, whatever Hydra thinks.
            if any(r.state not in FINISHED_STATES for r in rows):
                code = max(code, 1)
    return code


if __name__ == "__main__":
    sys.exit(cli())
