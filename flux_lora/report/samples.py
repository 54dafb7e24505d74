"""The sample images a run wrote while training (`output/sample/`), found by their file names.

Both engines name them as sd-scripts does: `<output_name>_<step:06d>_<prompt:02d>_<timestamp>_<seed>.png`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

_SAMPLE_NAME = re.compile(r"_(?P<step>\d{6})_(?P<prompt>\d{2})_(?P<stamp>\d+)_(?P<seed>\d+)\.png$")
THUMBNAIL_PX = 192


@dataclass(frozen=True)
class SampleImage:
    path: Path
    step: int
    prompt: int  # index into dataset.sample_prompts
    seed: int  # the prompt's fixed seed
    stamp: str


def run_samples(run_home: Path) -> list[SampleImage]:
    """Every sample image of a run, one per (step, prompt): a resumed run's newer image wins."""
    found: dict[tuple[int, int], SampleImage] = {}
    folder = run_home / "output" / "sample"
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        match = _SAMPLE_NAME.search(path.name)
        if not match:
            continue
        image = SampleImage(path, int(match["step"]), int(match["prompt"]), int(match["seed"]), match["stamp"])
        key = (image.step, image.prompt)
        if key not in found or image.stamp > found[key].stamp:
            found[key] = image
    return sorted(found.values(), key=lambda s: (s.step, s.prompt))


def final_samples(run_home: Path) -> list[SampleImage]:
    """The samples of the run's last sampled step, one per prompt."""
    samples = run_samples(run_home)
    if not samples:
        return []
    last = max(s.step for s in samples)
    return [s for s in samples if s.step == last]


def eval_base_image(run_home: Path, prompt: int, evaluation: dict | None) -> Path | None:
    """The evaluator's no-LoRA image for a sample prompt (its first seed), when the run was evaluated."""
    for sample in (evaluation or {}).get("samples", []):
        if (
            sample.get("strength") is None
            and sample.get("set") == "sample"
            and sample.get("prompt") == f"sample-{prompt:02d}"
        ):
            path = run_home / sample["image"]
            if path.is_file():
                return path
    return None


def thumbnail(source: Path, target: Path, size: int = THUMBNAIL_PX) -> Path:
    """A small copy beside the report, so the page opens anywhere after the sweep folder is copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    with Image.open(source) as image:
        image.thumbnail((size, size))
        image.convert("RGB").save(target, optimize=False)
    return target
