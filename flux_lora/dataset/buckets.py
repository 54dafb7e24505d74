"""How an image fits its bucket; the buckets themselves are sd-scripts' (flux_lora/buckets.py)."""

from __future__ import annotations

from flux_lora.buckets import bucket_sizes, nearest_bucket

__all__ = ["bucket_sizes", "nearest_bucket", "upscale_factor"]


def upscale_factor(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How much the image is enlarged to cover its bucket; above 1 means it is upscaled."""
    return max(bucket[0] / width, bucket[1] / height)
