"""The training set: which (image, caption) pairs train, decided once for the whole pipeline.

The preflight, the fingerprint, the run id, the native trainer and the sd-scripts dataset view all
read this list, so what was checked is what trains. Rules:
  - images in the dataset folder and its direct subfolders (discover.py); one subset per folder;
    a folder named `N_name` (kohya's DreamBooth convention) repeats its images N times;
  - hidden files, unsupported formats and images the analysis found unusable never train;
  - the caption is the caption file's text, UTF-8 without NUL bytes (anything else is refused with the file
    named, whatever the gate enforces); a missing or empty caption trains as the class tokens, as sd-scripts does;
  - images held out for validation (dataset.validation_split, by default 10% once there are 8 images, or
    dataset.validation_path) never train, under any file name: they are listed apart, in `validation`, for the
    evaluator; a near-duplicate of a held-out image (the analysis's duplicate groups) does not train either;
  - class images (dataset.reg_path) are listed apart, in `regularization`, selected by the same rules (a missing
    caption trains as the class tokens); one that copies a subject photo never trains (it would teach the subject
    as the class). Each epoch they fill as many places as the subject's images with repeats, by kohya's rule
    (`reg_epoch_plan`), which both engines follow: sd-scripts by itself, the native engine from this list.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import blake3

from flux_lora.dataset.captions import escape_control_characters, has_control_characters
from flux_lora.dataset.discover import SUPPORTED_IMAGE_EXTENSIONS, DatasetError, caption_path_for, discover_dataset
from flux_lora.dataset.fingerprint import hash_file
from flux_lora.dataset.flags import severity_of
from flux_lora.dataset.report import DatasetReport

# kohya's DreamBooth folder convention: "10_name" repeats its images 10 times per epoch.
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
TRAINING_SET_FILE = "training_set.json"


@dataclass(frozen=True)
class TrainingExample:
    image: str  # posix path relative to the dataset folder
    content_hash: str  # blake3 of the image bytes
    caption: str  # the text that trains, never empty
    caption_source: str  # "file" or "class tokens: ..."
    subset: str  # folder relative to the dataset folder; "" for the folder itself
    repeats: int


@dataclass(frozen=True)
class TrainingSet:
    root: str  # absolute dataset folder
    examples: list[TrainingExample]
    excluded: list[dict] = field(default_factory=list)  # {"path", "reason"} for images that do not train
    # Held out for validation, never trained. From dataset.validation_split: paths relative to root, like
    # `examples`; from dataset.validation_path: absolute paths (image_path serves both).
    validation: list[TrainingExample] = field(default_factory=list)
    # Class images (dataset.reg_path): paths relative to reg_root; trained with dataset.prior_loss_weight, never validated.
    reg_root: str | None = None
    regularization: list[TrainingExample] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        """What the run id uses: every trained image by content, its caption text and its repeats, and the held-out
        images (a run holding out other images is another run; without any the hash is what it always was)."""
        hasher = blake3.blake3()
        for e in sorted(self.examples, key=lambda e: e.image):
            hasher.update(
                json.dumps([e.image, e.content_hash, e.caption, e.repeats], ensure_ascii=False).encode() + b"\n"
            )
        for e in sorted(self.validation, key=lambda e: e.image):
            hasher.update(
                json.dumps(["validation", e.image, e.content_hash, e.caption], ensure_ascii=False).encode() + b"\n"
            )
        for e in sorted(self.regularization, key=lambda e: e.image):
            hasher.update(
                json.dumps(["class", e.image, e.content_hash, e.caption, e.repeats], ensure_ascii=False).encode()
                + b"\n"
            )
        return hasher.hexdigest()

    def subsets(self) -> dict[str, list[TrainingExample]]:
        return _by_subset(self.examples)

    def reg_subsets(self) -> dict[str, list[TrainingExample]]:
        return _by_subset(self.regularization)

    def image_path(self, example: TrainingExample) -> Path:
        return Path(self.root) / example.image

    def reg_image_path(self, example: TrainingExample) -> Path:
        return Path(self.reg_root or "") / example.image

    @property
    def images_per_epoch(self) -> int:
        return sum(e.repeats for e in self.examples)

    def reg_epoch_plan(self) -> list[tuple[TrainingExample, int]]:
        """Each class image with the times it trains per epoch, in the order sd-scripts registers them (subset folders
        in order, then file names): kohya's DreamBoothDataset gives the class images as many places per epoch as the
        subject's images with repeats, each its repeats in turn until they are filled (the rest never train), or,
        when they run out first, one more repeat each in turn (library/train_util.py, "reg images")."""
        ordered = [
            e for _, subset in self.reg_subsets().items() for e in sorted(subset, key=lambda e: Path(e.image).name)
        ]
        counts = [0] * len(ordered)
        places, filled, first_pass = self.images_per_epoch, 0, True
        while ordered and filled < places:
            for index, example in enumerate(ordered):
                added = example.repeats if first_pass else 1
                counts[index] += added
                filled += added
                if filled >= places:
                    break
            first_pass = False
        return list(zip(ordered, counts))

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "content_hash": self.content_hash,
            "n_examples": len(self.examples),
            "n_images_per_epoch": self.images_per_epoch,
            "examples": [asdict(e) for e in self.examples],
            "excluded": self.excluded,
            "n_validation": len(self.validation),
            "validation": [asdict(e) for e in self.validation],
            **self._regularization_dict(),
        }

    def _regularization_dict(self) -> dict:
        if self.reg_root is None:
            return {}  # a run without class images writes what it always wrote
        plan = self.reg_epoch_plan()
        return {
            "reg_root": self.reg_root,
            "n_regularization": len(self.regularization),
            "n_reg_images_per_epoch": sum(n for _, n in plan),
            # kohya's order, with the times each trains per epoch (0: never, the subject's places were filled first)
            "regularization": [asdict(e) | {"per_epoch": n} for e, n in plan],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> TrainingSet:
        def example(entry: dict) -> TrainingExample:
            return TrainingExample(**{k: v for k, v in entry.items() if k != "per_epoch"})

        return cls(
            root=data["root"],
            examples=[example(e) for e in data["examples"]],
            excluded=data.get("excluded", []),
            validation=[example(e) for e in data.get("validation", [])],
            reg_root=data.get("reg_root"),
            regularization=[example(e) for e in data.get("regularization", [])],
        )

    @classmethod
    def read_json(cls, path: Path) -> TrainingSet:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _by_subset(examples: list[TrainingExample]) -> dict[str, list[TrainingExample]]:
    by_subset: dict[str, list[TrainingExample]] = {}
    for example in examples:
        by_subset.setdefault(example.subset, []).append(example)
    return dict(sorted(by_subset.items()))


def subset_repeats(subset: str, default_repeats: int) -> int:
    match = REPEATS_FOLDER.match(Path(subset).name) if subset else None
    return int(match.group(1)) if match and int(match.group(1)) > 0 else default_repeats


class CaptionError(DatasetError):
    """A caption file that cannot train as written, whatever dataset.gate.enforce says."""


def read_training_caption(caption_file: Path, class_tokens: str) -> tuple[str, str]:
    """(caption text, where it came from) for one image. Text that is not UTF-8 (a UTF-16 or cp1252 file) or holds a
    NUL byte is refused: read any other way it would train on garbage the tokenizer never warns about."""
    if not caption_file.is_file():
        return class_tokens, "class tokens: no caption file"
    raw = caption_file.read_bytes()
    fix = f"save it as UTF-8 text (python -m flux_lora.dataset prepare {caption_file.parent} OUT writes a UTF-8 copy)"
    try:
        text, source = raw.decode("utf-8-sig"), "file"
    except UnicodeDecodeError as exc:
        raise CaptionError(
            f"{caption_file}: caption is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); {fix}"
        ) from None
    if "\x00" in text:
        raise CaptionError(f"{caption_file}: caption holds a NUL byte at offset {raw.index(0)}; {fix}")
    if has_control_characters(text):
        where = next(i for i, c in enumerate(text) if has_control_characters(c))
        raise CaptionError(
            f"{escape_control_characters(str(caption_file))}: caption holds a control character "
            f"({escape_control_characters(text[where])} at character {where}), as in a terminal escape sequence; remove it "
            f"(python -m flux_lora.dataset prepare {caption_file.parent} OUT writes a copy with it escaped)"
        )
    text = " ".join(text.split())
    if not text:
        return class_tokens, "class tokens: empty caption file"
    return text, source


def _select(
    root: Path,
    images: list[str],
    hashes: dict[str, str],
    unusable: dict[str, str],
    caption_extension: str,
    class_tokens: str,
    default_repeats: int,
) -> TrainingSet:
    examples: list[TrainingExample] = []
    excluded: list[dict] = []
    for relative in images:
        if Path(relative).suffix.lower() not in SUPPORTED_IMAGE_EXTENSIONS:
            excluded.append({"path": relative, "reason": "format the trainers do not read"})
            continue
        if relative in unusable:
            excluded.append({"path": relative, "reason": unusable[relative]})
            continue
        caption, source = read_training_caption(caption_path_for(root / relative, caption_extension), class_tokens)
        subset = Path(relative).parent.as_posix()
        subset = "" if subset == "." else subset
        examples.append(
            TrainingExample(
                relative, hashes[relative], caption, source, subset, subset_repeats(subset, default_repeats)
            )
        )
    return TrainingSet(root=str(root.resolve()), examples=examples, excluded=excluded)


# dataset.validation_split=null (the default) holds this share out once a dataset has AUTO_HOLD_OUT_MIN_IMAGES
# distinct images: a validation loss on the training photos rewards memorising them. Below that, every photo trains
# and the evaluation says it measured the training images.
AUTO_HOLD_OUT_SHARE = 0.1
AUTO_HOLD_OUT_MIN_IMAGES = 8


def effective_validation_split(validation_split: float | None, distinct_images: int) -> float:
    """The share that is held out: the configured one, or for null the automatic one for this many images."""
    if validation_split is not None:
        return validation_split
    return AUTO_HOLD_OUT_SHARE if distinct_images >= AUTO_HOLD_OUT_MIN_IMAGES else 0.0


def held_out_count(distinct_images: int, validation_split: float) -> int:
    """How many images a validation split holds out: the share rounded down, at least one when the share is > 0."""
    return max(1, int(distinct_images * validation_split)) if validation_split > 0 else 0


def split_by_content(examples: list[TrainingExample], validation_split: float | None) -> list[TrainingExample]:
    """The held-out examples: the images with the lowest content hashes, so every run of the same images holds out the
    same ones whatever their names or order, and a larger split holds out a superset of a smaller one."""
    hashes = sorted({e.content_hash for e in examples})
    chosen = set(hashes[: held_out_count(len(hashes), effective_validation_split(validation_split, len(hashes)))])
    first = {}
    for example in examples:  # one example per image: a copy in a second subset would be validated twice
        if example.content_hash in chosen:
            first.setdefault(example.content_hash, example)
    return list(first.values())


def hold_out(
    training_set: TrainingSet,
    caption_extension: str,
    class_tokens: str,
    validation_split: float | None,
    validation_path: str | Path | None,
) -> TrainingSet:
    """The training set with its validation images moved to `validation`: a folder's images when validation_path
    is given, else the validation_split share of its own (null: the automatic share). An example whose image content
    is held out never trains."""
    if validation_path:
        folder = training_set_from_folder(Path(validation_path), caption_extension, class_tokens)
        validation = [replace(e, image=folder.image_path(e).as_posix()) for e in folder.examples]
    else:
        validation = split_by_content(training_set.examples, validation_split)
    held = {e.content_hash for e in validation}
    return replace(
        training_set, examples=[e for e in training_set.examples if e.content_hash not in held], validation=validation
    )


def training_set_from_report(
    report: DatasetReport,
    caption_extension: str,
    class_tokens: str,
    default_repeats: int,
    validation_split: float | None = 0.0,
    validation_path: str | Path | None = None,
) -> TrainingSet:
    """The training set of an analysed dataset: the report's images minus those it found unusable and those held out."""
    root = Path(report.dataset_path)
    unusable = {r.path: ", ".join(f for f in r.flags if severity_of(f) == "error") for r in report.images if r.unusable}
    hashes = {r.path: r.content_hash for r in report.images}
    selected = _select(
        root, [r.path for r in report.images], hashes, unusable, caption_extension, class_tokens, default_repeats
    )
    nested = [{"path": p, "reason": "more than one folder deep"} for p in report.nested_images]
    selected = TrainingSet(root=selected.root, examples=selected.examples, excluded=selected.excluded + nested)
    return without_near_copies_of_held_out(
        hold_out(selected, caption_extension, class_tokens, validation_split, validation_path), report.duplicate_groups
    )


def without_near_copies_of_held_out(training_set: TrainingSet, duplicate_groups: list[list[str]]) -> TrainingSet:
    """A resized, re-encoded or slightly cropped copy of a held-out photo would teach the LoRA the very picture it is
    validated on: an image in a near-duplicate group (the analysis's perceptual hashes) with a held-out one never trains."""
    held = {e.image for e in training_set.validation}
    copy_of = {}
    for group in duplicate_groups:
        original = next((path for path in group if path in held), None)
        if original is not None:
            copy_of.update({path: original for path in group if path not in held})
    if not copy_of:
        return training_set
    kept = [e for e in training_set.examples if e.image not in copy_of]
    excluded = [
        {"path": e.image, "reason": f"near-duplicate of held-out {copy_of[e.image]}"}
        for e in training_set.examples
        if e.image in copy_of
    ]
    return replace(training_set, examples=kept, excluded=training_set.excluded + excluded)


def training_set_from_folder(
    root: Path,
    caption_extension: str,
    class_tokens: str,
    default_repeats: int = 1,
    validation_split: float | None = 0.0,
    validation_path: str | Path | None = None,
) -> TrainingSet:
    """The same selection without the analysis (no decoding): for tools and tests that train a folder directly."""
    files = discover_dataset(Path(root), caption_extension)
    relatives = [files.relative(p) for p in files.images]
    hashes = {files.relative(p): hash_file(p)[0] for p in files.images}
    selected = _select(files.root, relatives, hashes, {}, caption_extension, class_tokens, default_repeats)
    nested = [{"path": files.relative(p), "reason": "more than one folder deep"} for p in files.nested_images]
    selected = TrainingSet(root=selected.root, examples=selected.examples, excluded=selected.excluded + nested)
    return hold_out(selected, caption_extension, class_tokens, validation_split, validation_path)


def with_class_images(
    training_set: TrainingSet,
    report: DatasetReport,
    caption_extension: str,
    class_tokens: str,
    reg_repeats: int,
    copies_of_subject: dict[str, str],
) -> TrainingSet:
    """The training set with the analysed class-image folder as its `regularization`: the images the analysis found
    usable, captions as for the subject's (missing: the class tokens), minus copies of subject photos
    (`copies_of_subject`: class image -> the subject photo it copies), which would teach the subject as the class."""
    root = Path(report.dataset_path)
    unusable = {r.path: ", ".join(f for f in r.flags if severity_of(f) == "error") for r in report.images if r.unusable}
    unusable.update({path: f"copy of subject photo {photo}" for path, photo in copies_of_subject.items()})
    hashes = {r.path: r.content_hash for r in report.images}
    selected = _select(
        root, [r.path for r in report.images], hashes, unusable, caption_extension, class_tokens, reg_repeats
    )
    excluded = selected.excluded + [{"path": p, "reason": "more than one folder deep"} for p in report.nested_images]
    return replace(
        training_set,
        reg_root=selected.root,
        regularization=selected.examples,
        excluded=training_set.excluded + [x | {"set": "regularization"} for x in excluded],
    )
