"""The analysis result: one record per image plus dataset-wide findings, JSON-able for the run snapshot."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flux_lora.dataset.captions import CaptionRecord
from flux_lora.dataset.flags import FLAGS, severity_of
from flux_lora.redaction import redact


@dataclass
class ImageRecord:
    path: str  # relative posix path inside the dataset folder
    bytes: int
    content_hash: str
    format: str | None
    mode: str | None
    width: int | None  # after EXIF orientation
    height: int | None
    exif_orientation: int
    error: str | None
    blur_score: float | None
    phash: str | None
    phash_mirrored: str | None
    faces: list[dict] | None  # boxes in fractions of width/height, largest first; None when detection was off
    caption: CaptionRecord
    bucket: tuple[int, int] | None = None
    upscale_factor: float | None = None
    flags: list[str] = field(default_factory=list)  # image and caption flags, see flags.FLAGS

    @property
    def unusable(self) -> bool:
        return any(severity_of(flag) == "error" for flag in self.flags)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["bucket"] = list(self.bucket) if self.bucket else None
        return record


@dataclass
class DatasetReport:
    dataset_path: str
    settings: dict
    images: list[ImageRecord]
    orphan_captions: list[str]
    duplicate_groups: list[list[str]]  # best copy first (see analyze._keep_order): the one prepare keeps
    identical_caption_groups: list[list[str]]
    near_identical_caption_groups: list[list[str]]
    leakage_hints: list[dict]
    fingerprint: dict
    analysis: dict  # how the analysis ran: seconds, cache hits, workers
    nested_images: list[str] = field(default_factory=list)  # more than one folder deep: not trained
    links_outside: list[str] = field(default_factory=list)  # `relative -> target`: links out of the dataset folder
    thumbnails: dict[str, bytes] = field(default_factory=dict, repr=False)  # by content hash; not serialised
    thumbnail_lookup: Any = field(default=None, repr=False)  # callable(content_hash) -> bytes | None, e.g. the cache

    def with_flag(self, flag: str) -> list[ImageRecord]:
        return [image for image in self.images if flag in image.flags]

    @property
    def usable_images(self) -> list[ImageRecord]:
        return [image for image in self.images if not image.unusable]

    def thumbnail(self, image: ImageRecord) -> bytes | None:
        found = self.thumbnails.get(image.content_hash)
        if found is None and self.thumbnail_lookup is not None:
            found = self.thumbnail_lookup(image.content_hash)
        return found

    def summary(self) -> dict:
        usable = self.usable_images
        widths = [image.width for image in usable if image.width]
        heights = [image.height for image in usable if image.height]
        aspects = [w / h for w, h in zip(widths, heights)]
        blur = [image.blur_score for image in usable if image.blur_score is not None]
        flag_counts = Counter(flag for image in self.images for flag in image.flags)
        buckets = Counter(f"{image.bucket[0]}x{image.bucket[1]}" for image in usable if image.bucket)

        def spread(values: list[float], digits: int = 0) -> dict | None:
            if not values:
                return None
            return {
                "min": round(min(values), digits or None),
                "median": round(statistics.median(values), digits or None),
                "max": round(max(values), digits or None),
            }

        return {
            "n_images": len(self.images),
            "n_usable": len(usable),
            "n_captions": sum(1 for image in self.images if image.caption.path),
            "flag_counts": {flag: flag_counts[flag] for flag in FLAGS if flag_counts[flag]},
            "width": spread(widths),
            "height": spread(heights),
            "aspect": spread(aspects, 3),
            "blur_score": spread(blur, 1),
            "buckets": dict(sorted(buckets.items(), key=lambda item: -item[1])),
            "n_duplicate_groups": len(self.duplicate_groups),
        }

    def to_dict(self) -> dict:
        return {
            "dataset_path": self.dataset_path,
            "settings": self.settings,
            "summary": self.summary(),
            "images": [image.to_dict() for image in self.images],
            "orphan_captions": self.orphan_captions,
            "nested_images": self.nested_images,
            "links_outside": self.links_outside,
            "duplicate_groups": self.duplicate_groups,
            "identical_caption_groups": self.identical_caption_groups,
            "near_identical_caption_groups": self.near_identical_caption_groups,
            "leakage_hints": self.leakage_hints,
            "fingerprint": self.fingerprint,
            "analysis": self.analysis,
        }

    def write_json(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A path may carry a credential (a cache folder named with ?token=...): it never lands on disk.
        path.write_text(redact(json.dumps(self.to_dict(), indent=2, ensure_ascii=False)) + "\n", encoding="utf-8")
        return path
