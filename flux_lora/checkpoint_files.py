"""Checkpoint files that can be trusted: written under a temporary name, renamed when complete, and
described by a manifest (every file's size and blake3 hash) written last.

A state folder is good when its `manifest.json` says "complete" and every file it lists is there with
its size and hash: a folder a crash left half-written has no manifest, and a file damaged later no
longer matches. Standard library and blake3 only, so the launcher can check a resume state without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import blake3

MANIFEST = "manifest.json"
STAGING_PREFIX = ".tmp-"  # a folder or file still being written
REPLACED_PREFIX = ".old-"  # a previous state moved aside for the instant its successor takes its name
_CHUNK = 8 * 2**20


def staging_path(final: Path) -> Path:
    """Where `final` is written before it is complete: beside it, so the rename stays on one filesystem."""
    return final.with_name(STAGING_PREFIX + final.name)


def replaced_path(final: Path) -> Path:
    return final.with_name(REPLACED_PREFIX + final.name)


def file_blake3(path: Path, sync: bool = False) -> str:
    """Hex blake3 of a file; `sync` also flushes it to disk, since we read it anyway."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return hasher.hexdigest()


def fsync_dir(folder: Path) -> None:
    # Makes a rename durable; some filesystems refuse to open a directory, which only costs durability.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _bytes_free(path: Path) -> float:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return float(shutil.disk_usage(probe).free)
    except OSError:
        return float("inf")


def free_space(path: Path) -> str:
    """How much room is left where `path` is (or would be), in words: "1.2 MB free"."""
    free = _bytes_free(path)
    if free == float("inf"):
        return "free space unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1000
    return ""


class WriteFailed(OSError):
    """A file of the run could not be written (a full disk, a quota, a read-only mount): says which and the room left."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        self.path = Path(path)
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror
        elif "unexpected pos" in str(cause) or "write failed" in str(cause):
            # torch.save's writer loses the errno: "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0".
            short = _bytes_free(path) < 16 * 2**20
            reason = (
                "No space left on device" if short else f"the write stopped short ({str(cause).splitlines()[0][:80]})"
            )
        else:
            reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        super().__init__(getattr(cause, "errno", None) or 0, f"could not write {path}: {reason} ({free_space(path)})")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def atomic_write_file(path: Path, write_fn: Callable[[Path], None]) -> Path:
    """Call write_fn(temporary path) and rename the result to `path`; a crash leaves the old file untouched."""
    path = Path(path)
    staging = staging_path(path)
    staging.unlink(missing_ok=True)
    try:
        write_fn(staging)
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_file(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def write_manifest(state_dir: Path, step: int) -> Path:
    """List every file of state_dir (relative path, size, blake3) and the step; written last, atomically."""
    state_dir = Path(state_dir)
    files = sorted(
        p for p in state_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(STAGING_PREFIX)
    )
    entries = [
        {"path": p.relative_to(state_dir).as_posix(), "size": p.stat().st_size, "blake3": file_blake3(p, sync=True)}
        for p in files
    ]
    manifest = {"complete": True, "step": step, "files": entries}
    return atomic_write_text(state_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_manifest(state_dir: Path) -> dict:
    """The manifest of a state folder; raises ValueError with the reason if it is missing or malformed."""
    path = Path(state_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST} (an unfinished write, or a state from before manifests)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise ValueError(f"{MANIFEST} does not say complete")
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("files"), list):
        raise ValueError(f"{MANIFEST} lacks its step or file list")
    return manifest


def state_problem(state_dir: Path) -> str | None:
    """None when the state folder is complete and every file matches its manifest; else one line saying why not."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        aside = replaced_path(state_dir)
        hint = f" (a replacement was interrupted: the previous state is {aside})" if aside.is_dir() else ""
        return f"{state_dir}: missing{hint}"
    try:
        manifest = read_manifest(state_dir)
    except ValueError as exc:
        return f"{state_dir}: {exc}"
    for entry in manifest["files"]:
        try:
            relative, size, digest = entry["path"], entry["size"], entry["blake3"]
        except (TypeError, KeyError):
            return f"{state_dir}: {MANIFEST} has a malformed entry {entry!r}"
        path = state_dir / relative
        if not path.is_file():
            return f"{state_dir}: {relative} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{state_dir}: {relative} has {actual} bytes, the manifest says {size}"
        if file_blake3(path) != digest:
            return f"{state_dir}: {relative} does not match its blake3 hash"
    return None


def begin_dir(final_dir: Path) -> Path:
    """A fresh, empty staging folder for final_dir (what an earlier crash left there is discarded)."""
    final_dir = Path(final_dir)
    recover_replaced_dir(final_dir)
    staging = staging_path(final_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_dir(staging: Path, final_dir: Path, step: int) -> Path:
    """Write the manifest into the complete staging folder, then give it final_dir's name.

    An existing final_dir stays in place until the new folder is complete; it is moved aside only for the
    instant between two renames (recover_replaced_dir repairs a crash there), then deleted.
    """
    final_dir = Path(final_dir)
    write_manifest(staging, step)
    aside = replaced_path(final_dir)
    if final_dir.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final_dir, aside)
    os.replace(staging, final_dir)
    fsync_dir(final_dir.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final_dir


def recover_replaced_dir(final_dir: Path) -> None:
    """Repair a crash between commit_dir's two renames: put the complete new folder (or else the old one) in place."""
    final_dir = Path(final_dir)
    aside = replaced_path(final_dir)
    if final_dir.exists() or not aside.is_dir():
        return
    staging = staging_path(final_dir)
    if staging.is_dir() and state_problem(staging) is None:
        os.replace(staging, final_dir)
    else:
        os.replace(aside, final_dir)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's `__metadata__` (header only, no tensors read). Raises ValueError on a file that is not one."""
    return dict(_safetensors_header(path).get("__metadata__") or {})


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    return [key for key in _safetensors_header(path) if key != "__metadata__"]


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        size = struct.unpack("<Q", head)[0]
        if size > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        try:
            return json.loads(handle.read(size))
        except ValueError as exc:
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from exc


def safetensors_problem(path: Path) -> str | None:
    """None when the file is a whole safetensors file (its header parses and its tensor data is all there); else
    one line saying what is wrong (truncated, not a safetensors file)."""
    path = Path(path)
    try:
        header = _safetensors_header(path)
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_length = struct.unpack("<Q", handle.read(8))[0]
    except (OSError, ValueError) as exc:
        return str(exc) if str(path) in str(exc) else f"{path}: {exc}"
    try:
        expected = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0
        )
    except (TypeError, KeyError, ValueError, IndexError):
        return f"{path}: not a safetensors file (a tensor entry without data_offsets)"
    present = size - 8 - header_length
    if present < expected:
        return f"{path}: truncated: {present} of its {expected} bytes of tensor data are there (an interrupted copy or download?)"
    return None


def tensor_data_sha256(path: Path) -> str:
    """A hash of the file's tensor bytes alone (its header, metadata included, left out)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = struct.unpack("<Q", handle.read(8))[0]
        handle.seek(8 + header_length)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def update_safetensors_metadata(path: Path, update: Callable[[dict[str, str]], dict[str, str] | None]) -> bool:
    """Rewrite a safetensors file's metadata in place and whole (a new file renamed over it; tensors copied as bytes).
    `update` gets the metadata and returns the new one, or None to leave the file as it is. Returns whether it changed."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        metadata = update(dict(header.get("__metadata__") or {}))
        if metadata is None:
            return False
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors keeps the data 8-byte aligned
        atomic_write_file(path, lambda staging: _write_with_header(staging, encoded, handle))
    return True


def _write_with_header(target: Path, header: bytes, source) -> None:
    with open(target, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        shutil.copyfileobj(source, out)
