"""Measurements of one image file, independent of the run's settings so they can be cached by content hash."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# cv2, imagehash, numpy, PIL and the decoder load inside the functions that measure: the cache key and the
# contact sheet read only the constants below, and a launch whose every image is a cache hit measures nothing.

# Blur and hashes run at this long side (or smaller originals at their own size), so one threshold fits every image.
WORKING_SIDE = 512
THUMBNAIL_SIDE = 160
BLUR_TILES = 4  # the score is taken over the sharpest quarter of a 4x4 grid
# RGB images whose channels differ this little on average (0-255) are greyscale photos saved as colour.
GREYSCALE_CHANNEL_SPREAD = 2.0


def resize_long_side(pixels: np.ndarray, side: int) -> np.ndarray:
    import cv2

    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(pixels, size, interpolation=interpolation)


def blur_score(gray_working: np.ndarray) -> float:
    """Variance of the Laplacian over the sharpest quarter of tiles: a sharp face on a soft background is not blurry."""
    import cv2

    laplacian = cv2.Laplacian(gray_working, cv2.CV_32F)
    height, width = laplacian.shape
    variances = sorted(
        (
            float(
                laplacian[
                    i * height // BLUR_TILES : (i + 1) * height // BLUR_TILES,
                    j * width // BLUR_TILES : (j + 1) * width // BLUR_TILES,
                ].var()
            )
            for i in range(BLUR_TILES)
            for j in range(BLUR_TILES)
        ),
        reverse=True,
    )
    sharpest = variances[: max(1, len(variances) // 4)]
    return round(sum(sharpest) / len(sharpest), 2)


def perceptual_hashes(gray_working: np.ndarray) -> tuple[str, str]:
    """pHash of the image and of its mirror image, so a flipped copy is recognised as a duplicate."""
    import cv2
    import imagehash
    import numpy as np
    from PIL import Image

    small = cv2.resize(gray_working, (32, 32), interpolation=cv2.INTER_AREA)
    direct = imagehash.phash(Image.fromarray(small))
    mirrored = imagehash.phash(Image.fromarray(np.ascontiguousarray(small[:, ::-1])))
    return str(direct), str(mirrored)


def thumbnail_jpeg(rgb: np.ndarray) -> bytes:
    import cv2

    small = resize_long_side(rgb, THUMBNAIL_SIDE)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return encoded.tobytes() if ok else b""


def measure_image(path: Path, detect_faces: bool) -> tuple[dict, bytes | None]:
    """JSON-able measurements of one file plus a JPEG thumbnail; never raises for a bad file."""
    import cv2

    from flux_lora.dataset.decode import decode_image

    decoded = decode_image(Path(path), min_side=WORKING_SIDE)
    measurements: dict = {
        "format": decoded.format,
        "mode": decoded.mode,
        "width": decoded.width,
        "height": decoded.height,
        "exif_orientation": decoded.exif_orientation,
        "flags": list(decoded.flags),
        "error": decoded.error,
        "blur_score": None,
        "phash": None,
        "phash_mirrored": None,
        "faces": None,
    }
    if decoded.rgb is None:
        return measurements, None
    rgb = decoded.rgb
    if "greyscale" not in decoded.flags and _channel_spread(rgb) < GREYSCALE_CHANNEL_SPREAD:
        measurements["flags"].append("greyscale")
    # Never upscaled: enlarging adds blur of its own, and small images are flagged as upscaled separately.
    working = resize_long_side(rgb, WORKING_SIDE) if max(rgb.shape[:2]) > WORKING_SIDE else rgb
    gray = cv2.cvtColor(working, cv2.COLOR_RGB2GRAY)
    measurements["blur_score"] = blur_score(gray)
    measurements["phash"], measurements["phash_mirrored"] = perceptual_hashes(gray)
    if detect_faces:
        from flux_lora.dataset.faces import detect_faces as find_faces

        measurements["faces"] = find_faces(gray)
    return measurements, thumbnail_jpeg(rgb)


def _channel_spread(rgb: np.ndarray) -> float:
    import numpy as np

    sample = rgb[::8, ::8].astype(np.int16)
    return float(np.abs(sample[..., 0] - sample[..., 1]).mean() + np.abs(sample[..., 1] - sample[..., 2]).mean())
