"""Launcher overhead: a dry run of the embedded default against a trivial `@hydra.main` app.

    python benchmarks/bench_launcher_overhead.py [--runs 5] [--out benchmarks/results/launcher_overhead.md]
    python benchmarks/bench_launcher_overhead.py --baseline /tmp/before   # also an older checkout, same rounds

Both are started as fresh processes, in pairs (trivial, then launcher), after one unmeasured run of
each; the launcher's dataset-analysis cache is warm, as it is on every launch after the first. The
difference is what compose-check-freeze costs over Hydra itself. Target: within 0.5 s.
On shared cores the absolute figures move with the load; --baseline measures another checkout
(e.g. `git worktree add /tmp/before HEAD~1`) in the same rounds, so a before/after is compared under one load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5

TRIVIAL_APP = """
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    print("ok")


if __name__ == "__main__":
    main()
"""


def seconds(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    # The load average says whether other work shared the cores (medians only damp that so far).
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}{load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the printed lines to this file")
    parser.add_argument("--baseline", type=Path, help="another checkout whose launch.py is measured in the same rounds")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-launcher-"))
    try:
        (workdir / "trivial_app.py").write_text(TRIVIAL_APP)
        trivial = [sys.executable, str(workdir / "trivial_app.py")]

        def dry_run(root: Path, tag: str) -> list[str]:
            return [
                sys.executable,
                str(root / "launch.py"),
                "launch.dry_run=true",
                f"paths.outputs={workdir / f'outputs-{tag}'}",
                f"paths.cache={workdir / f'cache-{tag}'}",
            ]

        launcher = dry_run(PROJECT_ROOT, "this")
        baseline = dry_run(args.baseline.resolve(), "baseline") if args.baseline else None
        commands = [trivial, launcher] + ([baseline] if baseline else [])
        for command in commands:
            seconds(command, workdir)  # warm the page cache and the analysis cache
        rounds = [[seconds(command, workdir) for command in commands] for _ in range(args.runs)]
        trivial_s = statistics.median(r[0] for r in rounds)
        launcher_s = statistics.median(r[1] for r in rounds)
        paired_s = statistics.median(r[1] - r[0] for r in rounds)
        verdict = "within" if launcher_s - trivial_s <= TARGET_S else "OVER"
        lines = [
            f"machine: {machine()}",
            f"median of {args.runs} paired runs, each a fresh process",
            f"trivial @hydra.main app:           {trivial_s:6.2f} s",
            f"launch.py launch.dry_run=true:     {launcher_s:6.2f} s  (embedded default, analysis cache warm)",
            f"difference:                        {launcher_s - trivial_s:6.2f} s  (median of paired differences {paired_s:.2f} s)",
            f"target {TARGET_S} s: {verdict}",
        ]
        if baseline:
            baseline_s = statistics.median(r[2] for r in rounds)
            lines.append(
                f"baseline {args.baseline}: {baseline_s:.2f} s, difference {baseline_s - trivial_s:.2f} s "
                f"(median of paired differences {statistics.median(r[2] - r[0] for r in rounds):.2f} s), same rounds"
            )
        text = "\n".join(lines)
        print(text)
        if args.out:
            args.out.write_text(f"# Launcher overhead (benchmarks/bench_launcher_overhead.py)\n\n```\n{text}\n```\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
