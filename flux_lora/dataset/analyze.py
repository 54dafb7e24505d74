"""Dataset analysis: measure every image (in parallel, cached by content hash), then judge the set as a whole."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flux_lora.dataset.buckets import bucket_sizes, nearest_bucket, upscale_factor
from flux_lora.dataset.cache import MeasurementCache
from flux_lora.dataset.captions import leakage_hints, read_caption, repeated_caption_groups
from flux_lora.dataset.discover import DatasetFiles, caption_path_for, discover_dataset
from flux_lora.dataset.duplicates import near_duplicate_groups
from flux_lora.dataset.fingerprint import fingerprint_files, hash_file
from flux_lora.dataset.report import DatasetReport, ImageRecord

if TYPE_CHECKING:
    import multiprocessing.context

# Upscaling by less than this is invisible after resampling, so it is not flagged.
UPSCALE_TOLERANCE = 1.05
# Fitting an image to its bucket crops away more than this share of it: the aspect is too far from any bucket.
MAX_BUCKET_CROP_SHARE = 0.15
# Below this many images to measure, starting worker processes costs more than it saves.
MIN_IMAGES_FOR_WORKERS = 8
# Images handed to a worker at a time. Small, so both workers finish together: with chunks of 16 (an image
# costs ~20 ms) the last chunk kept one worker busy alone for a tenth of a 200-image run.
WORKER_CHUNK = 2


@dataclass(frozen=True)
class AnalysisSettings:
    resolution: int  # training resolution (square side), e.g. 512
    trigger: str  # e.g. "TOK Woman"; empty skips the trigger checks
    caption_extension: str = ".txt"
    bucket_reso_steps: int = 64
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    # Variance of the Laplacian at 512 px over the sharpest quarter of the image. Sharp photos score 300-3000,
    # a soft-focus portrait ~350; a Gaussian blur of 1.5 px at 512 px (3 px at 1024 px) already drops below 45.
    blur_threshold: float = 60.0
    # pHash Hamming distance (of 64 bits). Resized and recompressed copies land at 0-4, different crops
    # of one photo at 12 and more.
    duplicate_max_distance: int = 6
    detect_faces: bool = True
    workers: int = 2
    cache_dir: Path | None = None  # content-hash cache of per-image results; None = no cache


def _measure_in_worker(task: tuple[str, bool]) -> tuple[dict, bytes | None]:
    from flux_lora.dataset.image_analysis import measure_image

    return measure_image(Path(task[0]), task[1])


def _init_worker(detect_faces: bool) -> None:
    import cv2

    cv2.setNumThreads(1)  # the processes already use every core
    if detect_faces:
        from flux_lora.dataset.faces import prepare_worker

        prepare_worker()


def _worker_context() -> multiprocessing.context.BaseContext:
    import multiprocessing

    # Plain fork deadlocks once the parent has used OpenCV's thread pool; a fork server that has imported the
    # measuring code (but run none of it) starts workers almost as fast and safely. image_analysis imports its
    # libraries on first use, so they are named here for the fork server to load once for every worker:
    # scipy.fftpack too, which imagehash.phash imports on its first call (~0.5 s, once per worker otherwise).
    if sys.platform == "linux":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(
            [
                "numpy",
                "cv2",
                "PIL.Image",
                "imagehash",
                "scipy.fftpack",
                "flux_lora.dataset.decode",
                "flux_lora.dataset.faces",
                "flux_lora.dataset.image_analysis",
            ]
        )
        return context
    return multiprocessing.get_context("spawn")


def _measure_all(paths: list[Path], detect_faces: bool, workers: int) -> list[tuple[dict, bytes | None]]:
    tasks = [(str(path), detect_faces) for path in paths]
    if workers > 1 and len(tasks) >= MIN_IMAGES_FOR_WORKERS:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        context = _worker_context()
        try:
            with ProcessPoolExecutor(
                min(workers, len(tasks)), mp_context=context, initializer=_init_worker, initargs=(detect_faces,)
            ) as pool:
                return list(pool.map(_measure_in_worker, tasks, chunksize=WORKER_CHUNK))
        except BrokenProcessPool:
            pass  # a worker died (a decoder crash); redo the work in this process to find out which file
    return [_measure_in_worker(task) for task in tasks]


def _measure_with_cache(
    files: DatasetFiles, hashes: dict[str, tuple[str, int]], settings: AnalysisSettings
) -> tuple[dict[str, dict], dict[str, bytes], MeasurementCache | None, int]:
    """Measurements and fresh thumbnails by content hash; identical files are measured once."""
    cache = MeasurementCache(settings.cache_dir, settings.detect_faces) if settings.cache_dir else None
    measurements: dict[str, dict] = {}
    to_measure: dict[str, Path] = {}
    for image in files.images:
        content_hash = hashes[files.relative(image)][0]
        if content_hash in measurements or content_hash in to_measure:
            continue
        cached = cache.get(content_hash) if cache else None
        if cached is not None:
            measurements[content_hash] = cached
        else:
            to_measure[content_hash] = image
    cache_hits = len(measurements)
    thumbnails: dict[str, bytes] = {}
    results = _measure_all(list(to_measure.values()), settings.detect_faces, settings.workers)
    for content_hash, (measured, thumbnail) in zip(to_measure, results):
        measurements[content_hash] = measured
        if thumbnail:
            thumbnails[content_hash] = thumbnail
        if cache:
            cache.put(content_hash, measured, thumbnail)
    return measurements, thumbnails, cache, cache_hits


def _image_flags(record: ImageRecord, settings: AnalysisSettings) -> list[str]:
    flags = []
    if record.upscale_factor is not None and record.upscale_factor > UPSCALE_TOLERANCE:
        flags.append("upscaled")
    if record.bucket and record.width and record.height:
        scale = upscale_factor(record.width, record.height, record.bucket)
        kept = (record.bucket[0] * record.bucket[1]) / (record.width * record.height * scale * scale)
        if 1 - kept > MAX_BUCKET_CROP_SHARE:
            flags.append("extreme_aspect")
    if record.blur_score is not None and record.blur_score < settings.blur_threshold:
        flags.append("blurry")
    if record.faces is not None and record.blur_score is not None:
        if not record.faces:
            flags.append("no_face")
        elif len(record.faces) > 1:
            flags.append("several_faces")
    return flags


def _face_detector() -> str:
    from flux_lora.dataset.faces import detector_name

    return detector_name()


def _keep_order(record: ImageRecord, settings: AnalysisSettings) -> tuple:
    """Sort key, best copy first: not blurry, then as many pixels as training can use, then the sharpest.

    Pixels count first because a downsized copy scores sharper than its original only for being small.
    """
    usable_pixels = min((record.width or 0) * (record.height or 0), settings.resolution * settings.resolution)
    return ("blurry" in record.flags, -usable_pixels, -(record.blur_score or 0.0), record.path)


def analyze_dataset(path: Path, settings: AnalysisSettings) -> DatasetReport:
    """Analyse a dataset folder without modifying it; bad files become flags, only an unusable folder raises."""
    started = time.perf_counter()
    files = discover_dataset(Path(path), settings.caption_extension)
    hashes = {files.relative(p): hash_file(p) for p in [*files.images, *files.captions]}
    fingerprint = fingerprint_files(files, hashes)
    measurements, thumbnails, cache, cache_hits = _measure_with_cache(files, hashes, settings)

    sizes = bucket_sizes(
        settings.resolution, settings.bucket_reso_steps, settings.min_bucket_reso, settings.max_bucket_reso
    )
    records: list[ImageRecord] = []
    for image in files.images:
        relative = files.relative(image)
        content_hash, size = hashes[relative]
        measured = measurements[content_hash]
        caption_file = caption_path_for(image, settings.caption_extension)
        caption_relative = caption_file.relative_to(files.root).as_posix()
        record = ImageRecord(
            path=relative,
            bytes=size,
            content_hash=content_hash,
            format=measured["format"],
            mode=measured["mode"],
            width=measured["width"],
            height=measured["height"],
            exif_orientation=measured["exif_orientation"],
            error=measured["error"],
            blur_score=measured["blur_score"],
            phash=measured["phash"],
            phash_mirrored=measured["phash_mirrored"],
            faces=measured["faces"],
            caption=read_caption(caption_file, caption_relative, settings.trigger),
            flags=list(measured["flags"]),
        )
        if record.width and record.height and record.blur_score is not None:
            record.bucket = nearest_bucket(record.width, record.height, sizes)
            record.upscale_factor = round(upscale_factor(record.width, record.height, record.bucket), 3)
        record.flags.extend(_image_flags(record, settings))
        if not record.unusable:  # a caption problem on a file that cannot be trained on is noise
            record.flags.extend(record.caption.flags)
        records.append(record)

    hashed = [i for i, record in enumerate(records) if record.phash]
    groups = near_duplicate_groups(
        [records[i].phash for i in hashed], [records[i].phash_mirrored for i in hashed], settings.duplicate_max_distance
    )
    duplicate_groups = []
    for group in groups:
        members = sorted((records[hashed[i]] for i in group), key=lambda r: _keep_order(r, settings))
        for member in members:
            member.flags.append("duplicate")
        duplicate_groups.append([member.path for member in members])

    texts = [None if record.unusable else record.caption.text for record in records]
    identical, near_identical = repeated_caption_groups(texts, settings.trigger)
    for flag, caption_groups in (("caption_duplicate", identical), ("caption_near_duplicate", near_identical)):
        for group in caption_groups:
            for i in group:
                records[i].flags.append(flag)

    settings_dict = asdict(settings)
    settings_dict["cache_dir"] = str(settings.cache_dir) if settings.cache_dir else None
    return DatasetReport(
        dataset_path=str(files.root.resolve()),
        settings=settings_dict,
        images=records,
        orphan_captions=[files.relative(p) for p in files.orphan_captions],
        nested_images=[files.relative(p) for p in files.nested_images],
        links_outside=files.links_outside,
        duplicate_groups=duplicate_groups,
        identical_caption_groups=[[records[i].path for i in group] for group in identical],
        near_identical_caption_groups=[[records[i].path for i in group] for group in near_identical],
        leakage_hints=leakage_hints(texts, settings.trigger),
        fingerprint=fingerprint,
        analysis={
            "seconds": round(time.perf_counter() - started, 3),
            "images_measured": len(measurements) - cache_hits,
            "cache_hits": cache_hits,
            "workers": settings.workers,
            "face_detector": _face_detector() if settings.detect_faces else None,
        },
        thumbnails=thumbnails,
        thumbnail_lookup=cache.thumbnail if cache else None,
    )
