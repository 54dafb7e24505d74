"""The preflight gate: dataset thresholds that stop a launch before any GPU time is spent."""

from __future__ import annotations

from dataclasses import dataclass, field

from flux_lora.dataset.flags import FLAGS
from flux_lora.dataset.report import DatasetReport, ImageRecord

_NAMES_SHOWN = 5
_UNUSABLE_FLAGS = tuple(flag for flag, info in FLAGS.items() if info.severity == "error")
_MISSING_CAPTION_FLAGS = ("caption_missing", "caption_empty", "caption_not_utf8")
# Warnings that the gate reports but never counts against a launch: each is worth a look, none is fatal alone.
ADVISORY_FLAGS = (
    "exif_rotated",
    "cmyk",
    "16_bit",
    "alpha",
    "greyscale",
    "extension_mismatch",
    "upscaled",
    "extreme_aspect",
    "no_face",
    "several_faces",
    "trigger_not_first",
    "caption_bom",
    "caption_too_long_clip",
    "caption_too_long_t5",
    "caption_duplicate",
    "caption_near_duplicate",
)


@dataclass(frozen=True)
class GateSettings:
    enforce: bool = True  # False = failing checks become warnings
    min_images: int = 5
    max_blurry_share: float = 0.2
    max_duplicate_groups: int = 0
    max_missing_captions: int = 0
    max_missing_trigger: int = 0
    max_unreadable: int = 0


@dataclass
class GateResult:
    passed: bool
    problems: list[str] = field(default_factory=list)  # one short line each, naming the files
    warnings: list[str] = field(default_factory=list)


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:_NAMES_SHOWN])
    return shown + (f" (+{len(paths) - _NAMES_SHOWN} more)" if len(paths) > _NAMES_SHOWN else "")


def _paths(images: list[ImageRecord]) -> list[str]:
    return [image.path for image in images]


def _unusable_reason(image: ImageRecord) -> str:
    if image.error:
        return image.error
    return ", ".join(FLAGS[flag].meaning for flag in image.flags if flag in _UNUSABLE_FLAGS)


def _with_any(report: DatasetReport, flags: tuple[str, ...]) -> list[ImageRecord]:
    return [image for image in report.images if any(flag in image.flags for flag in flags)]


def evaluate_gate(report: DatasetReport, gate: GateSettings) -> GateResult:
    """Check the report against the thresholds; with enforce off, every failed check is only a warning."""
    problems: list[str] = []
    warnings: list[str] = []
    usable = report.usable_images

    unusable = _with_any(report, _UNUSABLE_FLAGS)
    if len(unusable) > gate.max_unreadable:
        details = "; ".join(f"{image.path} ({_unusable_reason(image)})" for image in unusable[:_NAMES_SHOWN])
        more = f" (+{len(unusable) - _NAMES_SHOWN} more)" if len(unusable) > _NAMES_SHOWN else ""
        problems.append(f"{len(unusable)} unreadable or unsupported files (max {gate.max_unreadable}): {details}{more}")
    if len(usable) < gate.min_images:
        problems.append(f"only {len(usable)} usable images (min {gate.min_images}): add more photos of the subject")

    blurry = [image for image in usable if "blurry" in image.flags]
    if usable and len(blurry) / len(usable) > gate.max_blurry_share:
        problems.append(
            f"{len(blurry)} of {len(usable)} images are blurry (max {gate.max_blurry_share:.0%}): {_names(_paths(blurry))}"
        )
    elif blurry:
        warnings.append(f"{len(blurry)} blurry images: {_names(_paths(blurry))}")

    if len(report.duplicate_groups) > gate.max_duplicate_groups:
        groups = "; ".join(" = ".join(group) for group in report.duplicate_groups[:_NAMES_SHOWN])
        problems.append(
            f"{len(report.duplicate_groups)} groups of near-duplicate images (max {gate.max_duplicate_groups}): {groups}"
        )

    missing_captions = _with_any(report, _MISSING_CAPTION_FLAGS)
    if len(missing_captions) > gate.max_missing_captions:
        problems.append(
            f"{len(missing_captions)} images without a usable caption (max {gate.max_missing_captions}): "
            f"{_names(_paths(missing_captions))}"
        )
    trigger = report.settings.get("trigger") or ""
    missing_trigger = report.with_flag("trigger_missing")
    if len(missing_trigger) > gate.max_missing_trigger:
        problems.append(
            f"{len(missing_trigger)} captions lack the trigger '{trigger}' (max {gate.max_missing_trigger}): "
            f"{_names(_paths(missing_trigger))}"
        )

    for flag in ADVISORY_FLAGS:
        flagged = report.with_flag(flag)
        if flagged:
            warnings.append(f"{len(flagged)} {FLAGS[flag].meaning} ({FLAGS[flag].fix}): {_names(_paths(flagged))}")
    for hint in report.leakage_hints:
        warnings.append(
            f"'{hint['word']}' is in {hint['captions']} captions ({hint['share']:.0%}): something in most photos is "
            "learned as part of the identity; add photos without it"
        )
    if report.orphan_captions:
        warnings.append(f"{len(report.orphan_captions)} captions without an image: {_names(report.orphan_captions)}")
    if report.links_outside:
        warnings.append(
            f"{len(report.links_outside)} file(s) are links out of the dataset folder (they train, but the folder "
            f"alone is not the dataset): {'; '.join(report.links_outside[:5])}"
        )
    if report.nested_images:
        warnings.append(
            f"{len(report.nested_images)} images more than one folder deep are not trained (each direct subfolder is "
            f"one subset; move them up a level): {_names(report.nested_images)}"
        )

    if not gate.enforce:
        return GateResult(passed=True, problems=[], warnings=problems + warnings)
    return GateResult(passed=not problems, problems=problems, warnings=warnings)
