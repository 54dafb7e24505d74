"""Aspect-ratio buckets exactly as sd-scripts forms and picks them, shared by the dataset preflight
(which bucket each image will land in) and the native engine (where it does land)."""

from __future__ import annotations


def bucket_sizes(resolution: int, reso_steps: int, min_reso: int, max_reso: int) -> list[tuple[int, int]]:
    """sd-scripts' make_bucket_resolutions: the square of side resolution (rounded down to reso_steps) plus
    every (width, height) with area <= resolution^2, both sides multiples of reso_steps within [min_reso, max_reso]."""
    max_area = resolution * resolution
    square = resolution // reso_steps * reso_steps
    sizes = {(square, square)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // reso_steps * reso_steps)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
        width += reso_steps
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """sd-scripts' select_bucket (without bucket_no_upscale): the nearest aspect ratio, first in sorted order on ties.
    The image is then resized to cover the bucket and centre-cropped."""
    aspect = width / height
    return min(sizes, key=lambda size: abs(size[0] / size[1] - aspect))
