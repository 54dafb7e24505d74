"""Check: everything that must hold before a run is frozen and started.

Config rules (rules.py), what the chosen engine would silently ignore or cannot find, the
ablation no-op guard, and the dataset preflight (analysis and gate from flux_lora.dataset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from flux_lora.dataset import (
    AnalysisSettings,
    DatasetError,
    DatasetReport,
    GateResult,
    GateSettings,
    analyze_dataset,
    evaluate_gate,
)
from flux_lora.dataset.training_set import TrainingSet, training_set_from_report
from rich.console import Console

from flux_lora.engines.base import Engine
from flux_lora.rules import apply_rules, lora_scale_line
from flux_lora.schema import RunConfig


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    # Config key -> why the engine does not apply it; recorded so no run claims a setting it never used.
    not_applied: dict[str, str] = field(default_factory=dict)
    # Set when an ablation cell would only change options the engine ignores (a silent baseline copy).
    refusal: Optional[str] = None
    dataset_report: Optional[DatasetReport] = None
    gate: Optional[GateResult] = None
    # The (image, caption) pairs that train: what the gate passed is what both engines read.
    training_set: Optional[TrainingSet] = None


def noop_ablation_refusal(run: RunConfig, not_applied: dict[str, str]) -> Optional[str]:
    """A cell whose every declared change is ignored by the engine would duplicate the baseline."""
    changes = run.ablation.changes
    if not changes or run.launch.allow_noop_ablation:
        return None
    ignored = [c for c in changes if any(k == c or k.startswith(c + ".") for k in not_applied)]
    if len(ignored) < len(changes):
        return None
    return (
        f"ablation={run.ablation.name}: every change it declares ({', '.join(changes)}) has no effect with "
        f"engine={run.engine.name.value}, so it would repeat the baseline; use engine=native or set launch.allow_noop_ablation=true"
    )


def check_dataset(run: RunConfig, report: CheckReport) -> None:
    d = run.dataset
    settings = AnalysisSettings(
        resolution=run.profile.resolution,
        trigger=d.trigger,
        caption_extension=d.caption_extension,
        bucket_reso_steps=d.bucket_reso_steps,
        min_bucket_reso=d.min_bucket_reso,
        max_bucket_reso=d.max_bucket_reso,
        blur_threshold=d.analysis.blur_threshold,
        duplicate_max_distance=d.analysis.duplicate_max_distance,
        detect_faces=d.analysis.detect_faces,
        cache_dir=Path(run.paths.cache) / "dataset_analysis",
    )
    try:
        report.dataset_report = analyze_dataset(Path(d.path), settings)
    except DatasetError as exc:
        report.errors.append(f"dataset.path: {exc}")
        return
    g = d.gate
    # The dataset group's gate keys are GateSettings' fields one to one (the dataset tools know no schema).
    gate = evaluate_gate(report.dataset_report, GateSettings(**asdict(g)))
    report.gate = gate
    report.warnings.extend(f"dataset: {w}" for w in gate.warnings)
    if g.enforce:
        fix = " (set dataset.gate.enforce=false to launch anyway)"
        report.errors.extend(f"dataset: {p}{fix}" for p in gate.problems)
    else:
        report.warnings.extend(f"dataset: {p}" for p in gate.problems)
    report.training_set = training_set_from_report(report.dataset_report, d.caption_extension, d.class_tokens, d.num_repeats)
    for example in report.training_set.examples:
        if example.caption_source.startswith("file read as"):
            report.warnings.append(f"dataset: {example.image}: caption {example.caption_source}; save it as UTF-8")
    if not report.training_set.examples:
        report.errors.append(f"dataset.path: no image in {d.path} would train (all unusable or excluded); see dataset_report.json")


def check_run(run: RunConfig, engine: Engine, *, dry_run: bool) -> CheckReport:
    findings = apply_rules(run)
    report = CheckReport(errors=list(findings.errors), warnings=list(findings.warnings))
    report.infos.append(lora_scale_line(run))

    report.not_applied = engine.unapplied_options(run)
    for key, why in report.not_applied.items():
        report.warnings.append(f"{key}: has no effect with engine={run.engine.name.value} and is not passed: {why}")
    report.refusal = noop_ablation_refusal(run, report.not_applied)

    report.warnings.extend(engine.warnings(run))
    missing = engine.missing_requirements(run)
    # Nothing starts in a dry run, so absent weights or checkouts only matter for a real launch.
    (report.warnings if dry_run else report.errors).extend(missing)

    check_dataset(run, report)
    return report


def print_check_report(report: CheckReport, console: Console | None = None) -> None:
    console = console or Console()
    for line in report.infos:
        console.print(f"[cyan]info[/cyan]: {line}", highlight=False, soft_wrap=True)
    for line in report.warnings:
        console.print(f"[yellow]warning[/yellow]: {line}", highlight=False, soft_wrap=True)
    for line in report.errors:
        console.print(f"[red]error[/red]: {line}", highlight=False, soft_wrap=True)
    if report.refusal:
        console.print(f"[red]refused[/red]: {report.refusal}", highlight=False, soft_wrap=True)
