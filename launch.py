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

from flux_lora.check import check_run, print_check_report
from flux_lora.compose import PROJECT_ROOT, describe_config_error, load_run, print_config_tree, register, resolved_container
from flux_lora.engines import get_engine
from flux_lora.report import SweepDirRecorder, find_run_dirs, print_summary, read_run, write_sweep_report
from flux_lora.resume import RunNotStartable, continue_known_run
from flux_lora.rules import memory_advice
from flux_lora.runner import ExpectedTraining, RunState, evaluate_after_run, launch_command, start_run
from flux_lora.schema import ResumeMode
from flux_lora.snapshot import dataset_fingerprint, freeze_run, run_identity

register()


def error_line(exc: BaseException) -> str:
    return f"error: {describe_config_error(exc)}  (FLUX_LORA_TRACEBACK=1 shows the traceback)"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        launch_one(cfg)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one line per error
        # A sweep's other cells still run and Hydra reports the failure with them.
        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("FLUX_LORA_TRACEBACK"):
            raise
        # Raised through Hydra, the error would come after a line of Hydra's own ("Error executing job ...").
        print(error_line(exc), file=sys.stderr)
        sys.exit(2)


def launch_one(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    run = load_run(cfg)  # first: a key outside the schema stops here, before anything is printed
    print_config_tree(cfg)

    engine = get_engine(run.engine.name.value)
    report = check_run(run, engine, dry_run=run.launch.dry_run)
    resolved = resolved_container(cfg)
    expect = ExpectedTraining(run.profile.max_train_steps, run.launch.output_name, memory_advice=memory_advice(run))
    if run.launch.resume == ResumeMode.auto and not (run.launch.dry_run or run.launch.resume_from or report.errors or report.refusal):
        # A run id seen before is skipped (done), resumed where it lives, or refused (live elsewhere).
        run_id = run_identity(resolved, report, dataset_fingerprint(run, report))
        try:
            known = continue_known_run(run, engine, report, run_dir, run_id, resolved, expect)
        except RunNotStartable as refusal:
            print(f"error: {refusal}", file=sys.stderr)
            if hydra_cfg.mode == RunMode.RUN:
                sys.exit(1)
            return  # a sweep goes on with its other cells
        if known is not None:
            home, status = known
            if status is not None:
                end_run(run_id, status, home, hydra_cfg.mode, run)
            elif run.eval.enabled:  # done before: evaluate it now (cached if it was)
                evaluate_and_warn(run, home)
            return

    overrides = list(hydra_cfg.overrides.task)
    frozen = freeze_run(run, resolved, report, engine, run_dir, PROJECT_ROOT, launch_command, overrides)
    print_check_report(report)
    run_dir = frozen.run_dir
    status = start_run(frozen, report, dry_run=run.launch.dry_run, expect=expect, finish=lambda: engine.finish_attempt(run, run_dir))
    end_run(frozen.run_id, status, run_dir, hydra_cfg.mode, run)


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


def cli() -> int:
    # Let composition errors reach us whole, so each is printed as one line, not Hydra's page.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    code = 0
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one line per error
        if os.environ.get("FLUX_LORA_TRACEBACK"):
            raise
        print(error_line(exc), file=sys.stderr)
        code = 2
    finally:
        # Also after an interrupted sweep: the table shows what ran, what stopped and what never started.
        if SweepDirRecorder.sweep_dir is not None:
            rows = [read_run(d) for d in find_run_dirs(SweepDirRecorder.sweep_dir)]
            print_summary(rows, title=f"sweep {SweepDirRecorder.sweep_dir}")
            write_sweep_report(SweepDirRecorder.sweep_dir)  # report.html and report.md beside the cells
            if any(r.state in (RunState.failed.value, RunState.interrupted.value) for r in rows):
                code = max(code, 1)
    return code


if __name__ == "__main__":
    sys.exit(cli())
