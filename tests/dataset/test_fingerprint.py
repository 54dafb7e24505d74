"""The fingerprint covers images and captions, and changes with content and with names."""

from __future__ import annotations

from pathlib import Path

import blake3

from flux_lora.dataset import fingerprint_dataset


def test_fingerprint_shape_and_sensitivity(good_dataset: Path) -> None:
    (good_dataset / "notes.md").write_text("not part of the dataset")
    first = fingerprint_dataset(good_dataset)
    assert first["algorithm"] == "blake3"
    paths = [entry["path"] for entry in first["files"]]
    assert paths == sorted(paths) and "notes.md" not in paths
    assert first["n_files"] == 12 and first["total_bytes"] == sum(e["bytes"] for e in first["files"])
    one = good_dataset / "photo_0.jpg"
    assert first["files"][0]["hash"] == blake3.blake3(one.read_bytes()).hexdigest()
    assert fingerprint_dataset(good_dataset) == first

    caption = good_dataset / "photo_1.txt"
    caption.write_text(caption.read_text() + " edited")
    edited = fingerprint_dataset(good_dataset)
    assert edited["content_hash"] != first["content_hash"]

    (good_dataset / "photo_5.jpg").rename(good_dataset / "photo_9.jpg")
    (good_dataset / "photo_5.txt").rename(good_dataset / "photo_9.txt")
    renamed = fingerprint_dataset(good_dataset)
    assert renamed["content_hash"] != edited["content_hash"]  # same bytes, new names: a different dataset
