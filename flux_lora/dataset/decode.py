"""Safe image decoding: never raises for a bad file, reports format problems as flags, decodes at reduced size."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flux_lora.dataset.discover import SUPPORTED_IMAGE_EXTENSIONS

# Decompression-bomb guard: 120 MP covers 108 MP phone sensors while refusing headers that would need GBs.
MAX_PIXELS = 120_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})  # MPO: the JPEG variant many cameras write
_FORMAT_OF_EXTENSION = {".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".webp": {"WEBP"}}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_GREYSCALE_MODES = frozenset({"1", "L", "LA", "La", *_SIXTEEN_BIT_MODES})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # width and height swap once applied
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class DecodedImage:
    """What decoding learned about one file; rgb is None when the file could not be decoded."""

    format: str | None = None
    mode: str | None = None
    width: int | None = None  # after EXIF orientation, at full resolution
    height: int | None = None
    exif_orientation: int = 1
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    rgb: np.ndarray | None = None  # HxWx3 uint8, orientation applied, possibly reduced in size


def _png_bit_depth(path: Path) -> int | None:
    # Pillow reads 16-bit RGB PNGs as 8-bit RGB, so the header is the only reliable place to see the depth.
    with open(path, "rb") as handle:
        head = handle.read(25)
    if len(head) == 25 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return head[24]
    return None


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """8-bit RGB pixels: 16-bit scaled down (not clipped), alpha flattened on white, CMYK and palettes converted."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        grey = np.clip(values / scale, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _draft_request(width: int, height: int, min_side: int) -> tuple[int, int]:
    # JPEG draft keeps each side at least the requested size, so ask in the image's own aspect.
    scale = min_side / max(width, height)
    return max(1, int(width * scale)), max(1, int(height * scale))


def _format_flags(path: Path, image: Image.Image) -> list[str]:
    flags = []
    if image.mode == "CMYK":
        flags.append("cmyk")
    if image.mode in _SIXTEEN_BIT_MODES or (image.format == "PNG" and _png_bit_depth(path) == 16):
        flags.append("16_bit")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        flags.append("alpha")
    if image.mode in _GREYSCALE_MODES:
        flags.append("greyscale")
    expected = _FORMAT_OF_EXTENSION.get(path.suffix.lower())
    if expected is not None and image.format in SUPPORTED_FORMATS and image.format not in expected:
        flags.append("extension_mismatch")
    return flags


def decode_image(path: Path, min_side: int | None = None) -> DecodedImage:
    """Decode path to RGB with EXIF orientation applied; min_side allows a reduced decode (long side >= min_side)."""
    result = DecodedImage()
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            result.flags.append("empty_file")
            result.error = "zero-byte file"
            return result
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        result.flags.append("too_large")
        result.error = f"header claims far more than the {MAX_PIXELS // 1_000_000} MP limit; not decoded"
        return result
    except UnidentifiedImageError:
        result.flags.append("not_an_image")
        result.error = "not a readable image"
        return result
    except OSError as error:
        result.flags.append("corrupt")
        result.error = f"cannot open: {error}"
        return result

    with image:
        result.format, result.mode = image.format, image.mode
        width, height = image.size
        if width * height > MAX_PIXELS:
            result.flags.append("too_large")
            result.error = f"header claims {width}x{height} pixels, above the {MAX_PIXELS // 1_000_000} MP limit"
            return result
        result.width, result.height = width, height
        if image.format not in SUPPORTED_FORMATS or path.suffix.lower() not in SUPPORTED_IMAGE_EXTENSIONS:
            result.flags.append("unsupported_format")
        try:
            result.flags.extend(_format_flags(path, image))
            result.exif_orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
            if result.exif_orientation not in range(1, 9):
                result.exif_orientation = 1
            if result.exif_orientation != 1:
                result.flags.append("exif_rotated")
            swapped = result.exif_orientation in _TRANSPOSED_ORIENTATIONS
            result.width, result.height = (height, width) if swapped else (width, height)
            if min_side is not None and image.format in {"JPEG", "MPO"}:
                image.draft("RGB", _draft_request(width, height, min_side))
            image.load()
            oriented = ImageOps.exif_transpose(image) if result.exif_orientation != 1 else image
            result.rgb = _to_rgb_array(oriented)
        except Exception as error:  # noqa: BLE001 - any decoder failure means the same thing: the file is damaged
            result.flags.append("corrupt")
            result.error = f"decoding failed: {error}"
            result.rgb = None
    return result
