"""Decoding never raises for a bad file and names what is wrong with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flux_lora.dataset.decode import decode_image
from tests.dataset.conftest import astronaut, exif_rotated_jpeg, png_claiming_size, save_jpeg


def test_good_jpeg_decodes_at_reduced_size(tmp_path: Path) -> None:
    big = np.asarray(Image.fromarray(astronaut()).resize((1024, 1024)))
    path = save_jpeg(big, tmp_path / "big.jpg")
    decoded = decode_image(path, min_side=512)
    assert decoded.flags == [] and decoded.error is None
    assert (decoded.width, decoded.height) == (1024, 1024)  # full-resolution size is reported
    assert decoded.rgb.shape == (512, 512, 3)  # but pixels come from the JPEG draft decode


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = astronaut()[:, :400]  # 512 tall, 400 wide
    decoded = decode_image(exif_rotated_jpeg(upright, tmp_path / "phone.jpg"))
    assert "exif_rotated" in decoded.flags
    assert (decoded.width, decoded.height) == (400, 512)
    assert np.abs(decoded.rgb.astype(int) - upright.astype(int)).mean() < 6


def test_broken_files_are_flagged_not_raised(tmp_path: Path) -> None:
    good = save_jpeg(astronaut(), tmp_path / "good.jpg")
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:5000])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000)
    expected = {
        "truncated.jpg": "corrupt",
        "zero.jpg": "empty_file",
        "text.jpg": "not_an_image",
        "bomb.png": "too_large",
    }
    for name, flag in expected.items():
        decoded = decode_image(tmp_path / name, min_side=512)
        assert flag in decoded.flags, name
        assert decoded.rgb is None and decoded.error


def test_format_flags(tmp_path: Path) -> None:
    photo = astronaut()
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(photo[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    Image.fromarray(photo).convert("RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(photo).save(tmp_path / "anim.gif")
    Image.fromarray(photo).save(tmp_path / "really_png.jpg", format="PNG")
    assert "cmyk" in decode_image(tmp_path / "cmyk.jpg").flags
    grey16 = decode_image(tmp_path / "grey16.png")
    assert {"16_bit", "greyscale"} <= set(grey16.flags)
    assert grey16.rgb.max() > 200  # scaled from 16 bits, not clipped to white or black
    assert "alpha" in decode_image(tmp_path / "alpha.png").flags
    assert "unsupported_format" in decode_image(tmp_path / "anim.gif").flags
    assert "extension_mismatch" in decode_image(tmp_path / "really_png.jpg").flags
    assert decode_image(tmp_path / "cmyk.jpg").rgb.shape[2] == 3  # converted to RGB
