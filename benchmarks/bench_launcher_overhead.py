"""Launcher overhead: a dry run of the embedded default against a trivial `@hydra.main` app.

    python benchmarks/bench_launcher_overhead.py [--runs 5] [--out benchmarks/results/launcher_overhead.md]

Both are started as fresh processes, in pairs (trivial, then launcher), after one unmeasured run of
each; the launcher's dataset-analysis cache is warm, as it is on every launch after the first. The
difference is what compose-check-freeze costs over Hydra itself. Target: within 0.5 s.
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

TRIVIAL_APP = '''
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    print("ok")


if __name__ == "__main__":
    main()
'''


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
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-launcher-"))
    try:
        (workdir / "trivial_app.py").write_text(TRIVIAL_APP)
        trivial = [sys.executable, str(workdir / "trivial_app.py")]
        launcher = [sys.executable, str(PROJECT_ROOT / "launch.py"), "launch.dry_run=true",
                    f"paths.outputs={workdir / 'outputs'}", f"paths.cache={workdir / 'cache'}"]  # fmt: skip
        seconds(trivial, workdir), seconds(launcher, workdir)  # warm the page cache and the analysis cache
        pairs = [(seconds(trivial, workdir), seconds(launcher, workdir)) for _ in range(args.runs)]
        trivial_s = statistics.median(t for t, _ in pairs)
        launcher_s = statistics.median(t for _, t in pairs)
        paired_s = statistics.median(t - s for s, t in pairs)
        verdict = "within" if launcher_s - trivial_s <= TARGET_S else "OVER"
        lines = [
            f"machine: {machine()}",
            f"median of {args.runs} paired runs, each a fresh process",
            f"trivial @hydra.main app:           {trivial_s:6.2f} s",
            f"launch.py launch.dry_run=true:     {launcher_s:6.2f} s  (embedded default, analysis cache warm)",
            f"difference:                        {launcher_s - trivial_s:6.2f} s  (median of paired differences {paired_s:.2f} s)",
            f"target {TARGET_S} s: {verdict}",
        ]
        text = "\n".join(lines)
        print(text)
        if args.out:
            args.out.write_text(f"# Launcher overhead (benchmarks/bench_launcher_overhead.py)\n\n```\n{text}\n```\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
