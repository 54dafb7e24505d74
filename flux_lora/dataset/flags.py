"""Every flag the analysis can raise, with how serious it is and what a person should do about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class FlagInfo:
    severity: Severity  # error: the file cannot be trained on as it is; warning: it can, but probably should not be
    meaning: str
    fix: str


FLAGS: dict[str, FlagInfo] = {
    # decoding
    "empty_file": FlagInfo("error", "zero-byte file", "delete it or copy the photo again"),
    "not_an_image": FlagInfo("error", "not an image despite its extension", "delete it or rename it"),
    "corrupt": FlagInfo("error", "corrupt or truncated image data", "copy the original again"),
    "unsupported_format": FlagInfo(
        "error", "format the trainers do not read", "convert to JPEG or PNG (prepare does this)"
    ),
    "too_large": FlagInfo("error", "absurd dimensions (decompression-bomb guard)", "resize it below the pixel limit"),
    "cmyk": FlagInfo(
        "warning", "CMYK colour (print export); colours shift when converted", "convert to RGB (prepare does this)"
    ),
    "16_bit": FlagInfo(
        "warning", "16 bits per channel; loaders may clip it", "convert to 8-bit RGB (prepare does this)"
    ),
    "alpha": FlagInfo(
        "warning", "has an alpha channel; transparent areas turn black or white", "flatten it (prepare does this)"
    ),
    "greyscale": FlagInfo("warning", "greyscale; the LoRA learns a black-and-white look", "use colour photos"),
    "exif_rotated": FlagInfo(
        "warning",
        "EXIF orientation tag; trainers ignore it and see the photo rotated",
        "apply the rotation (prepare does this)",
    ),
    "extension_mismatch": FlagInfo("warning", "extension does not match the image format", "rename it"),
    # geometry and content
    "upscaled": FlagInfo("warning", "smaller than its training bucket, will be upscaled", "use a larger original"),
    "extreme_aspect": FlagInfo(
        "warning",
        "aspect ratio far from every bucket, so over 15% is cropped away",
        "crop it yourself or run prepare --crop-aspect",
    ),
    "blurry": FlagInfo("warning", "blurry (low variance of the Laplacian)", "replace it with a sharp photo"),
    "duplicate": FlagInfo("warning", "near-duplicate of another image", "keep one (prepare keeps the sharpest)"),
    "no_face": FlagInfo("warning", "no frontal face found", "check it shows the subject's face"),
    "several_faces": FlagInfo("warning", "several faces found; the LoRA may blend identities", "crop to the subject"),
    # captions
    "caption_missing": FlagInfo("warning", "no caption file", "write one that starts with the trigger"),
    "caption_empty": FlagInfo("warning", "caption file is empty", "write a caption that starts with the trigger"),
    "caption_not_utf8": FlagInfo("warning", "caption is not UTF-8; the trainer fails to read it", "save it as UTF-8"),
    "caption_control_chars": FlagInfo(
        "warning",
        "caption holds control characters (terminal escape sequences); training refuses it",
        "remove them, or run prepare, which writes them out escaped",
    ),
    "caption_bom": FlagInfo(
        "warning", "caption starts with a byte-order mark, so the trigger is not first", "save it as UTF-8 without BOM"
    ),
    "trigger_missing": FlagInfo(
        "warning", "trigger token absent from the caption", "start the caption with the trigger"
    ),
    "trigger_not_first": FlagInfo("warning", "trigger token present but not first", "move the trigger to the start"),
    "caption_too_long_clip": FlagInfo(
        "warning", "longer than CLIP's 77 tokens (estimated); the rest is cut", "shorten it"
    ),
    "caption_too_long_t5": FlagInfo(
        "warning", "longer than T5's 512 tokens (estimated); the rest is cut", "shorten it"
    ),
    "caption_duplicate": FlagInfo(
        "warning", "caption identical to another image's", "describe what differs in each photo"
    ),
    "caption_near_duplicate": FlagInfo(
        "warning", "caption nearly identical to another image's", "describe what differs in each photo"
    ),
}


def severity_of(flag: str) -> Severity:
    return FLAGS[flag].severity
