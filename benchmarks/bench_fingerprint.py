"""Dataset fingerprint: blake3, each byte read once, against the md5-of-every-file approach it replaces.

python benchmarks/bench_fingerprint.py [--images 500]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_dataset_analysis import build_photo_set  # noqa: E402

from flux_lora.dataset import fingerprint_dataset  # noqa: E402


def md5_of_every_file(folder: Path) -> str:
    combined = hashlib.md5()
    for path in sorted(p for p in folder.iterdir() if p.suffix in {".jpg", ".txt"}):
        combined.update(path.name.encode() + hashlib.md5(path.read_bytes()).hexdigest().encode())
    return combined.hexdigest()


def best_of(repeats: int, function, *args) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fingerprint-"))
    try:
        dataset = workdir / "photos"
        build_photo_set(dataset, args.images)
        megabytes = sum(p.stat().st_size for p in dataset.iterdir()) / 1e6
        md5_of_every_file(dataset)  # both timings then read from the page cache
        md5_seconds = best_of(3, md5_of_every_file, dataset)
        blake3_seconds = best_of(3, fingerprint_dataset, dataset)
        print(f"{args.images} images + captions, {megabytes:.0f} MB (page cache warm, best of 3)")
        print(f"md5 of every file:        {md5_seconds * 1000:7.1f} ms  {megabytes / md5_seconds:7.0f} MB/s")
        print(f"blake3 fingerprint:       {blake3_seconds * 1000:7.1f} ms  {megabytes / blake3_seconds:7.0f} MB/s")
        print(f"speed-up: {md5_seconds / blake3_seconds:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
