"""Per-image measurements cached by file content hash, outside the dataset folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Bump when measure_image changes what it returns, so stale entries are never read.
MEASUREMENT_VERSION = 2


def measurement_settings_key(detect_faces: bool) -> str:
    """Folder name that changes whenever a setting that shapes the measurements changes."""
    from flux_lora.dataset import faces, image_analysis

    parts = [f"v{MEASUREMENT_VERSION}", f"w{image_analysis.WORKING_SIDE}", f"t{image_analysis.BLUR_TILES}"]
    if detect_faces:
        detector = faces.detector_name()
        parts.append(
            f"f{detector}-{faces.FACE_WORKING_SIDE}-{faces.FACE_MIN_CONFIDENCE}"
            if detector == faces.YUNET
            else f"f{detector}"
        )
    return "-".join(parts)


class MeasurementCache:
    """One JSON file (plus a thumbnail) per content hash; writes are atomic renames, so concurrent runs are safe."""

    def __init__(self, cache_dir: Path, detect_faces: bool) -> None:
        self.root = Path(cache_dir) / measurement_settings_key(detect_faces)

    def _entry(self, content_hash: str, suffix: str) -> Path:
        return self.root / content_hash[:2] / f"{content_hash}{suffix}"

    def get(self, content_hash: str) -> dict | None:
        try:
            return json.loads(self._entry(content_hash, ".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def thumbnail(self, content_hash: str) -> bytes | None:
        try:
            return self._entry(content_hash, ".jpg").read_bytes()
        except OSError:
            return None

    def put(self, content_hash: str, measurements: dict, thumbnail: bytes | None) -> None:
        try:
            if thumbnail:
                _atomic_write(self._entry(content_hash, ".jpg"), thumbnail)
            _atomic_write(self._entry(content_hash, ".json"), json.dumps(measurements).encode("utf-8"))
        except OSError:
            pass  # a cache that cannot be written only costs speed


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
