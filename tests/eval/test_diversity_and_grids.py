"""Collapse and copy flags on real photos, and the grid's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flux_lora.compose import PROJECT_ROOT
from flux_lora.eval.diversity import image_hash, nearest_training_image, seed_diversity
from flux_lora.eval.grids import HEADER_HEIGHT, LABEL_WIDTH, write_prompt_grid
from flux_lora.eval.likeness import read_rgb

SAMPLE = PROJECT_ROOT / "data" / "sample"


def test_identical_seeds_are_flagged_as_collapsed() -> None:
    same = image_hash(read_rgb(SAMPLE / "01_full_frame.jpg"))
    assert seed_diversity([same, same, same], [None, None, None])["collapsed"] is True


def test_different_pictures_are_not_collapsed() -> None:
    hashes = [image_hash(read_rgb(p)) for p in sorted(SAMPLE.glob("*.jpg"))[:3]]
    result = seed_diversity(hashes, [None] * 3)
    assert result["collapsed"] is False and result["mean_phash_distance"] > 4 and result["mean_face_distance"] is None


def test_a_mirrored_training_image_is_found_as_a_copy() -> None:
    training = {p.name: image_hash(read_rgb(p)) for p in sorted(SAMPLE.glob("*.jpg"))}
    mirrored = np.ascontiguousarray(read_rgb(SAMPLE / "06_wide.jpg")[:, ::-1])
    name, bits = nearest_training_image(image_hash(mirrored), training)
    assert name == "06_wide.jpg" and bits <= 6


def test_grid_has_a_label_column_a_header_and_one_cell_per_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cells = []
    for row in range(3):
        cells.append([])
        for column in range(2):
            path = tmp_path / f"{row}_{column}.png"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
            cells[-1].append(path)
    rows = ["no LoRA", "LoRA x0.5", "LoRA x1"]
    out = write_prompt_grid("TOK Woman, a prompt", rows, [0, 1], cells, tmp_path / "g.png", 64)
    with Image.open(out) as grid:
        assert grid.size == (LABEL_WIDTH + 2 * 64, HEADER_HEIGHT + 3 * 64)
        # The bottom-right cell holds the last image, unscaled at 64 px.
        assert np.array_equal(np.asarray(grid)[-64:, -64:], np.asarray(Image.open(cells[2][1])))
