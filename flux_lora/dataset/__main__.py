"""Command line: analyze, prepare, fingerprint. Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from flux_lora.dataset import (
    AnalysisSettings,
    GateSettings,
    PrepareSettings,
    analyze_dataset,
    evaluate_gate,
    fingerprint_dataset,
    parse_aspect,
    prepare_dataset,
    print_report,
    write_contact_sheet,
)

EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flux-lora" / "dataset-analysis"


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage too; one line is the contract
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="python -m flux_lora.dataset", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    analyze = commands.add_parser("analyze", help="check a dataset folder; exit 1 if the default gate fails")
    analyze.add_argument("path", type=Path)
    analyze.add_argument("--resolution", type=_positive_int, default=512, help="training resolution (square side)")
    analyze.add_argument("--trigger", default="", help='trigger token, e.g. "TOK Woman"; empty skips trigger checks')
    analyze.add_argument("--caption-extension", default=".txt")
    analyze.add_argument("--out", type=Path, help="write dataset_report.json and contact_sheet.png here")
    analyze.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    analyze.add_argument("--no-faces", action="store_true", help="skip face detection")
    analyze.add_argument("--workers", type=_positive_int, default=2)
    analyze.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    analyze.add_argument("--no-cache", action="store_true")
    analyze.add_argument("--warn-only", action="store_true", help="report gate failures as warnings, exit 0")

    prepare = commands.add_parser("prepare", help="write a cleaned copy of a dataset to a new folder")
    prepare.add_argument("source", type=Path)
    prepare.add_argument("destination", type=Path)
    prepare.add_argument("--trigger", default="", help="inserted at the start of captions that lack it")
    prepare.add_argument("--crop-aspect", help="face-centred crops at this aspect, e.g. 1:1 or 3:4")
    prepare.add_argument("--keep-duplicates", action="store_true")
    prepare.add_argument("--caption-extension", default=".txt")

    fingerprint = commands.add_parser("fingerprint", help="print the dataset's content fingerprint as JSON")
    fingerprint.add_argument("path", type=Path)
    fingerprint.add_argument("--caption-extension", default=".txt")
    fingerprint.add_argument("--files", action="store_true", help="include the per-file hashes")
    return parser


def _analyze(args: argparse.Namespace) -> int:
    settings = AnalysisSettings(
        resolution=args.resolution,
        trigger=args.trigger,
        caption_extension=args.caption_extension,
        detect_faces=not args.no_faces,
        workers=args.workers,
        cache_dir=None if args.no_cache else args.cache_dir,
    )
    report = analyze_dataset(args.path, settings)
    gate = evaluate_gate(report, GateSettings(enforce=not args.warn_only))
    if args.out:
        report.write_json(args.out / "dataset_report.json")
        write_contact_sheet(report, args.path, args.out / "contact_sheet.png")
    if args.json:
        document = report.to_dict()
        document["gate"] = {"passed": gate.passed, "problems": gate.problems, "warnings": gate.warnings}
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return 0 if gate.passed else EXIT_GATE_FAILED
    console = Console()
    print_report(report, console)
    for warning in gate.warnings:
        console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
    for problem in gate.problems:
        console.print(f"[red]problem[/red]: {problem}", highlight=False)
    console.print("[green]gate passed[/green]" if gate.passed else "[red]gate failed[/red]")
    if args.out:
        console.print(f"wrote {args.out / 'dataset_report.json'} and {args.out / 'contact_sheet.png'}")
    return 0 if gate.passed else EXIT_GATE_FAILED


def _prepare(args: argparse.Namespace) -> int:
    settings = PrepareSettings(
        trigger=args.trigger,
        crop_aspect=parse_aspect(args.crop_aspect) if args.crop_aspect else None,
        drop_duplicates=not args.keep_duplicates,
        caption_extension=args.caption_extension,
    )
    manifest = prepare_dataset(args.source, args.destination, settings)
    print(f"wrote {len(manifest['files'])} images to {args.destination}, dropped {len(manifest['dropped'])}")
    for entry in manifest["dropped"]:
        print(f"  dropped {entry['source']}: {entry['reason']}")
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    fingerprint = fingerprint_dataset(args.path, args.caption_extension)
    if not args.files:
        fingerprint = {key: value for key, value in fingerprint.items() if key != "files"}
    print(json.dumps(fingerprint, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"analyze": _analyze, "prepare": _prepare, "fingerprint": _fingerprint}
    try:
        return handlers[args.command](args)
    except (ValueError, OSError) as error:  # DatasetError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
