"""Face embeddings with dlib's face recognition model (the 128-d ResNet behind `face_recognition`).

The model files ship in the `face_recognition_models` package; it is located without being imported,
because its __init__ imports pkg_resources, which current setuptools no longer provides.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

EMBEDDER_NAME = "dlib_face_recognition_resnet_model_v1"
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold: Euclidean distance below it means the same person (LFW 99.38%)
DETECTOR_UPSAMPLE = 1  # one 2x upsampling lets the HOG detector find faces down to ~40 px
_LANDMARKS = "shape_predictor_5_face_landmarks.dat"
_RECOGNITION = "dlib_face_recognition_resnet_model_v1.dat"


def model_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face_recognition_models is not installed; run `pip install -e .` in the project")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class FaceEmbedder:
    """dlib HOG face detector -> 5-point landmarks -> 128-d descriptor of the largest face."""

    name = EMBEDDER_NAME

    def __init__(self) -> None:
        import dlib

        folder = model_dir()
        for name in (_LANDMARKS, _RECOGNITION):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found; reinstall face_recognition_models")
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(folder / _LANDMARKS))
        self._recognition = dlib.face_recognition_model_v1(str(folder / _RECOGNITION))

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        """The largest face's descriptor for an RGB uint8 image [H, W, 3], or None when no face is found."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        faces = self._detector(rgb, DETECTOR_UPSAMPLE)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda rect: rect.area())
        return np.asarray(self._recognition.compute_face_descriptor(rgb, self._landmarks(rgb, face)), dtype=np.float64)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
