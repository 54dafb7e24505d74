"""A safetensors file's header, read without its weights: 8-byte little-endian length, then JSON.

Parsed here rather than with `safetensors.safe_open`, which refuses a truncated file without saying
how many bytes are missing; the sizes are what tells a broken download from a wrong file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# safetensors itself refuses headers above 100 MB; FLUX.1-dev's is about 100 kB.
MAX_HEADER_BYTES = 100 * 2**20
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class NotSafetensors(ValueError):
    """The file is not a safetensors file; the message says what it looks like instead."""


class HeaderTruncated(ValueError):
    """The file ends inside its own header."""

    def __init__(self, expected_at_least: int, actual: int) -> None:
        super().__init__(f"ends inside its header ({actual:,} bytes, the header alone needs {expected_at_least:,})")
        self.expected_at_least = expected_at_least
        self.actual = actual


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    header_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def expected_size(self) -> int:
        """The file's size according to its header: 8 + header + the end of the last tensor's data."""
        return 8 + self.header_size + max((t.end for t in self.tensors.values()), default=0)


def _looks_like(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the repository was cloned without its large files)"
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        return "a web page (an error or login page saved under the weights' name)"
    if text.startswith((b"{", b"[")):
        return "a JSON document"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pt/.ckpt checkpoint?)"
    if head.startswith(b"\x80"):
        return "a pickle (a PyTorch .bin/.ckpt checkpoint?)"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    return "not a safetensors file"


def read_header(path: Path) -> SafetensorsHeader:
    """The header of `path`; raises NotSafetensors, HeaderTruncated or OSError. Reads at most the header's bytes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
        if len(head) < 8:
            raise HeaderTruncated(8, size) if size else NotSafetensors("is empty (0 bytes)")
        (length,) = struct.unpack("<Q", head[:8])
        # A header must open with "{"; the length bytes of a real file are mostly zeros.
        if length == 0 or length > MAX_HEADER_BYTES or (len(head) > 8 and head[8:9] != b"{"):
            raise NotSafetensors(f"is {_looks_like(head)}")
        if size < 8 + length:
            raise HeaderTruncated(8 + length, size)
        handle.seek(8)
        raw = handle.read(length)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotSafetensors(f"has a damaged header (not JSON: {exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(document, dict):
        raise NotSafetensors("has a damaged header (not a JSON object)")
    metadata = document.pop("__metadata__", None) or {}
    tensors: dict[str, TensorEntry] = {}
    for name, entry in document.items():
        try:
            start, end = (int(v) for v in entry["data_offsets"])
            tensors[name] = TensorEntry(
                dtype=str(entry["dtype"]), shape=tuple(int(d) for d in entry["shape"]), start=start, end=end
            )
        except (KeyError, TypeError, ValueError):
            raise NotSafetensors(f"has a damaged header (entry {name!r} lacks dtype, shape or data_offsets)") from None
    return SafetensorsHeader(
        path=path,
        file_size=size,
        header_size=length,
        tensors=tensors,
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
