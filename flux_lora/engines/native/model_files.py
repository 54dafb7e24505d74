"""Which FLUX.1-dev files the native engine reads, checked without loading anything (no torch: the
launcher calls this at check time, and importing torch there cost it seconds)."""

from __future__ import annotations

from pathlib import Path

FIX_HINT = "or paths.models=<dir>"
CLIP_TOKENIZER_SUBDIRS = ("tokenizer", "clip")
T5_TOKENIZER_SUBDIRS = ("tokenizer_2", "t5")
DIFFUSERS_SUBDIRS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def find_tokenizer_dir(root: Path, subdirs: tuple[str, ...]) -> Path | None:
    for name in subdirs:
        candidate = root / name
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    return None


def missing_flux_dev_files(*, transformer, vae, clip_l, t5xxl, diffusers_dir, tokenizer_dir) -> list[str]:
    """One line per file `load_flux_dev` would need but cannot find, naming the config key that fixes it.

    With `diffusers_dir` set, every part (tokenizers included) comes from that folder and the single
    files are not read; otherwise the four single files plus `tokenizer_dir` are needed.
    """
    if diffusers_dir is not None:
        root = Path(diffusers_dir)
        if not root.is_dir():
            return [f"model.diffusers_dir: {root} not found; set model.diffusers_dir=<path>"]
        return [
            f"model.diffusers_dir: {root / sub} not found; set model.diffusers_dir=<a diffusers FLUX.1-dev folder>"
            for sub in DIFFUSERS_SUBDIRS
            if not (root / sub).is_dir()
        ]
    missing = []
    for key, value in (("transformer", transformer), ("vae", vae), ("clip_l", clip_l), ("t5xxl", t5xxl)):
        if value is None:
            missing.append(f"model.{key}: not set; set model.{key}=<path> {FIX_HINT}")
        elif not Path(value).is_file():
            missing.append(f"model.{key}: {value} not found; set model.{key}=<path> {FIX_HINT}")
    if tokenizer_dir is None:
        missing.append(f"model.tokenizer_dir: not set; set model.tokenizer_dir=<path> {FIX_HINT}")
    else:
        root = Path(tokenizer_dir)
        for what, subdirs in (("CLIP", CLIP_TOKENIZER_SUBDIRS), ("T5", T5_TOKENIZER_SUBDIRS)):
            if find_tokenizer_dir(root, subdirs) is None:
                where = " or ".join(str(root / s) for s in subdirs)
                missing.append(
                    f"model.tokenizer_dir: {what} tokenizer {where} not found; "
                    f"set model.tokenizer_dir=<path> {FIX_HINT}"
                )
    return missing
