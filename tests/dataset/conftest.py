"""Real image files for the dataset tests, built from scikit-image's bundled photographs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

TRIGGER = "TOK Woman"


def save_jpeg(rgb: np.ndarray, path: Path, quality: int = 92, **options) -> Path:
    Image.fromarray(rgb).save(path, format="JPEG", quality=quality, **options)
    return path


def write_caption(image: Path, text: str | bytes) -> Path:
    caption = image.with_suffix(".txt")
    if isinstance(text, bytes):
        caption.write_bytes(text)
    else:
        caption.write_text(text, encoding="utf-8")
    return caption


def astronaut() -> np.ndarray:
    return data.astronaut()


def distinct_photos() -> list[np.ndarray]:
    """Five different real photographs (RGB, uint8)."""
    return [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        np.ascontiguousarray(data.astronaut()[:, ::-1][60:460, 30:480]),
    ]


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A valid PNG header that claims width x height pixels, with almost no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def exif_rotated_jpeg(rgb: np.ndarray, path: Path) -> Path:
    """Pixels stored sideways with orientation 6, as a phone writes them: upright only once EXIF is applied."""
    stored = np.ascontiguousarray(np.rot90(rgb, k=1))  # orientation 6 means: rotate 90 degrees clockwise to view
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", quality=92, exif=exif)
    return path


@pytest.fixture
def good_dataset(tmp_path: Path) -> Path:
    """Six sharp, distinct, captioned photos with the trigger first."""
    folder = tmp_path / "good"
    folder.mkdir()
    for index, rgb in enumerate(distinct_photos()):
        image = save_jpeg(rgb, folder / f"photo_{index}.jpg")
        write_caption(image, f"{TRIGGER}, photo number {index} with {'abcdefg'[index]} details")
    image = save_jpeg(cv2.resize(data.astronaut()[0:300, 100:400], (600, 600)), folder / "photo_5.jpg")
    write_caption(image, f"{TRIGGER}, close portrait indoors")
    return folder


@pytest.fixture
def bad_dataset(tmp_path: Path) -> Path:
    """Every kind of problem the analysis must name, each in its own file."""
    folder = tmp_path / "bad"
    folder.mkdir()
    photos = distinct_photos()
    sharp = save_jpeg(photos[1], folder / "sharp.jpg")
    write_caption(sharp, f"{TRIGGER}, coffee on a table")
    blurred = save_jpeg(cv2.GaussianBlur(photos[2], (0, 0), 4), folder / "blurred.jpg")
    write_caption(blurred, f"{TRIGGER}, a cat")
    half = cv2.resize(photos[1], (photos[1].shape[1] // 2, photos[1].shape[0] // 2), interpolation=cv2.INTER_AREA)
    write_caption(save_jpeg(half, folder / "sharp_small_copy.jpg", quality=60), f"{TRIGGER}, smaller coffee cup")
    write_caption(exif_rotated_jpeg(photos[0], folder / "rotated.jpg"), f"{TRIGGER}, portrait")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(sharp.read_bytes()[: sharp.stat().st_size // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    Image.fromarray(photos[3]).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    write_caption(folder / "cmyk.jpg", f"{TRIGGER}, rocket on the pad")
    sixteen = (photos[4].astype(np.uint16) * 257)[:, :, ::-1]
    cv2.imwrite(str(folder / "sixteen.png"), sixteen)
    write_caption(folder / "sixteen.png", f"{TRIGGER}, mirrored portrait")
    png_claiming_size(folder / "bomb.png", 100_000, 100_000)
    write_caption(folder / "bomb.png", f"{TRIGGER}, nothing")
    no_trigger = save_jpeg(data.hubble_deep_field(), folder / "no_trigger.jpg")
    write_caption(no_trigger, "a rocket launch site at dusk")
    latin1 = save_jpeg(data.immunohistochemistry(), folder / "latin1_caption.jpg")
    write_caption(latin1, f"{TRIGGER}, caf\xe9 cr\xe8me".encode("latin-1"))
    return folder
