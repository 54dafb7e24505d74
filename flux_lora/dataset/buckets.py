"""Aspect-ratio buckets in the way sd-scripts forms them: about resolution^2 pixels, sides in reso_steps."""

from __future__ import annotations


def bucket_sizes(resolution: int, reso_steps: int, min_reso: int, max_reso: int) -> list[tuple[int, int]]:
    """All (width, height) buckets with area <= resolution^2, each side a multiple of reso_steps within limits."""
    max_area = resolution * resolution
    sizes = set()
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // reso_steps * reso_steps)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
        width += reso_steps
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (the image is then resized and centre-cropped)."""
    aspect = width / height
    return min(sizes, key=lambda size: (abs(size[0] / size[1] - aspect), -size[0] * size[1]))


def upscale_factor(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How much the image is enlarged to cover its bucket; above 1 means it is upscaled."""
    return max(bucket[0] / width, bucket[1] / height)
