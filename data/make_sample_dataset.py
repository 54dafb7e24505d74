"""Generate data/sample: eight framings of NASA's public-domain portrait of Eileen Collins (skimage.data.astronaut).

Run once from the repository root: python data/make_sample_dataset.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

OUT = Path(__file__).resolve().parent / "sample"
TRIGGER = "TOK Woman"

# (name, crop box in the 512x512 original, output size, mirror, brightness, colour saturation, caption)
FRAMINGS = [
    (
        "01_full_frame",
        (0, 0, 512, 512),
        (384, 384),
        False,
        1.0,
        1.0,
        "TOK Woman, official NASA portrait in an orange flight suit, flag and shuttle model behind her",
    ),
    (
        "02_head_shoulders",
        (100, 0, 400, 300),
        (320, 320),
        False,
        1.05,
        1.0,
        "TOK Woman, head and shoulders, short blonde hair, soft studio light",
    ),
    (
        "03_close_up",
        (130, 25, 330, 225),
        (256, 256),
        False,
        1.0,
        1.1,
        "TOK Woman, close-up of her smiling face, brown eyes",
    ),
    (
        "04_mirrored",
        (40, 0, 424, 384),
        (384, 384),
        True,
        0.95,
        1.0,
        "TOK Woman, mirrored studio shot, astronaut suit with mission patches",
    ),
    (
        "05_portrait_crop",
        (110, 0, 350, 320),
        (288, 384),
        False,
        1.1,
        0.9,
        "TOK Woman, vertical crop, dark studio backdrop, gentle smile",
    ),
    (
        "06_wide",
        (20, 30, 500, 390),
        (384, 288),
        False,
        0.9,
        1.0,
        "TOK Woman, wide framing with the American flag on the left",
    ),
    (
        "07_warm_close",
        (145, 35, 325, 215),
        (256, 256),
        False,
        1.0,
        1.25,
        "TOK Woman, tight face crop, warm colour tones",
    ),
    (
        "08_low_three_quarter",
        (60, 60, 400, 400),
        (340, 340),
        False,
        0.85,
        1.0,
        "TOK Woman, three-quarter length, helmet resting at her side, dim light",
    ),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut())
    for name, box, size, mirror, brightness, saturation, caption in FRAMINGS:
        image = photo.crop(box).resize(size, Image.Resampling.LANCZOS)
        if mirror:
            image = ImageOps.mirror(image)
        image = ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(brightness)).enhance(saturation)
        image.save(OUT / f"{name}.jpg", quality=88, optimize=True)
        (OUT / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        assert caption.startswith(TRIGGER)
    print(f"wrote {len(FRAMINGS)} images to {OUT}")


if __name__ == "__main__":
    np.random.seed(0)
    main()
