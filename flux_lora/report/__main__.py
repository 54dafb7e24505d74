"""`python -m flux_lora.report DIR [...]` (table + report.html + report.md) and `... rate SWEEP_DIR` (blind rating)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flux_lora.report.summary import STATUS_UNREADABLE, find_run_dirs, print_summary, read_run


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flux_lora.report", description="Summary table, report.html and report.md of a sweep or run."
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument(
        "--prompt",
        type=int,
        default=0,
        help="sample prompt shown side by side (index into dataset.sample_prompts; default 0)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="which seed's runs the sample grid shows (default: the smallest)"
    )
    parser.add_argument("--no-page", action="store_true", help="print the table only, write no report files")
    parser.add_argument(
        "--with",
        dest="beside",
        type=Path,
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="put these runs beside the cells, e.g. an external LoRA's evaluation (outputs/evals/<name>-<hash>)",
    )
    args = parser.parse_args(argv)
    for extra in args.beside:
        if not find_run_dirs(extra):
            print(
                f"--with {extra}: holds no run (no run.json); give a folder written by launch.py or python -m flux_lora.eval --lora",
                file=sys.stderr,
            )
            return 2
    for root in args.dirs:
        if not root.is_dir():
            print(f"{root}: no such directory; pass a run or sweep directory under outputs/", file=sys.stderr)
            return 2
        run_dirs = find_run_dirs(root)
        if not run_dirs:
            print(
                f"{root}: holds no run (no run.json or run_pointer.json below it); pass a run or sweep directory under outputs/",
                file=sys.stderr,
            )
            return 2
        rows = [read_run(d) for d in run_dirs]
        print_summary(rows, title=str(root))
        for row in rows:
            if row.state == STATUS_UNREADABLE:
                print(f"warning: {row.run_dir / 'status.json'}: {row.note}", file=sys.stderr)
        if not args.no_page:
            from flux_lora.report.page import write_report

            html, md = write_report(root, prompt=args.prompt, seed=args.seed, beside=tuple(args.beside))
            print(f"report: {html} (and {md.name})")
    return 0


def rate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flux_lora.report rate",
        description="Blind 1-5 rating of a sweep's final samples in the browser.",
    )
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    from flux_lora.report.rate_server import serve

    return serve(args.sweep_dir, args.port)


def main(argv: list[str]) -> int:
    if not argv:
        print(
            "usage: python -m flux_lora.report RUN_OR_SWEEP_DIR [...] | python -m flux_lora.report rate SWEEP_DIR",
            file=sys.stderr,
        )
        return 2
    if argv[0] == "rate":
        return rate_main(argv[1:])
    return report_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
