"""Connected groups from pairwise matches (near-duplicate images, near-identical captions)."""

from __future__ import annotations

from collections.abc import Iterable


def connected_groups(n_items: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Groups of two or more indices linked by pairs, each sorted, ordered by first index."""
    parent = list(range(n_items))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in range(n_items):
        members.setdefault(root(i), []).append(i)
    return sorted((group for group in members.values() if len(group) > 1), key=lambda group: group[0])
