"""Near-duplicate grouping gives the same groups with plain integers (small sets) and numpy (large sets)."""

from __future__ import annotations

import random

import pytest

from flux_lora.dataset import duplicates


@pytest.mark.parametrize("count", [6, 40, 300])
def test_integer_and_numpy_comparisons_agree(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(count)
    hashes = [rng.getrandbits(64) for _ in range(count)]
    # Every other image gets a close copy (3 bits flipped) and some a mirrored twin.
    phashes = [f"{h if i % 2 else hashes[i - 1 if i else 0] ^ 0b10101:016x}" for i, h in enumerate(hashes)]
    mirrored = [f"{hashes[(i + 7) % count] if i % 5 == 0 else rng.getrandbits(64):016x}" for i in range(count)]
    monkeypatch.setattr(duplicates, "PURE_PYTHON_MAX", 10**9)
    by_integers = duplicates.near_duplicate_groups(phashes, mirrored, 6)
    monkeypatch.setattr(duplicates, "PURE_PYTHON_MAX", 0)
    assert duplicates.near_duplicate_groups(phashes, mirrored, 6) == by_integers
    assert by_integers  # the planted copies are found
