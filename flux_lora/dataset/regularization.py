"""Class (regularization) images: checked like the subject's photos, and against them.

A class image teaches the model what any member of the class looks like, so the LoRA keeps that prior while it
learns the subject. Two mistakes undo it: a subject photo among the class images (the subject is then taught as the
class: the prior "leaks" towards the subject) and a caption that names the subject's trigger. Both are found here;
the rest are the checks the subject's photos get (decode, size, blur, duplicates, captions). What the subject's
gate asks of a dataset that is about one person (a minimum count, a trigger in every caption, one face) is not asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flux_lora.dataset.captions import contains_trigger
from flux_lora.dataset.flags import FLAGS, severity_of
from flux_lora.dataset.gate import ADVISORY_FLAGS, GateResult, GateSettings
from flux_lora.dataset.report import DatasetReport, ImageRecord

_NAMES_SHOWN = 5
# The subject gate's advisories mean the same for a class image, but for faces, triggers and caption repetition
# (class images are many people, carry no trigger, and "a photo of a woman" for all of them is kohya's own default).
_SUBJECT_ONLY_FLAGS = frozenset(
    {"no_face", "several_faces", "trigger_not_first", "caption_duplicate", "caption_near_duplicate"}
)
_ADVISORY_FLAGS = tuple(flag for flag in ADVISORY_FLAGS if flag not in _SUBJECT_ONLY_FLAGS)


@dataclass(frozen=True)
class SubjectCopy:
    class_image: str  # relative to the class-image folder
    subject_image: str  # relative to the subject's dataset folder
    distance: int  # pHash bits apart (mirrored copies included); 0 for identical bytes


@dataclass
class ClassImagesCheck:
    gate: GateResult
    copies: list[SubjectCopy] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)

    def copies_of_subject(self) -> dict[str, str]:
        """Class image -> the subject photo it copies (the first found)."""
        found: dict[str, str] = {}
        for copy in self.copies:
            found.setdefault(copy.class_image, copy.subject_image)
        return found


def _names(paths: list[str]) -> str:
    return ", ".join(paths[:_NAMES_SHOWN]) + (
        f" (+{len(paths) - _NAMES_SHOWN} more)" if len(paths) > _NAMES_SHOWN else ""
    )


def subject_copies(class_images: DatasetReport, subject: DatasetReport, max_distance: int) -> list[SubjectCopy]:
    """Class images that are a subject photo: the same bytes, or a perceptual hash (or its mirror's) within the
    analysis's duplicate distance, as a resized, re-encoded, mirrored or lightly cropped copy is."""
    subject_hashes = {r.content_hash: r.path for r in subject.images}
    hashed = [(r.path, int(r.phash, 16)) for r in subject.images if r.phash]
    copies = []
    for record in class_images.images:
        if record.content_hash in subject_hashes:
            copies.append(SubjectCopy(record.path, subject_hashes[record.content_hash], 0))
            continue
        if not record.phash:
            continue
        direct, mirrored = int(record.phash, 16), int(record.phash_mirrored, 16)
        distance, photo = min(
            ((min((direct ^ h).bit_count(), (mirrored ^ h).bit_count()), p) for p, h in hashed), default=(None, None)
        )
        if distance is not None and distance <= max_distance:
            copies.append(SubjectCopy(record.path, photo, distance))
    return copies


def _with_any(images: list[ImageRecord], flags: tuple[str, ...]) -> list[ImageRecord]:
    return [image for image in images if any(flag in image.flags for flag in flags)]


def check_class_images(
    class_images: DatasetReport, subject: DatasetReport, gate: GateSettings, trigger: str, class_tokens: str
) -> ClassImagesCheck:
    """Problems (refused when gate.enforce), warnings and infos for a class-image folder, and its copies of the subject."""
    problems: list[str] = []
    warnings: list[str] = []
    infos: list[str] = []
    usable = class_images.usable_images
    unusable = [image for image in class_images.images if image.unusable]
    if len(unusable) > gate.max_unreadable:
        details = "; ".join(
            f"{i.path} ({', '.join(FLAGS[f].meaning for f in i.flags if severity_of(f) == 'error')})"
            for i in unusable[:_NAMES_SHOWN]
        )
        problems.append(
            f"{len(unusable)} unreadable or unsupported class images (max {gate.max_unreadable}): {details}"
        )
    if not usable:
        problems.append("no usable class image: add images of the class, or drop dataset.reg_path")
    copies = subject_copies(class_images, subject, int(class_images.settings.get("duplicate_max_distance", 6)))
    if copies:
        listed = "; ".join(f"{c.class_image} = {c.subject_image}" for c in copies[:_NAMES_SHOWN])
        problems.append(
            f"{len(copies)} class image(s) copy a subject photo (the subject would be taught as the class; "
            f"they never train): {listed}"
        )
    with_trigger = [i.path for i in usable if i.caption.text and trigger and contains_trigger(i.caption.text, trigger)]
    if with_trigger:
        problems.append(
            f"{len(with_trigger)} class-image caption(s) name the trigger '{trigger}' (the class prior would "
            f"learn the subject's token): {_names(with_trigger)}; caption them with the class only"
        )
    blurry = [i.path for i in usable if "blurry" in i.flags]
    if usable and len(blurry) / len(usable) > gate.max_blurry_share:
        problems.append(
            f"{len(blurry)} of {len(usable)} class images are blurry (max {gate.max_blurry_share:.0%}): {_names(blurry)}"
        )
    elif blurry:
        warnings.append(f"{len(blurry)} blurry class images: {_names(blurry)}")
    if len(class_images.duplicate_groups) > gate.max_duplicate_groups:
        groups = "; ".join(" = ".join(group) for group in class_images.duplicate_groups[:_NAMES_SHOWN])
        problems.append(
            f"{len(class_images.duplicate_groups)} groups of near-duplicate class images (max "
            f"{gate.max_duplicate_groups}): {groups}"
        )
    for flag in _ADVISORY_FLAGS:
        flagged = [i.path for i in class_images.images if flag in i.flags]
        if flagged:
            warnings.append(
                f"{len(flagged)} class images: {FLAGS[flag].meaning} ({FLAGS[flag].fix}): {_names(flagged)}"
            )
    uncaptioned = [i.path for i in usable if not i.caption.text]
    if uncaptioned:
        infos.append(
            f"{len(uncaptioned)} class image(s) without a caption train as the class tokens '{class_tokens}' (as in kohya)"
        )
    if class_images.nested_images:
        warnings.append(
            f"{len(class_images.nested_images)} class images more than one folder deep are not trained: "
            f"{_names(class_images.nested_images)}"
        )
    warnings = [f"class images: {w}" for w in warnings]
    if not gate.enforce:
        return ClassImagesCheck(GateResult(passed=True, warnings=problems + warnings), copies, infos)
    return ClassImagesCheck(GateResult(passed=not problems, problems=problems, warnings=warnings), copies, infos)
