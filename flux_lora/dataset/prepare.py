"""Prepare a clean copy of a dataset in a new folder; the original is only read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from flux_lora.dataset.analyze import AnalysisSettings, analyze_dataset
from flux_lora.dataset.captions import contains_trigger
from flux_lora.dataset.decode import decode_image
from flux_lora.dataset.discover import DatasetError
from flux_lora.dataset.fingerprint import hash_file
from flux_lora.dataset.report import ImageRecord

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class PrepareSettings:
    trigger: str  # inserted at the start of captions that lack it; empty inserts nothing
    crop_aspect: float | None = None  # width / height of face-centred crops; None keeps the full frame
    drop_duplicates: bool = True  # keep only the sharpest image of each near-duplicate group
    jpeg_quality: int = 95  # with 4:4:4 chroma, visually lossless for training
    caption_extension: str = ".txt"


def parse_aspect(text: str) -> float:
    """'3:4', '1:1' or '0.75' as width / height."""
    try:
        if ":" in text:
            width, height = (float(part) for part in text.split(":", 1))
            aspect = width / height
        else:
            aspect = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"crop aspect '{text}' is not W:H or a number such as 3:4 or 0.75") from None
    if not 0.2 <= aspect <= 5:
        raise ValueError(f"crop aspect '{text}' is outside 1:5 to 5:1")
    return aspect


def face_centred_crop_box(
    width: int, height: int, aspect: float, faces: list[dict] | None
) -> tuple[int, int, int, int]:
    """Largest box of the given aspect inside the image, centred on the largest face (or the image) and kept inside."""
    if width / height > aspect:
        crop_width, crop_height = round(height * aspect), height
    else:
        crop_width, crop_height = width, round(width / aspect)
    if faces:
        face = faces[0]
        centre_x = (face["x"] + face["w"] / 2) * width
        centre_y = (face["y"] + face["h"] / 2) * height
    else:
        centre_x, centre_y = width / 2, height / 2
    left = int(min(max(centre_x - crop_width / 2, 0), width - crop_width))
    top = int(min(max(centre_y - crop_height / 2, 0), height - crop_height))
    return left, top, left + crop_width, top + crop_height


def _check_destination(source: Path, destination: Path) -> None:
    source_resolved, destination_resolved = source.resolve(), destination.resolve()
    if destination_resolved == source_resolved or source_resolved in destination_resolved.parents:
        raise DatasetError(f"output folder {destination} is inside the dataset {source}: choose a folder outside it")
    if destination_resolved in source_resolved.parents:
        raise DatasetError(f"output folder {destination} contains the dataset {source}: choose a new, empty folder")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise DatasetError(f"output folder {destination} already exists and is not empty: choose a new folder")


def _caption_text(source_caption: Path, record: ImageRecord) -> tuple[str, list[str]]:
    """The caption to write and what was done to it."""
    actions = []
    if record.caption.text is not None:
        return record.caption.text, actions
    if "caption_not_utf8" in record.caption.flags:
        actions.append("caption_reencoded_from_latin1")  # the usual culprit: a Windows editor's cp1252/latin-1
        return source_caption.read_bytes().decode("latin-1").strip(), actions
    return "", actions


def _with_trigger(text: str, trigger: str) -> tuple[str, bool]:
    if not trigger or contains_trigger(text, trigger):
        return text, False
    return (f"{trigger}, {text}" if text else trigger), True


def _unique_output(relative: str, taken: set[str]) -> str:
    candidate = Path(relative).with_suffix(".jpg").as_posix()
    counter = 1
    while candidate.lower() in taken:  # photo.png and photo.jpg would both become photo.jpg
        candidate = Path(relative).with_name(f"{Path(relative).stem}-{counter}.jpg").as_posix()
        counter += 1
    taken.add(candidate.lower())
    return candidate


def prepare_dataset(
    source: Path, destination: Path, settings: PrepareSettings, analysis: AnalysisSettings | None = None
) -> dict:
    """Write a cleaned copy of source into destination and return its manifest (also written as manifest.json)."""
    source, destination = Path(source), Path(destination)
    _check_destination(source, destination)
    analysis = analysis or AnalysisSettings(
        resolution=512, trigger=settings.trigger, caption_extension=settings.caption_extension
    )
    report = analyze_dataset(source, analysis)
    dropped_as_duplicate = (
        {path: group[0] for group in report.duplicate_groups for path in group[1:]} if settings.drop_duplicates else {}
    )

    destination.mkdir(parents=True, exist_ok=True)
    files, dropped, taken = [], [], set()
    for record in report.images:
        if record.path in dropped_as_duplicate:
            dropped.append(
                {"source": record.path, "reason": f"near-duplicate of the sharper {dropped_as_duplicate[record.path]}"}
            )
            continue
        decoded = decode_image(source / record.path)
        if decoded.rgb is None:
            dropped.append({"source": record.path, "reason": record.error or "cannot be decoded"})
            continue
        actions = [
            flag for flag in ("exif_rotated", "cmyk", "16_bit", "alpha", "unsupported_format") if flag in decoded.flags
        ]
        image = Image.fromarray(decoded.rgb)
        if settings.crop_aspect is not None:
            box = face_centred_crop_box(image.width, image.height, settings.crop_aspect, record.faces)
            if box != (0, 0, image.width, image.height):
                image = image.crop(box)
                actions.append("face_centred_crop" if record.faces else "centre_crop")
        output = _unique_output(record.path, taken)
        output_path = destination / output
        output_path.parent.mkdir(parents=True, exist_ok=True)
        image.save(output_path, format="JPEG", quality=settings.jpeg_quality, subsampling=0)

        source_caption = (source / record.path).with_suffix(settings.caption_extension)
        text, caption_actions = _caption_text(source_caption, record)
        text, inserted = _with_trigger(text, settings.trigger)
        actions.extend(caption_actions + (["trigger_inserted"] if inserted else []))
        caption_output = Path(output).with_suffix(settings.caption_extension).as_posix()
        (destination / caption_output).write_text(text + "\n", encoding="utf-8")
        files.append(
            {
                "output": output,
                "output_hash": hash_file(output_path)[0],
                "caption_output": caption_output,
                "caption_hash": hash_file(destination / caption_output)[0],
                "source": record.path,
                "source_hash": record.content_hash,
                "source_caption": record.caption.path,
                "width": image.width,
                "height": image.height,
                "actions": actions,
            }
        )

    manifest = {
        "source": str(source.resolve()),
        "source_fingerprint": report.fingerprint["content_hash"],
        "hash_algorithm": report.fingerprint["algorithm"],
        "settings": {
            "trigger": settings.trigger,
            "crop_aspect": settings.crop_aspect,
            "drop_duplicates": settings.drop_duplicates,
            "jpeg_quality": settings.jpeg_quality,
        },
        "files": files,
        "dropped": dropped,
    }
    (destination / MANIFEST_NAME).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest
