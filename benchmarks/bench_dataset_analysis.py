"""Dataset analysis speed, every figure measured in this one run on the same files.

Prints analysis throughput (everything on, faces included, 2 workers) as a ratio to
  - single-process full-size decode-only throughput (target >= 0.5), and
  - a straightforward full-resolution implementation in one process (target >= 5),
and the wall time of re-analysing the unchanged set through the CLI with a warm cache (target < 2 s).

    python benchmarks/bench_dataset_analysis.py [--images 500] [--naive-images 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image
from skimage import data

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flux_lora.dataset import AnalysisSettings, analyze_dataset  # noqa: E402

SOURCE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


def build_photo_set(folder: Path, count: int, side: int = 1024, seed: int = 0) -> list[Path]:
    """count distinct 1024 px JPEGs of real photos: random crops, flips and colour shifts of skimage's photographs."""
    rng = np.random.default_rng(seed)
    sources = [getattr(data, name)() for name in SOURCE_PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = sources[index % len(sources)]
        height, width = photo.shape[:2]
        crop = rng.uniform(0.6, 1.0)
        crop_h, crop_w = int(height * crop), int(width * crop * rng.uniform(0.8, 1.2))
        crop_w = min(crop_w, width)
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        pixels = photo[top : top + crop_h, left : left + crop_w].astype(np.float32)
        pixels = pixels * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-15, 15)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        scale = side / max(crop_h, crop_w)
        resized = cv2.resize(
            np.clip(pixels, 0, 255).astype(np.uint8),
            (round(crop_w * scale), round(crop_h * scale)),
            interpolation=cv2.INTER_CUBIC,
        )
        path = folder / f"photo_{index:04d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(resized, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        path.with_suffix(".txt").write_text(f"TOK Woman, photo {index}\n", encoding="utf-8")
        paths.append(path)
    return paths


def decode_only(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.convert("RGB").load()
    return len(paths) / (time.perf_counter() - started)


def naive_full_resolution(paths: list[Path]) -> float:
    """The straightforward version: full decode, full-size Laplacian, hash and default face detection, one process."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        cv2.Laplacian(gray, cv2.CV_64F).var()
        imagehash.phash(Image.fromarray(rgb))
        cascade.detectMultiScale(gray)
    return len(paths) / (time.perf_counter() - started)


def cli_seconds(dataset: Path, cache_dir: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "flux_lora.dataset",
            "analyze",
            str(dataset),
            "--trigger",
            "TOK Woman",
            "--cache-dir",
            str(cache_dir),
        ],
        cwd=REPO,
        check=False,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "160"},
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--naive-images", type=int, default=40, help="the naive version is slow; time it on a subset")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    try:
        dataset = workdir / "photos"
        paths = build_photo_set(dataset, args.images)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} JPEGs, 1024 px long side, {megabytes:.0f} MB, {os.cpu_count()} CPU cores")
        decode_only(paths[:20])  # warm the page cache and the decoder

        decode_rate = decode_only(paths)
        print(f"full-size decode only, 1 process:            {decode_rate:7.1f} img/s")
        naive_rate = naive_full_resolution(paths[: args.naive_images])
        print(f"naive full-resolution analysis, 1 process:   {naive_rate:7.1f} img/s  ({args.naive_images} images)")
        settings = AnalysisSettings(resolution=1024, trigger="TOK Woman", workers=2, detect_faces=True)
        started = time.perf_counter()
        report = analyze_dataset(dataset, settings)
        analysis_rate = len(paths) / (time.perf_counter() - started)
        faces = sum(1 for image in report.images if image.faces)
        print(f"flux-lora analysis, everything on, 2 workers: {analysis_rate:7.1f} img/s  ({faces} images with faces)")
        print(f"  ratio to decode-only:   {analysis_rate / decode_rate:5.2f}  (target >= 0.5)")
        print(f"  ratio to naive version: {analysis_rate / naive_rate:5.1f}  (target >= 5)")

        cache_dir = workdir / "cache"
        cold = cli_seconds(dataset, cache_dir)
        warm = cli_seconds(dataset, cache_dir)
        print(f"CLI analyze, cold cache: {cold:5.2f} s; unchanged set, warm cache: {warm:5.2f} s  (target < 2 s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
