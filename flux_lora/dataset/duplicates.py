"""Near-duplicate images from perceptual hashes, mirrored copies included."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flux_lora.dataset.grouping import connected_groups

if TYPE_CHECKING:
    import numpy as np


def _hash_bits(hex_hashes: list[str]) -> np.ndarray:
    import numpy as np

    as_ints = np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)
    return np.unpackbits(as_ints.view(np.uint8).reshape(-1, 8), axis=1)


# Below this many images plain integers are fast enough (an identity set is 10-50 photos) and the launcher
# skips importing numpy; above it the comparison of every pair is vectorised.
PURE_PYTHON_MAX = 256


def _pairs_by_integers(phashes: list[str], mirrored: list[str], max_distance: int) -> list[tuple[int, int]]:
    direct = [int(h, 16) for h in phashes]
    flipped = [int(h, 16) for h in mirrored]
    return [
        (i, j)
        for i in range(len(direct) - 1)
        for j in range(i + 1, len(direct))
        if min((direct[i] ^ direct[j]).bit_count(), (direct[i] ^ flipped[j]).bit_count()) <= max_distance
    ]


def near_duplicate_groups(phashes: list[str], mirrored: list[str], max_distance: int) -> list[list[int]]:
    """Index groups whose pHash (or the pHash of the mirrored image) differs in at most max_distance bits."""
    if len(phashes) < 2:
        return []
    if len(phashes) <= PURE_PYTHON_MAX:
        return connected_groups(len(phashes), _pairs_by_integers(phashes, mirrored, max_distance))
    import numpy as np

    direct = _hash_bits(phashes)
    flipped = _hash_bits(mirrored)
    pairs = []
    for i in range(len(phashes) - 1):
        to_direct = np.count_nonzero(direct[i + 1 :] != direct[i], axis=1)
        to_flipped = np.count_nonzero(flipped[i + 1 :] != direct[i], axis=1)
        close = np.nonzero(np.minimum(to_direct, to_flipped) <= max_distance)[0]
        pairs.extend((i, i + 1 + int(j)) for j in close)
    return connected_groups(len(phashes), pairs)
