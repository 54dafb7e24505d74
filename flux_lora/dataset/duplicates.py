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


def near_duplicate_groups(phashes: list[str], mirrored: list[str], max_distance: int) -> list[list[int]]:
    """Index groups whose pHash (or the pHash of the mirrored image) differs in at most max_distance bits."""
    if len(phashes) < 2:
        return []
    import numpy as np  # loaded only when there is something to compare

    direct = _hash_bits(phashes)
    flipped = _hash_bits(mirrored)
    pairs = []
    for i in range(len(phashes) - 1):
        to_direct = np.count_nonzero(direct[i + 1 :] != direct[i], axis=1)
        to_flipped = np.count_nonzero(flipped[i + 1 :] != direct[i], axis=1)
        close = np.nonzero(np.minimum(to_direct, to_flipped) <= max_distance)[0]
        pairs.extend((i, i + 1 + int(j)) for j in close)
    return connected_groups(len(phashes), pairs)
