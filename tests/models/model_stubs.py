"""Real safetensors files with a FLUX.1-dev-shaped header and no weights on disk.

The header lists the layout's tensors (and one key per block, so block counts are real) with their
full shapes and data offsets; the data region is a sparse hole made by extending the file with
`os.truncate`, so a 24 GB transformer costs a few kB of disk. Other tests may use
`write_model_folder` wherever they need FLUX.1-dev files that pass the launch's header check.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

from flux_lora.models.header import DTYPE_BYTES
from flux_lora.models.layout import FLUX_DEV, FP8, FluxDims, ModelLayout, PartLayout, flux_layout

DEFAULT_FILES = {
    "transformer": "flux1-dev.safetensors",
    "vae": "ae.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5xxl": "t5xxl_fp16.safetensors",
}
# Every part a few kB: for files that must really be served or hashed. Only checked against when a test asks.
TEST_SIZED_DIMS = FluxDims(
    name="test-sized FLUX",
    hidden=64,
    heads=2,
    double_blocks=2,
    single_blocks=2,
    vec_in=32,
    context_in=32,
    ae_channels=8,
    clip_hidden=32,
    clip_layers=2,
    clip_intermediate=64,
    clip_vocab=100,
    t5_d_model=32,
    t5_layers=2,
    t5_d_ff=64,
    t5_heads=2,
    t5_d_kv=16,
    t5_vocab=100,
)
TEST_SIZED = flux_layout(TEST_SIZED_DIMS)
PUBLISHED_DTYPE = {"transformer": "BF16", "vae": "F32", "clip_l": "F16", "t5xxl": "F16"}
# The prefixes the published files carry (ComfyUI's clip_l.safetensors keeps transformers' `text_model.`).
PUBLISHED_PREFIX = {"transformer": "", "vae": "", "clip_l": "text_model.", "t5xxl": ""}


def _block_key(pattern: str, index: int) -> str:
    return pattern.replace(r"(\d+)", str(index)).replace("\\.", ".").rstrip("$")


def part_tensors(
    part: PartLayout, dtype: str, *, other_dtype: str | None = None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape): the defining tensors plus one key per block. `dtype` for the large weights,
    `other_dtype` (default the same) for the rest, as fp8 files keep norms and biases in 16 bits."""
    other = other_dtype or dtype
    tensors = {e.keys[0]: (dtype if e.keys[0] in part.weights else other, e.shape) for e in part.tensors}
    for count in part.blocks:
        first = _block_key(count.pattern, 0)
        shape = tensors[first][1] if first in tensors else (8,)
        for index in range(count.expected):
            tensors.setdefault(_block_key(count.pattern, index), (other, shape))
    return tensors


def write_safetensors_header(
    path: Path,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    *,
    prefix: str = "",
    size: int | None = None,
    data: bytes | None = None,
) -> int:
    """Write `path` with this header; its data is a hole (or `data`, cut or zero-padded to fit). Returns the full size.
    `size` makes the file that long instead (shorter: truncated; longer: trailing bytes)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        length = DTYPE_BYTES[dtype] * math.prod(shape)
        header[prefix + name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes with spaces
    full = 8 + len(raw) + offset
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        if data is not None:
            handle.write(data[:offset].ljust(offset, b"\0"))
    os.truncate(path, full if size is None else size)
    return full


def write_part(
    path: Path,
    part: PartLayout,
    dtype: str | None = None,
    *,
    other_dtype: str | None = None,
    prefix: str | None = None,
    size: int | None = None,
    dense: bool = False,
) -> int:
    """One part's file, in the published dtype and key prefix unless told otherwise; `dense` writes real zeros."""
    dtype = dtype or PUBLISHED_DTYPE[part.key]
    if dtype == FP8 and other_dtype is None:
        other_dtype = "BF16"
    tensors = part_tensors(part, dtype, other_dtype=other_dtype)
    data = b"\0" * sum(DTYPE_BYTES[d] * math.prod(s) for d, s in tensors.values()) if dense else None
    return write_safetensors_header(
        path, tensors, prefix=PUBLISHED_PREFIX[part.key] if prefix is None else prefix, size=size, data=data
    )


def write_model_folder(folder: Path, layout: ModelLayout = FLUX_DEV, *, dense: bool = False) -> dict[str, Path]:
    """The four files under their default names in `folder`; config key -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, name in DEFAULT_FILES.items():
        write_part(folder / name, layout.parts[key], dense=dense)
        files[key] = folder / name
    return files


def block_key(pattern: str, index: int) -> str:
    return _block_key(pattern, index)


def strip_blocks(tensors: dict, pattern: str, keep: int) -> dict:
    """`tensors` without the blocks from index `keep` on (a pruned model)."""
    compiled = re.compile(r"^[a-z_]+\.(\d+)\.")
    prefix = pattern.split("\\.")[0] + "."
    return {
        k: v
        for k, v in tensors.items()
        if not (k.startswith(prefix) and (m := compiled.match(k)) and int(m.group(1)) >= keep)
    }
