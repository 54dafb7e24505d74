"""Share a LoRA: strip what its metadata says about where and by whom it was trained, tensors untouched.

    python -m flux_lora.share my-lora.safetensors [--to shareable|none] [-o OUT]

`shareable` (the default) keeps the run's record without absolute paths, host and user names (flux_lora.provenance:
the keys it withheld are listed in it) and drops kohya ss_* values that are paths; `none` keeps kohya's ss_* keys
only. The file is copied to OUT (default: `<name>.<mode>.safetensors` beside it; never changed in place) with a new
header; the tensor bytes are compared by hash before it says done.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from flux_lora.checkpoint_files import (
    read_safetensors_metadata,
    safetensors_problem,
    tensor_data_sha256,
    update_safetensors_metadata,
)
from flux_lora.provenance import METADATA_KEY, EmbedRecord, compact, shareable_metadata, shareable_record


def shared_metadata(metadata: dict[str, str], to: EmbedRecord) -> dict[str, str]:
    """The metadata a shared copy carries."""
    new = shareable_metadata({k: v for k, v in metadata.items() if k != METADATA_KEY})
    if to == EmbedRecord.shareable and METADATA_KEY in metadata:
        record = json.loads(metadata[METADATA_KEY])
        new[METADATA_KEY] = compact(record if record.get("shareable") else shareable_record(record))
    return new


def share(source: Path, target: Path, to: EmbedRecord) -> str:
    """Write the shared copy; returns the tensor bytes' sha256 (the same in both files)."""
    before = tensor_data_sha256(source)
    shutil.copyfile(source, target)
    update_safetensors_metadata(target, lambda metadata: shared_metadata(metadata, to))
    after = tensor_data_sha256(target)
    if after != before:
        target.unlink()
        raise RuntimeError(f"{target}: its tensor bytes differ from {source}'s after the copy; removed it")
    return after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_lora.share", description=__doc__.split("\n\n")[0])
    parser.add_argument("lora", type=Path, help="a LoRA file (.safetensors)")
    parser.add_argument(
        "--to", choices=[EmbedRecord.shareable.value, EmbedRecord.none.value], default=EmbedRecord.shareable.value
    )
    parser.add_argument("-o", "--output", type=Path, help="where the shared copy goes (default: beside the file)")
    args = parser.parse_args(argv)
    problem = safetensors_problem(args.lora) if args.lora.is_file() else f"{args.lora}: no such file"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    to = EmbedRecord(args.to)
    target = args.output or args.lora.with_name(f"{args.lora.stem}.{to.value}.safetensors")
    if target.resolve() == args.lora.resolve():
        print(f"error: -o {target}: the shared copy must not replace the original", file=sys.stderr)
        return 2
    digest = share(args.lora, target, to)
    kept = read_safetensors_metadata(target)
    record = json.loads(kept[METADATA_KEY]) if METADATA_KEY in kept else None
    withheld = f", {len(record.get('withheld') or [])} private value(s) withheld" if record else ", no flux-lora record"
    print(f"shared copy: {target} ({to.value}{withheld}; tensors unchanged, sha256 {digest[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
