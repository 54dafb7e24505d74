"""Frontal-face detection with OpenCV's bundled Haar cascade, at a fixed small working size."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import cv2
    import numpy as np

# The detector dominates analysis time, and its cost grows with the number of scales and small windows it scans.
# At 256 px with faces from 28 px (11% of the long side: portrait to half-body framing) and 1.25 steps between
# scales it costs ~5 ms per image, against ~11 ms at 22 px / 1.2, ~35 ms at 320 px / 1.15, ~120 ms at 512 px / 1.1.
# (15 ms on the 2-core EPYC of benchmarks/results/dataset_analysis.md, three times a full-size decode there.)
FACE_WORKING_SIDE = 256
FACE_MIN_SIZE_PX = 28
FACE_SCALE_FACTOR = 1.25
FACE_MIN_NEIGHBORS = 6  # 5 still accepts a mission patch on the astronaut photo as a face
_CASCADE_FILE = "haarcascade_frontalface_default.xml"


@lru_cache(maxsize=1)
def load_cascade() -> cv2.CascadeClassifier:
    """The detector, parsed from its XML once per process."""
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + _CASCADE_FILE)
    if cascade.empty():
        raise RuntimeError(f"OpenCV's {_CASCADE_FILE} is missing: install opencv-python-headless < 5")
    return cascade


def detect_faces(gray: np.ndarray) -> list[dict]:
    """Faces in a greyscale image as boxes in fractions of width and height, largest first."""
    import cv2  # loads with the measuring code, not with the cache key that reads the constants above

    height, width = gray.shape
    scale = FACE_WORKING_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.equalizeHist(cv2.resize(gray, size, interpolation=interpolation))
    boxes = load_cascade().detectMultiScale(
        small,
        scaleFactor=FACE_SCALE_FACTOR,
        minNeighbors=FACE_MIN_NEIGHBORS,
        minSize=(FACE_MIN_SIZE_PX, FACE_MIN_SIZE_PX),
    )
    faces = [
        {"x": x / size[0], "y": y / size[1], "w": w / size[0], "h": h / size[1]}
        for x, y, w, h in (tuple(int(v) for v in box) for box in boxes)
    ]
    faces.sort(key=lambda face: face["w"] * face["h"], reverse=True)
    return [{key: round(value, 4) for key, value in face.items()} for face in faces]
