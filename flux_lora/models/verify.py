"""Judge a FLUX.1-dev file from its safetensors header alone: complete, the right part, the right
architecture, the expected precision. One line per file that is not, naming the file and the fix.

Standard library only (plus the schema for `model_file_problems`), so every launch can afford it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from flux_lora.models.header import DTYPE_BYTES, HeaderTruncated, NotSafetensors, SafetensorsHeader, read_header
from flux_lora.models.layout import (
    FLUX_DEV,
    FP8,
    PART_KEYS,
    PRECISION_NAMES,
    WIDE,
    ModelLayout,
    PartLayout,
    block_indices,
    identify,
    normalise_key,
)
from flux_lora.models.sources import HUB_FILES

FETCH_HINT = "python -m flux_lora.models fetch model=flux_dev paths.models=<dir>"
REDOWNLOAD = f"download it again ({FETCH_HINT})"
DEFAULT_NAMES = {
    "transformer": "flux1-dev.safetensors",
    "vae": "ae.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5xxl": "t5xxl_fp16.safetensors",
}


def precision_name(dtypes: set[str]) -> str:
    names = sorted(f"{PRECISION_NAMES.get(d, d.lower())} ({d})" for d in dtypes)
    return names[0] if len(names) == 1 else "mixed " + " + ".join(names)


@dataclass(frozen=True)
class Precision:
    """Which dtypes a file may hold, what that is in words and why, for the error line."""

    accepted: tuple[str, ...]
    expected: str
    why: str


def expected_precision(part: PartLayout, path: Path, fp8_base: bool) -> Precision:
    """fp8 only where it was asked for: sd-scripts loads an fp8 transformer as-is only with --fp8_base (it casts it
    to bf16 otherwise, training on a quantised base without saying so); an fp8 text encoder is fine when its name
    says so. A file whose name says fp8 must hold fp8 (or it is not the file the config names), except a
    transformer without gpu.fp8_base, which is read as bf16 whatever its name."""
    fp8 = precision_name({FP8})
    name_fp8 = "fp8" in path.name.lower()
    if part.key == "transformer" and not fp8_base:
        return Precision(part.accepted_dtypes, precision_name({part.release_dtype}), "gpu.fp8_base=false")
    if name_fp8:
        return Precision((FP8,), fp8, "its name says fp8")
    if part.key == "transformer":
        return Precision(
            (*part.accepted_dtypes, FP8), f"{precision_name({part.release_dtype})} or {fp8}", "gpu.fp8_base=true"
        )
    return Precision(
        part.accepted_dtypes,
        f"16/32-bit (published: {precision_name({part.release_dtype})})",
        "its name does not say fp8",
    )


@dataclass(frozen=True)
class FileVerdict:
    key: str
    path: Path
    problem: str | None = None  # None: the file is what the config expects
    summary: str = ""  # what the file is, for the ok line

    @property
    def line(self) -> str:
        return f"model.{self.key}: {self.path} {self.problem if self.problem else 'ok: ' + self.summary}"


def _size_problem(header: SafetensorsHeader) -> str | None:
    expected, actual = header.expected_size, header.file_size
    if actual < expected:
        return f"is truncated: {actual:,} bytes where its header says {expected:,} ({expected - actual:,} missing); {REDOWNLOAD}"
    if actual > expected:
        return (
            f"is {actual:,} bytes where its header says {expected:,}: damaged (bytes after the weights); {REDOWNLOAD}"
        )
    for name, t in header.tensors.items():
        width = DTYPE_BYTES.get(t.dtype)
        if width is not None and t.end - t.start != width * math.prod(t.shape):
            return f"has a damaged header: {name} ({t.dtype} {list(t.shape)}) does not fit its {t.end - t.start:,} bytes; {REDOWNLOAD}"
    return None


def _part_problem(keys: set[str], tensors: dict, part: PartLayout, layout: ModelLayout) -> str | None:
    kind = identify(keys, layout)
    wanted = f"the {part.title}"
    if kind != part.key:
        if kind in layout.parts:
            other = layout.parts[kind]
            return (
                f"holds the {other.title}, not {wanted}: a wrong file under this name; point model.{kind} at it and "
                f"model.{part.key} at {DEFAULT_NAMES[part.key]}"
            )
        what = (
            f"is {kind}, not {wanted}"
            if kind
            else f"is not {wanted} (no {' or '.join(f + '*' for f in part.families[:2])} tensors)"
        )
        return f"{what}; point model.{part.key} at {DEFAULT_NAMES[part.key]} ({FETCH_HINT})"
    for family in part.families:
        if not any(k.startswith(family) for k in keys):
            if family in part.absent_means:
                return (
                    f"is {part.absent_means[family]}, not {layout.name}; use {layout.name}'s {DEFAULT_NAMES[part.key]}"
                )
            return f"lacks the {family}* tensors of {wanted}: an incomplete or different model; {REDOWNLOAD}"
    differences = []
    for expected in part.tensors:
        present = next((k for k in expected.keys if k in tensors), None)
        if present is None:
            differences.append(f"lacks {expected.keys[0]}")
        elif tensors[present].shape != expected.shape:
            differences.append(
                f"{present} is {list(tensors[present].shape)} where {layout.name} has {list(expected.shape)}"
            )
    counts = [(c, block_indices(keys, c.pattern)) for c in part.blocks]
    wrong = [(c, found) for c, found in counts if len(found) != c.expected or (found and max(found) + 1 != len(found))]
    if wrong:
        have = " and ".join(f"{len(found)} {c.label}" for c, found in counts)
        want = " and ".join(str(c.expected) for c, _ in counts)
        differences.insert(0, f"has {have} where {layout.name} has {want}")
    if differences:
        more = f" (and {len(differences) - 1} more difference(s))" if len(differences) > 1 else ""
        of = "" if layout.name in part.title else f" of {layout.name}"
        return f"is not {wanted}{of}: {differences[0]}{more}; use {DEFAULT_NAMES[part.key]} ({FETCH_HINT})"
    return None


def verify_file(key: str, path: Path, *, layout: ModelLayout = FLUX_DEV, fp8_base: bool = False) -> FileVerdict:
    """What `path`, given as model.<key>, is, and the one problem that makes it unusable if there is one."""
    part = layout.parts[key]
    path = Path(path)
    if not path.is_file():
        return FileVerdict(key, path, f"not found; set model.{key}=<path> or paths.models=<dir>, or run {FETCH_HINT}")
    try:
        header = read_header(path)
    except HeaderTruncated as exc:
        return FileVerdict(
            key,
            path,
            f"is truncated: {exc.actual:,} bytes, fewer than its header alone needs ({exc.expected_at_least:,}); {REDOWNLOAD}",
        )
    except NotSafetensors as exc:
        return FileVerdict(key, path, f"{exc}, not the safetensors {part.title}; {REDOWNLOAD}")
    except OSError as exc:
        return FileVerdict(key, path, f"cannot be read ({exc.strerror or exc}); check its permissions")
    problem = _size_problem(header)
    if problem:
        return FileVerdict(key, path, problem)
    tensors = {normalise_key(k): v for k, v in header.tensors.items()}
    keys = set(tensors)
    problem = _part_problem(keys, tensors, part, layout)
    if problem:
        return FileVerdict(key, path, problem)
    if any(k.endswith(("scale_weight", "scaled_fp8")) for k in keys):
        return FileVerdict(
            key,
            path,
            "is a scaled-fp8 file (ComfyUI's *_scaled: per-tensor scales that neither engine applies); "
            f"use the plain fp8 e4m3fn or 16-bit file ({FETCH_HINT})",
        )
    dtypes = {tensors[k].dtype for k in part.weights if k in tensors}
    found = precision_name(dtypes)
    allowed = expected_precision(part, path, fp8_base)
    if not dtypes <= set(allowed.accepted):
        return FileVerdict(key, path, _precision_fix(part, path, found, allowed, dtypes))
    blocks = ", ".join(f"{len(block_indices(keys, c.pattern))} {c.label}" for c in part.blocks)
    return FileVerdict(key, path, summary=f"{part.title}, {found}, {blocks}, {header.file_size / 1e9:.2f} GB")


def _precision_fix(part: PartLayout, path: Path, found: str, allowed: Precision, dtypes: set[str]) -> str:
    line = f"holds the {found} {part.title} where {allowed.expected} is expected ({allowed.why})"
    if dtypes - set(WIDE) - {FP8}:
        return f"{line}; neither engine reads {found}: use the published {precision_name({part.release_dtype})} file ({FETCH_HINT})"
    if part.key == "transformer" and FP8 in dtypes and FP8 not in allowed.accepted:
        return f"{line}; set gpu.fp8_base=true (gpu=rtx4090 does) to train on this fp8 file, or use the bf16 {DEFAULT_NAMES['transformer']}"
    if FP8 in dtypes:
        return (
            f"{line}; an fp8 file under a 16-bit name: name it *_fp8_e4m3fn.safetensors and point model.{part.key} at it, "
            f"or use {DEFAULT_NAMES[part.key]}"
        )
    return f"{line}; a 16-bit file under an fp8 name: rename it, or use the fp8 e4m3fn file (t5xxl_fp8_e4m3fn.safetensors for T5)"


def configured_files(model) -> dict[str, Path]:
    """model.transformer, .vae, .clip_l, .t5xxl that are set, as paths."""
    return {key: Path(value).expanduser() for key in PART_KEYS if (value := getattr(model, key, None))}


def model_file_problems(run) -> list[str]:
    """For the launch check: one line per configured FLUX.1-dev file that is present but unusable (a missing
    file is the engine's line already). Nothing for the tiny model, nor for single files the native engine
    does not read because model.diffusers_dir is set."""
    from flux_lora.schema import EngineName, ModelKind

    if run.model.kind != ModelKind.flux_dev:
        return []
    if run.model.diffusers_dir is not None and run.engine.name == EngineName.native:
        return []
    files = {k: p for k, p in configured_files(run.model).items() if p.is_file()}
    verdicts = (verify_file(k, p, fp8_base=run.gpu.fp8_base) for k, p in files.items())
    return [v.line for v in verdicts if v.problem]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_verdict(key: str, path: Path, pinned: dict[str, str | None] | None = None) -> FileVerdict:
    """The file's sha256 against the pinned table (sources.HUB_FILES by file name, or `pinned`)."""
    table = pinned if pinned is not None else {name: f.sha256 for name, f in HUB_FILES.items()}
    actual = file_sha256(path)
    expected = table.get(path.name)
    if expected is None:
        return FileVerdict(key, path, summary=f"sha256 {actual} (no pinned value for {path.name}: not compared)")
    if actual != expected.lower():
        return FileVerdict(
            key,
            path,
            f"has sha256 {actual} where {path.name} has {expected}: a different or damaged file; {REDOWNLOAD}",
        )
    return FileVerdict(key, path, summary=f"sha256 {actual} matches the pinned value")
