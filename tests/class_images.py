"""A folder of class (regularization) images for tests: real photographs bundled with scikit-image, none of them the
subject of data/sample (NASA's astronaut portrait), written as JPEGs; the first has a caption, the rest train as the
class tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def class_photos() -> list[np.ndarray]:
    return [np.stack([data.camera()] * 3, axis=-1), data.coffee(), data.chelsea(), data.rocket()]


def write_class_images(folder: Path, caption: str = "a photo of a woman") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, rgb in enumerate(class_photos()):
        Image.fromarray(rgb).save(folder / f"class_{index}.jpg", format="JPEG", quality=92)
    (folder / "class_0.txt").write_text(caption + "\n", encoding="utf-8")
    return folder
