"""Check: everything that must hold before a run is frozen and started.

Config rules (rules.py), what the chosen engine would silently ignore or cannot find, the
ablation no-op guard, the GPUs a CUDA tier needs (gpu_probe.py), and the dataset preflight
(analysis and gate from flux_lora.dataset). Keys outside the schema, the run name and where outputs
land are checked earlier still, before Hydra creates the run directory (LaunchPreflight).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flux_lora.check_report import CheckReport
from flux_lora.checkpoint_files import safetensors_keys
from flux_lora.compose import describe_config_error, raise_on_keys_outside_schema
from flux_lora.dataset import (
    AnalysisSettings,
    DatasetError,
    GateSettings,
    analyze_dataset,
    evaluate_gate,
)
from flux_lora.dataset.regularization import check_class_images
from flux_lora.dataset.training_set import (
    AUTO_HOLD_OUT_MIN_IMAGES,
    AUTO_HOLD_OUT_SHARE,
    CaptionError,
    TrainingSet,
    training_set_from_report,
    with_class_images,
)
from flux_lora.engines.base import Engine
from flux_lora.gpu_probe import GpuProbe, probe_gpus
from flux_lora.identity import config_differences
from flux_lora.lifecycle.states import state_step, state_usability
from flux_lora.models import model_file_problems
from flux_lora.rules import (
    apply_rules,
    held_out_leaves_too_few,
    lora_scale_line,
    plain_stem_problem,
    range_problems,
    recipe_effect_lines,
)
from flux_lora.schema import Accelerator, RunConfig


def noop_ablation_refusal(run: RunConfig, not_applied: dict[str, str]) -> str | None:
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
    try:
        report.training_set = training_set_from_report(
            report.dataset_report,
            d.caption_extension,
            d.class_tokens,
            d.num_repeats,
            d.validation_split,
            d.validation_path,
        )
    except CaptionError as exc:  # refused whatever the gate enforces: it would train on garbage
        report.errors.append(f"dataset.path: {exc}")
        return
    except DatasetError as exc:  # only the validation folder is read here; dataset.path was analysed above
        report.errors.append(f"dataset.validation_path: {exc}")
        return
    check_held_out(run, report.training_set, report)
    if not report.training_set.examples:
        report.errors.append(
            f"dataset.path: no image in {d.path} would train (all unusable or excluded); see dataset_report.json"
        )
    if d.reg_path:
        check_class_images_of(run, settings, report)


def check_class_images_of(run: RunConfig, settings: AnalysisSettings, report: CheckReport) -> None:
    """dataset.reg_path: analysed like the subject's photos (without the trigger checks), checked against them, and
    added to the training set as its `regularization`."""
    d = run.dataset
    try:
        report.reg_report = analyze_dataset(Path(d.reg_path), replace(settings, trigger=""))
    except DatasetError as exc:
        report.errors.append(f"dataset.reg_path: {exc}")
        return
    checked = check_class_images(
        report.reg_report, report.dataset_report, GateSettings(**asdict(d.gate)), d.trigger, d.class_tokens
    )
    report.reg_gate = checked.gate
    report.warnings.extend(f"dataset.reg_path: {w}" for w in checked.gate.warnings)
    fix = " (set dataset.gate.enforce=false to launch anyway)"
    report.errors.extend(f"dataset.reg_path: {p}{fix}" for p in checked.gate.problems)
    report.infos.extend(f"dataset.reg_path: {i}" for i in checked.infos)
    try:
        report.training_set = with_class_images(
            report.training_set,
            report.reg_report,
            d.caption_extension,
            d.class_tokens,
            d.reg_repeats,
            checked.copies_of_subject(),
        )
    except CaptionError as exc:
        report.errors.append(f"dataset.reg_path: {exc}")
        return
    plan = report.training_set.reg_epoch_plan()
    used = sum(1 for _, n in plan if n)
    report.infos.append(
        f"dataset.reg_path: {len(plan)} class image(s), {sum(n for _, n in plan)} places per epoch beside the subject's "
        f"{report.training_set.images_per_epoch} (kohya's rule; {used} of them train), loss weight {d.prior_loss_weight:g}"
    )


def check_held_out(run: RunConfig, training_set: TrainingSet, report: CheckReport) -> None:
    """Say which images are held out for validation, and refuse a hold-out that leaves too little to train."""
    if not training_set.validation:
        if run.dataset.validation_split is None and not run.dataset.validation_path:
            report.infos.append(
                f"dataset: nothing held out for validation (fewer than {AUTO_HOLD_OUT_MIN_IMAGES} distinct images): "
                "an evaluation measures the training images and says so"
            )
        return
    trained = len({e.content_hash for e in training_set.examples})
    problem = held_out_leaves_too_few(run, trained, len(training_set.validation))
    if problem:
        report.errors.append(problem)
        return
    names = ", ".join(Path(e.image).name for e in training_set.validation[:5]) + (
        ", ..." if len(training_set.validation) > 5 else ""
    )
    how = ""
    if run.dataset.validation_split is None and not run.dataset.validation_path:
        how = f" by default ({AUTO_HOLD_OUT_SHARE:.0%} once a dataset has {AUTO_HOLD_OUT_MIN_IMAGES} images; dataset.validation_split=0 trains them all)"
    report.infos.append(
        f"dataset: {len(training_set.validation)} image(s) held out for validation{how}, never trained "
        f"({trained} train): {names}"
    )
    copies = [x for x in training_set.excluded if x["reason"].startswith("near-duplicate of held-out")]
    if copies:
        listed = "; ".join(f"{x['path']} ({x['reason']})" for x in copies[:5]) + ("; ..." if len(copies) > 5 else "")
        report.infos.append(
            f"dataset: {len(copies)} near-duplicate(s) of held-out images kept out of training too: {listed}"
        )


def gpu_visibility_problem(run: RunConfig, probe: GpuProbe) -> str | None:
    """A CUDA tier needs gpu.num_gpus visible CUDA GPUs; accelerate would otherwise fail or fall back to CPU."""
    g = run.gpu
    if not probe.gpus:
        return f"gpu={g.name}: no CUDA GPU visible on this machine ({probe.problem}); use gpu=cpu or run on a GPU node"
    if len(probe.gpus) < g.num_gpus:
        return (
            f"gpu.num_gpus={g.num_gpus}: only {len(probe.gpus)} CUDA GPU(s) visible on this machine (per {probe.source}); "
            f"set gpu.num_gpus={len(probe.gpus)} or run on a node with {g.num_gpus}"
        )
    return None


def outputs_problem(outputs: Path, min_free_gib: float) -> str | None:
    """paths.outputs must be creatable, writable and have room: found now, not after an hour of training."""
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        # Trying is the only honest test: permission bits lie to root and to ACLs, a read-only mount does not show in them.
        with tempfile.TemporaryFile(dir=outputs):
            pass
    except OSError as exc:
        blocker = next((p for p in (outputs, *outputs.parents) if p.exists()), None)
        why = (
            f"{blocker} is a file, not a folder"
            if blocker is not None and not blocker.is_dir()
            else exc.strerror or str(exc)
        )
        return f"paths.outputs={outputs}: cannot write there ({why}); set paths.outputs=<a writable folder>"
    free_gib = shutil.disk_usage(outputs).free / 2**30
    if free_gib < min_free_gib:
        return (
            f"paths.outputs={outputs}: only {free_gib:.2f} GiB free (below {min_free_gib:g} GiB); free some space, "
            "set paths.outputs=<another disk> or lower hydra.callbacks.preflight.min_free_gib"
        )
    return None


class LaunchPreflight(Callback):
    """Before Hydra creates the run (or sweep) directory: no key outside the schema, a plain run name,
    and a paths.outputs that is writable with room left.

    Hydra turns an exception raised by a callback into a warning and goes on, so a problem ends the
    launch here with SystemExit, after printing its one line (exit status 2, as for a config error).
    """

    def __init__(self, min_free_gib: float = 1.0) -> None:
        self.min_free_gib = min_free_gib

    def _check(self, config: DictConfig) -> None:
        try:
            raise_on_keys_outside_schema(config)
        except OmegaConfBaseException as exc:
            self._stop(describe_config_error(exc))
        problem = plain_stem_problem("name", str(config.name)) or outputs_problem(
            Path(config.paths.outputs), self.min_free_gib
        )
        if problem:
            self._stop(problem)

    @staticmethod
    def _stop(line: str) -> None:
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


def check_run(run: RunConfig, engine: Engine, *, dry_run: bool) -> CheckReport:
    if range_problems(run):  # nothing else is computed with a zero rank or resolution
        return CheckReport(errors=range_problems(run))
    findings = apply_rules(run)
    report = CheckReport(errors=list(findings.errors), warnings=list(findings.warnings))
    report.infos.append(lora_scale_line(run))

    report.not_applied = engine.unapplied_options(run)
    # What noise offset and min-SNR do to this run, unless the engine ignores them (its warnings say so).
    report.infos.extend(recipe_effect_lines(run, skip=report.not_applied))
    for key, why in report.not_applied.items():
        report.warnings.append(f"{key}: has no effect with engine={run.engine.name.value} and is not passed: {why}")
    report.refusal = noop_ablation_refusal(run, report.not_applied)

    report.warnings.extend(engine.warnings(run))
    # Plus base-model files that are there but unusable (truncated, a wrong file, fp8 where bf16 is expected): headers only.
    missing = engine.missing_requirements(run) + model_file_problems(run)
    # Nothing starts in a dry run, so absent weights or checkouts only matter for a real launch.
    (report.warnings if dry_run else report.errors).extend(missing)

    if run.gpu.accelerator == Accelerator.cuda:
        gpu_problem = gpu_visibility_problem(run, probe_gpus())
        # A dry run of a cluster config on a laptop must still work; a real launch here would not.
        if gpu_problem:
            (report.warnings if dry_run else report.errors).append(gpu_problem)

    python = run.engine.python
    if python and shutil.which(python) is None:
        report.errors.append(
            f"engine.python={python}: no such executable; set engine.python to the engine venv's python"
        )
    check_dataset(run, report)
    if run.launch.resume_from:
        check_resume_source(run, report)
    if run.launch.init_lora:
        check_init_lora(run, report)
    return report


def check_init_lora(run: RunConfig, report: CheckReport) -> None:
    """launch.init_lora: a readable LoRA file (weights read by the job); its sha256 becomes part of the run's lineage."""
    path = Path(run.launch.init_lora).expanduser()
    if run.launch.resume_from:
        report.errors.append(
            "launch.init_lora: a resumed state already holds its LoRA; set launch.init_lora or launch.resume_from, not both"
        )
        return
    try:
        keys = [k for k in safetensors_keys(path) if k.endswith(("lora_down.weight", "lora_up.weight"))]
    except (OSError, ValueError) as exc:
        report.errors.append(f"launch.init_lora={path}: {exc}; give a LoRA .safetensors file")
        return
    if not keys:
        report.errors.append(f"launch.init_lora={path}: no lora_down/lora_up tensors (not a kohya-format LoRA)")
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    report.init_lora = {"path": str(path.resolve()), "sha256": digest.hexdigest()}
    report.infos.append(
        f"launch.init_lora: the LoRA starts from {path} (sha256 {digest.hexdigest()[:12]}), recorded as lineage"
    )


# Keys a saved LoRA state cannot be loaded across: a different network or base model.
_STATE_SHAPE_KEYS = (
    "model.",
    "profile.network_dim",
    "profile.network_train_unet_only",
    "profile.network_module",
    "engine.name",
)


def check_resume_source(run: RunConfig, report: CheckReport) -> None:
    """launch.resume_from, before any model loads: a usable state, not finished, of the same network and recipe."""
    state = Path(run.launch.resume_from).expanduser()
    problem = state_usability(state) if state.is_dir() else f"{state}: no such folder"
    if problem:
        report.errors.append(f"launch.resume_from={state}: {problem}; choose another *-state folder")
        return
    step = state_step(state) or 0
    if step >= run.profile.max_train_steps:
        report.errors.append(
            f"launch.resume_from={state}: already at step {step} of profile.max_train_steps={run.profile.max_train_steps}; "
            "nothing is left to train"
        )
        return
    source = state.parent.parent / "config.yaml"  # <run dir>/output/<state>
    try:
        source_id = json.loads((state.parent.parent / "run.json").read_text()).get("run_id")
    except (OSError, ValueError):
        source_id = None  # a state from elsewhere: its folder name and step still tell it apart
    record: dict = {
        "state": str(state.resolve()),
        "step": step,
        "run_dir": str(state.parent.parent.resolve()),
        "run_id": source_id,
        "recipe_changes": [],
    }
    report.resume_source = record
    if not source.is_file():
        report.warnings.append(
            f"launch.resume_from={state}: no config.yaml of the run that saved it; recipe changes cannot be checked"
        )
        return
    current = OmegaConf.to_container(OmegaConf.structured(run), enum_to_str=True)
    changed = [
        c for c in config_differences(yaml.safe_load(source.read_text()), current) if not c.startswith("launch.")
    ]
    shape = [c for c in changed if c.startswith(_STATE_SHAPE_KEYS)]
    if shape:
        report.errors.append(
            f"launch.resume_from={state}: saved with another network or model ({'; '.join(shape)}); it cannot be loaded"
        )
    elif changed and not run.launch.allow_recipe_change:
        report.errors.append(
            f"launch.resume_from={state}: the recipe differs from the run that saved it ({'; '.join(changed[:5])}); "
            "restore those values or set launch.allow_recipe_change=true to change them from this step on"
        )
    elif changed:
        record["recipe_changes"] = [f"{c} at step {step}" for c in changed]
        report.warnings.extend(f"recipe changed at step {step}: {c}" for c in changed)
