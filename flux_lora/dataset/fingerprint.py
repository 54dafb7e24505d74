"""Dataset fingerprint: one fast hash per file, each byte read once, combined with the relative paths."""

from __future__ import annotations

from pathlib import Path

import blake3

from flux_lora.dataset.discover import DatasetFiles, discover_dataset

FINGERPRINT_ALGORITHM = "blake3"
_READ_CHUNK = 1 << 20


def hash_file(path: Path) -> tuple[str, int]:
    """blake3 hex digest and byte count of one file."""
    hasher = blake3.blake3()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


def combine_file_hashes(entries: list[dict]) -> str:
    """Hash of (relative path, file hash) pairs, so a rename changes the fingerprint too."""
    hasher = blake3.blake3()
    for entry in sorted(entries, key=lambda e: e["path"]):
        hasher.update(entry["path"].encode("utf-8") + b"\0" + entry["hash"].encode("ascii") + b"\n")
    return hasher.hexdigest()


def fingerprint_files(files: DatasetFiles, known_hashes: dict[str, tuple[str, int]] | None = None) -> dict:
    """Fingerprint of the images and captions in files; known_hashes (relative path -> hash, bytes) avoids rehashing."""
    known_hashes = known_hashes or {}
    entries = []
    for path in [*files.images, *files.captions]:
        relative = files.relative(path)
        digest, size = known_hashes.get(relative) or hash_file(path)
        entries.append({"path": relative, "bytes": size, "hash": digest})
    entries.sort(key=lambda e: e["path"])
    return {
        "algorithm": FINGERPRINT_ALGORITHM,
        "content_hash": combine_file_hashes(entries),
        "n_files": len(entries),
        "total_bytes": sum(e["bytes"] for e in entries),
        "files": entries,
    }


def fingerprint_dataset(path: Path, caption_extension: str = ".txt") -> dict:
    """JSON-able fingerprint of a dataset folder's images and caption files, sorted by relative path."""
    return fingerprint_files(discover_dataset(Path(path), caption_extension))
