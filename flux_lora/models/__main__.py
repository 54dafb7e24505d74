"""Command line: check or fetch the FLUX.1-dev files the composed config names.

    python -m flux_lora.models check [--sha256] [overrides]   e.g. model=flux_dev paths.models=/models
    python -m flux_lora.models fetch [--force] [overrides]

One line per file (ok on stdout, problems as `error:` on stderr). Exit 0: every file is usable;
1: a file is not; 2: bad arguments or config.
"""

from __future__ import annotations

import argparse
import sys

from flux_lora.models.verify import FileVerdict, configured_files, sha256_verdict, verify_file

EXIT_BAD_FILE = 1
EXIT_BAD_INPUT = 2


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage too; one line is the contract
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m flux_lora.models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    check = commands.add_parser("check", help="read each file's header: complete, the right part, shapes, precision")
    check.add_argument(
        "--sha256", action="store_true", help="also hash each file (minutes for 24 GB) against the pinned table"
    )
    check.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch.py")
    fetch = commands.add_parser(
        "fetch", help="download the files from the Hugging Face Hub (HF_TOKEN for the gated ones), then check"
    )
    fetch.add_argument("--force", action="store_true", help="download even files that already pass the check")
    fetch.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch.py")
    return parser


def compose_run(overrides: list[str]):
    """The run config as launch.py composes it (conf/, conf/local/, the overrides), typed."""
    from hydra import compose, initialize_config_dir

    from flux_lora.compose import CONF_DIR, load_run, register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return load_run(compose("config", overrides=overrides))


def _report(verdicts: list[FileVerdict]) -> int:
    for verdict in verdicts:
        if verdict.problem:
            print(f"error: {verdict.line}", file=sys.stderr)
        else:
            print(verdict.line)
    return EXIT_BAD_FILE if any(v.problem for v in verdicts) else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run = compose_run(args.overrides)
    except Exception as exc:  # noqa: BLE001 - a config error is one line, as in launch.py
        from flux_lora.compose import describe_config_error

        print(f"error: {describe_config_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if run.model.kind.value != "flux_dev":
        print(
            f"error: model={run.model.name}: its weights are made in code, no files to {args.command}; add model=flux_dev",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    files = configured_files(run.model)
    if args.command == "fetch":
        from flux_lora.models.fetch import fetch_model_files

        return _report(fetch_model_files(files, fp8_base=run.gpu.fp8_base, force=args.force))
    verdicts = [verify_file(key, path, fp8_base=run.gpu.fp8_base) for key, path in files.items()]
    if args.sha256:
        verdicts += [sha256_verdict(v.key, v.path) for v in verdicts if v.problem is None]
    return _report(verdicts)


if __name__ == "__main__":
    sys.exit(main())
