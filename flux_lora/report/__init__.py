"""Report: what a sweep (or a single run) did, built only from its run directories.

summary.py   the terminal table printed at the end of every sweep
collect.py   one record per run (state, training numbers, eval/eval.json) grouped into cells over seeds
stats.py     mean and 95% interval over seeds, Welch's t-test against baseline, Holm's correction
page.py      report.html (self-contained) and report.md, with plots.py and samples.py for the pictures
ratings.py   ratings.jsonl read back per cell; rate_server.py the blind rating page

    python -m flux_lora.report SWEEP_OR_RUN_DIR [...]       # table, report.html, report.md
    python -m flux_lora.report rate SWEEP_DIR              # blind 1-5 rating of the final samples
"""

from pathlib import Path

from flux_lora.report.summary import (
    SKIPPED_DONE,
    RunRow,
    SweepDirRecorder,
    find_run_dirs,
    last_scalar,
    print_summary,
    read_run,
)


def write_sweep_report(sweep_dir: Path) -> Path | None:
    """report.html and report.md for a sweep, or a warning line; the page's imports (matplotlib, scipy,
    jinja2) load only here, so the launcher stays quick to start."""
    from flux_lora.report.page import write_report_quietly

    return write_report_quietly(sweep_dir)


__all__ = [
    "SKIPPED_DONE",
    "RunRow",
    "SweepDirRecorder",
    "find_run_dirs",
    "last_scalar",
    "print_summary",
    "read_run",
    "write_sweep_report",
]
