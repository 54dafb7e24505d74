"""flux-lora entry point: compose -> check -> freeze -> launch (-> report after a sweep).

    python launch.py                                  # embedded default: tiny FLUX, sample data, CPU
    python launch.py profile=final gpu=h200           # with conf/local/default.yaml pointing at real weights
    python launch.py sweep=ablation                   # the nine-cell ablation matrix
"""

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from flux_lora.check import check_run, print_check_report
from flux_lora.compose import PROJECT_ROOT, describe_config_error, load_run, print_config_tree, register, resolved_container
from flux_lora.engines import get_engine
from flux_lora.report import SweepDirRecorder, find_run_dirs, print_summary, read_run, write_sweep_report
from flux_lora.resume import Decision, decide, find_runs_with_id
from flux_lora.rules import memory_advice
from flux_lora.runner import ExpectedTraining, RunState, evaluate_after_run, launch_command, launch_run, start_run
from flux_lora.schema import ResumeMode
from flux_lora.snapshot import config_differences, dataset_fingerprint, freeze_run, run_identity, write_pointer

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
        run_id = run_identity(resolved, report, dataset_fingerprint(run, report))
        decision = decide(find_runs_with_id(Path(run.paths.outputs), run_id), run.launch.output_name)
        if decision.decision != Decision.start:
            finish_known_run(run, engine, report, run_dir, run_id, decision, expect, hydra_cfg.mode)
            return
        changed = changed_cell(run_dir, resolved)
        if changed:
            print(f"error: {changed}", file=sys.stderr)
            if hydra_cfg.mode == RunMode.RUN:
                sys.exit(1)
            return  # the sweep's other cells go on

    overrides = list(hydra_cfg.overrides.task)
    frozen = freeze_run(run, resolved, report, engine, run_dir, PROJECT_ROOT, launch_command, overrides)
    print_check_report(report)
    run_dir = frozen.run_dir
    status = start_run(frozen, report, dry_run=run.launch.dry_run, expect=expect, finish=lambda: engine.finish_attempt(run, run_dir))
    end_run(frozen.run_id, status, run_dir, hydra_cfg.mode, run)


def changed_cell(cell_dir: Path, resolved: dict) -> Optional[str]:
    """A sweep run again into its own folder, whose cell's config changed since: what changed (nothing is touched)."""
    if not ((cell_dir / "config.yaml").is_file() and (cell_dir / "run.json").is_file()):
        return None
    changed = config_differences(yaml.safe_load((cell_dir / "config.yaml").read_text()), resolved)
    return (
        f"{cell_dir}: holds a run of another config ({'; '.join(changed[:6]) or 'the dataset content changed'}); "
        "run the sweep into a new folder (omit hydra.sweep.dir) or restore those values"
    )


def finish_known_run(run, engine, report, cell_dir: Path, run_id: str, decision, expect, mode) -> None:
    """Skip a run that already succeeded, refuse one that is live elsewhere, or resume it where it lives."""
    home = decision.run_dir
    for note in decision.notes:
        print(f"info: {note}")
    if decision.decision == Decision.skip:
        print(f"skipped: done: run {run_id} succeeded in {home}")
        if home != cell_dir:
            write_pointer(cell_dir, "skipped: done", home, run_id)
        if run.eval.enabled:  # a re-run with evaluation switched on evaluates what is done (cached if it was)
            problem = evaluate_after_run(run, home)
            if problem:
                print(f"warning: {problem}", file=sys.stderr)
        return
    if decision.decision == Decision.busy:
        if home != cell_dir:
            write_pointer(cell_dir, "busy", home, run_id)
        print(f"error: run {run_id} is being trained in {home} ({decision.notes[0]}); wait for it or stop it first", file=sys.stderr)
        if mode == RunMode.RUN:
            sys.exit(1)
        return  # a sweep goes on with its other cells
    state = decision.state
    print_check_report(report)
    print(f"resuming run {run_id} in {home} from {state.path.name} (step {state.step})")
    resumed = dataclasses.replace(run, launch=dataclasses.replace(run.launch, resume_from=str(state.path)))
    inputs = engine.render(resumed, home, report.not_applied)
    problems = engine.check_inputs(resumed, inputs)
    if problems:
        raise ValueError(f"cannot resume {home}: {problems[0]}")
    if home != cell_dir:
        write_pointer(cell_dir, "resumed", home, run_id)
    expect = dataclasses.replace(expect, from_step=state.step or 0)
    status = launch_run(home, launch_command(resumed, inputs), expect, finish=lambda: engine.finish_attempt(resumed, home))
    end_run(run_id, status, home, mode, run)


def end_run(run_id: str, status, run_dir: Path, mode, run=None) -> None:
    print(f"run {run_id} {status.state.value}: {run_dir}" + (f" ({status.reason})" if status.reason else ""))
    if run is not None and run.eval.enabled and status.state == RunState.succeeded:
        problem = evaluate_after_run(run, run_dir)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
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
