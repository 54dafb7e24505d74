"""Which files in a folder make up a dataset, in the way sd-scripts pairs images with captions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Formats the trainers read; anything else with an image-like extension is reported, not trained on.
SUPPORTED_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Images in the root and in direct subfolders train; sd-scripts reads each subset folder without recursion.
MAX_SUBSET_DEPTH = 1
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".jxl",
        ".jp2",
        ".ico",
        ".psd",
        ".raw",
        ".dng",
        ".cr2",
        ".nef",
    }
)


class DatasetError(ValueError):
    """The dataset folder itself is unusable (missing, empty); bad individual files never raise."""


@dataclass(frozen=True)
class DatasetFiles:
    root: Path
    images: list[Path]  # supported and unsupported image-like files, sorted by relative path
    captions: list[Path]  # caption files that belong to one of the images
    orphan_captions: list[Path]  # caption files with no image next to them
    # Images more than one folder deep: no trainer reads them (sd-scripts takes one folder per subset).
    nested_images: list[Path] = field(default_factory=list)
    # Links to files outside the folder (`relative -> target`): they train, but the folder alone is not the dataset.
    links_outside: list[str] = field(default_factory=list)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def caption_path_for(image: Path, caption_extension: str) -> Path:
    return image.with_suffix(caption_extension)


def is_image_like(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in SUPPORTED_IMAGE_EXTENSIONS or suffix in UNSUPPORTED_IMAGE_EXTENSIONS


def _visible_files(root: Path) -> tuple[list[Path], list[str], list[str]]:
    """The dataset's visible files, the links that lead to no file (dangling, a loop) and those that lead out of
    the folder (each as `relative -> where`)."""
    # Hidden files and folders (.DS_Store, .cache) are never part of a dataset.
    files, broken, outside = [], [], []
    inside = root.resolve()
    for path in root.rglob("*"):
        relative_parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in relative_parts):
            continue
        if path.is_symlink():
            relative = path.relative_to(root).as_posix()
            try:
                target = path.resolve(strict=True)
            except RuntimeError:  # Python 3.11 says a loop this way
                broken.append(f"{relative} (a link loop)")
                continue
            except OSError as exc:
                broken.append(
                    f"{relative} ({'a link loop' if exc.errno == 40 else 'dangling: -> ' + os.readlink(path)})"
                )
                continue
            if inside not in target.parents and target != inside:
                outside.append(f"{relative} -> {target}")
        if path.is_file():
            files.append(path)
    return files, broken, outside


def folder_depth(path: Path, root: Path) -> int:
    """0 for a file directly in root, 1 for one in a subfolder (a kohya `10_name/` subset), and so on."""
    return len(path.relative_to(root).parts) - 1


def discover_dataset(root: Path, caption_extension: str = ".txt") -> DatasetFiles:
    """Images and captions in root and its direct subfolders (kohya's `10_name/` subsets); deeper ones are listed apart."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist: check the dataset path")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is a file, not a folder: point it at the folder that holds the images")
    visible, broken, outside = _visible_files(root)
    if broken:
        raise DatasetError(
            f"dataset folder {root}: {len(broken)} link(s) lead to no file: {'; '.join(broken[:5])}"
            f"{' ...' if len(broken) > 5 else ''}; remove or repair them"
        )
    files = [p for p in visible if folder_depth(p, root) <= MAX_SUBSET_DEPTH]
    nested = sorted(
        (p for p in visible if folder_depth(p, root) > MAX_SUBSET_DEPTH and is_image_like(p)),
        key=lambda p: p.as_posix(),
    )
    images = sorted((p for p in files if is_image_like(p)), key=lambda p: p.relative_to(root).as_posix())
    if not images:
        deeper = f" ({len(nested)} images sit more than one folder deep, which no trainer reads)" if nested else ""
        raise DatasetError(
            f"dataset folder {root} holds no images (.jpg .jpeg .png .webp){deeper}: put the training images and their "
            f"{caption_extension} captions there or in direct subfolders"
        )
    image_stems = {p.with_suffix("") for p in images}
    caption_files = [p for p in files if p.suffix == caption_extension]
    captions = sorted((p for p in caption_files if p.with_suffix("") in image_stems), key=lambda p: p.as_posix())
    orphans = sorted((p for p in caption_files if p.with_suffix("") not in image_stems), key=lambda p: p.as_posix())
    return DatasetFiles(
        root=root,
        images=images,
        captions=captions,
        orphan_captions=orphans,
        nested_images=nested,
        links_outside=outside,
    )
