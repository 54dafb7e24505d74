"""The result of the pre-launch check, and how it is shown.

Its own module, below everything that reads it: the check (check.py) fills it, the snapshot records
it and the launcher prints it, without any of them importing the check itself (which loads Hydra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from flux_lora.dataset.gate import GateResult
from flux_lora.dataset.report import DatasetReport
from flux_lora.dataset.training_set import TrainingSet


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    # Config key -> why the engine does not apply it; recorded so no run claims a setting it never used.
    not_applied: dict[str, str] = field(default_factory=dict)
    # Set when an ablation cell would only change options the engine ignores (a silent baseline copy).
    refusal: str | None = None
    dataset_report: DatasetReport | None = None
    gate: GateResult | None = None
    # dataset.reg_path: the class images' analysis and their check (regularization.py).
    reg_report: DatasetReport | None = None
    reg_gate: GateResult | None = None
    # The (image, caption) pairs that train: what the gate passed is what both engines read.
    training_set: TrainingSet | None = None
    # The engine's own checks of the rendered inputs (set at freeze, where the inputs exist); None = not run.
    engine_preflight: dict | None = None
    # launch.resume_from: the state, its step, the run that saved it and any recipe keys changed from that step.
    resume_source: dict | None = None
    # launch.init_lora: the LoRA file the run starts from and its sha256.
    init_lora: dict | None = None


def print_check_report(
    report: CheckReport, console: Console | None = None, error_console: Console | None = None
) -> None:
    console = console or Console()
    error_console = error_console or Console(stderr=True)  # errors on stderr, so a script sees just them
    for line in report.infos:
        console.print(f"[cyan]info[/cyan]: {line}", highlight=False, soft_wrap=True)
    for line in report.warnings:
        console.print(f"[yellow]warning[/yellow]: {line}", highlight=False, soft_wrap=True)
    for line in report.errors:
        error_console.print(f"[red]error[/red]: {line}", highlight=False, soft_wrap=True)
    if report.refusal:
        error_console.print(f"[red]refused[/red]: {report.refusal}", highlight=False, soft_wrap=True)
