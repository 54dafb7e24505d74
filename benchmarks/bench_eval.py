"""Evaluation speed (issue 9): validation loss against training time, face scoring against dlib's bare calls, and a
re-run of an unchanged run.

    python benchmarks/bench_eval.py [--steps 500] [--source RUN_DIR] [--rounds 3] [--out benchmarks/results/eval_speed.md]

(a) Validation loss over every checkpoint of an embedded-default run (`python launch.py`, profile smoke: 256 px, a
    LoRA saved every 50 steps) of --steps steps: `python -m flux_lora.eval RUN_DIR --no-likeness --no-load-check`
    (base model + every LoRA file, x 8 images x 9 sigmas) as a share of the run's training time (train_summary.json
    `seconds`: the job from model loading to the last save, samples included). Target: under 10% for 500 steps,
    judged on the validation itself (eval.json validation.seconds); the fresh process, whose imports and model
    build cost a fixed few seconds, is printed beside it.
(b) Face scoring (HOG detection with one 2x upsampling, 5-point landmarks, 128-d descriptor of the largest face):
    FaceEmbedder.embed against the same dlib calls made bare, on the same decoded images (the 8 sample photos and
    scikit-image's cameraman), best of --rounds. Target: within 1.3x. dlib's CNN detector, whose weights ship
    beside the recognition model, is timed on the same images for comparison.
(c) The same evaluation again on the unchanged run: a cache hit, fresh process, median of --rounds. Target: under 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
sys.path.insert(0, str(PROJECT_ROOT))
from bench_launcher_overhead import machine  # noqa: E402 - the same machine line as the other benchmarks

from flux_lora.eval.face_embedding import DETECTOR_UPSAMPLE, FaceEmbedder, model_dir  # noqa: E402
from flux_lora.eval.likeness import read_rgb  # noqa: E402

VALIDATION_SHARE_TARGET = 0.10
FACE_RATIO_TARGET = 1.3
CACHED_TARGET_S = 2.0
CAMERAMAN_FACE = (slice(40, 240), slice(100, 320))  # as tests/eval/test_likeness.py: HOG misses him in the whole frame
VALIDATION_ONLY = ["--no-likeness", "--no-load-check"]


def train_run(work: Path, steps: int) -> Path:
    """The embedded default, trained for `steps` (its LoRA saved every 50 steps)."""
    subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "launch.py"),
            f"profile.max_train_steps={steps}",
            f"paths.outputs={work / 'outputs'}",
            f"paths.cache={work / 'cache'}",
        ],
        cwd=work,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (run_dir,) = [p.parent for p in (work / "outputs").rglob("run.json")]
    return run_dir


def timed_eval(run_dir: Path, *extra: str) -> float:
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flux_lora.eval", str(run_dir), *VALIDATION_ONLY, *extra],
        cwd=PROJECT_ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - began


def face_images() -> dict[str, np.ndarray]:
    from skimage import data

    images = {p.name: read_rgb(p) for p in sorted((PROJECT_ROOT / "data" / "sample").glob("*.jpg"))}
    images["camera() face crop"] = np.ascontiguousarray(np.repeat(data.camera()[CAMERAMAN_FACE][..., None], 3, axis=2))
    return images


def best_total(score: Callable[[np.ndarray], object], images: list[np.ndarray], rounds: int) -> float:
    totals = []
    for _ in range(rounds):
        began = time.perf_counter()
        for rgb in images:
            score(rgb)
        totals.append(time.perf_counter() - began)
    return min(totals)


def face_scoring(rounds: int) -> list[str]:
    import dlib

    images = face_images()
    embedder = FaceEmbedder()
    folder = model_dir()
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
    recognition = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))

    def bare(rgb: np.ndarray):
        faces = detector(rgb, DETECTOR_UPSAMPLE)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda rect: rect.area())
        return recognition.compute_face_descriptor(rgb, landmarks(rgb, face))

    arrays = list(images.values())
    found = sum(embedder.embed(rgb) is not None for rgb in arrays)
    ours, floor = best_total(embedder.embed, arrays, rounds), best_total(bare, arrays, rounds)
    cnn = dlib.cnn_face_detection_model_v1(str(folder / "mmod_human_face_detector.dat"))
    cnn_s = best_total(lambda rgb: cnn(rgb, DETECTOR_UPSAMPLE), arrays, 1)
    cnn_found = sum(len(cnn(rgb, DETECTOR_UPSAMPLE)) > 0 for rgb in arrays)
    ratio = ours / floor
    return [
        f"(b) face scoring, {len(arrays)} images (8 sample photos 256-384 px, the cameraman crop 220x200), best of {rounds}:",
        f"    FaceEmbedder.embed {ours / len(arrays) * 1000:.1f} ms/image, dlib's bare calls {floor / len(arrays) * 1000:.1f} "
        f"ms/image: {ratio:.2f}x (target {FACE_RATIO_TARGET}x: {'met' if ratio <= FACE_RATIO_TARGET else 'OVER'}); faces found {found}/{len(arrays)}",
        f"    detector: HOG (dlib.get_frontal_face_detector, upsample {DETECTOR_UPSAMPLE}); dlib's CNN (mmod) detector on the "
        f"same images: {cnn_s / len(arrays) * 1000:.0f} ms/image for detection alone, faces found {cnn_found}/{len(arrays)}",
    ]


def validation_and_cache(run_dir: Path, rounds: int) -> tuple[list[str], bool]:
    summary = json.loads((run_dir / "output" / "train_summary.json").read_text())
    status = json.loads((run_dir / "status.json").read_text())
    first = timed_eval(run_dir, "--force")
    evaluation = json.loads((run_dir / "eval" / "eval.json").read_text())
    validation = evaluation["validation"]
    share, process_share = validation["seconds"] / summary["seconds"], first / summary["seconds"]
    cached = [timed_eval(run_dir) for _ in range(rounds)]
    hit = json.loads((run_dir / "eval" / "eval.json").read_text())["evaluated_at"] == evaluation["evaluated_at"]
    median = statistics.median(cached)
    lines = [
        f"run: {run_dir.name}, {summary['steps']} steps at {evaluation['validation']['resolution']} px; "
        f"training {summary['seconds']:.1f} s (train_summary.json), whole job with process start {status.get('duration_s', float('nan')):.1f} s (status.json)",
        f"(a) validation loss, {len(validation['curve'])} points (base + {len(validation['curve']) - 1} LoRA files) x "
        f"{validation['count']} images x {len(validation['sigmas'])} sigmas: {validation['seconds']:.1f} s = {share:.1%} of the "
        f"training time (target {VALIDATION_SHARE_TARGET:.0%}: {'met' if share < VALIDATION_SHARE_TARGET else 'OVER'}); "
        f"the whole evaluator as a fresh process {first:.1f} s = {process_share:.1%} (imports and model build included)",
        f"(c) the same evaluation again, unchanged run: {'cache hit' if hit else 'NOT a cache hit'}, median of {rounds} fresh processes "
        f"{median:.2f} s (runs: {', '.join(f'{t:.2f}' for t in cached)}; target {CACHED_TARGET_S:g} s: "
        f"{'met' if median < CACHED_TARGET_S else 'OVER'})",
    ]
    return lines, share < VALIDATION_SHARE_TARGET and hit and median < CACHED_TARGET_S


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument(
        "--source", type=Path, default=None, help="an embedded-default run directory (default: train one)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this Markdown file")
    args = parser.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        run_dir = args.source or train_run(Path(tmp), args.steps)
        run_lines, run_ok = validation_and_cache(run_dir, args.rounds)
    face_lines = face_scoring(args.rounds)
    lines = [f"machine: {machine()}", f"uptime: {uptime}", *run_lines[:2], *face_lines, run_lines[2]]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("# Evaluation speed (benchmarks/bench_eval.py)\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0 if run_ok else 1


if __name__ == "__main__":
    sys.exit(main())
