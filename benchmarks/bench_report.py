"""Report speed: `python -m flux_lora.report SWEEP_DIR` on a 27-run sweep (9 ablation cells x 3 seeds).

    python benchmarks/bench_report.py [--runs 3] [--source RUN_DIR] [--out benchmarks/results/report_speed.md]

The sweep is real on disk: one real tiny run (trained and evaluated by the CLI, unless --source names one)
copied 27 times, each copy with its own cell, seed, run.json, config.yaml, TensorBoard events, samples and
eval/eval.json, whose numbers are varied per cell and seed. The timed command is the whole CLI in a fresh
process (imports, 27 runs read, statistics, three plots, thumbnails, HTML and Markdown). Target: under 5 s.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
from bench_launcher_overhead import machine  # noqa: E402 - the same machine line as the other benchmarks

TARGET_S = 5.0
CELLS = [
    "baseline",
    "a1_alpha",
    "a2_noise_offset",
    "a3_grad_accum",
    "a4_adafactor",
    "a5_fp8_base",
    "a6_min_snr",
    "a7_dropout",
    "a8_all",
]
SEEDS = (1, 2, 3)
TINY_RUN = [
    "profile.max_train_steps=4",
    "profile.lr_warmup_steps=1",
    "profile.save_every_n_steps=2",
    "profile.sample_every_n_steps=2",
    "profile.sample_steps=1",
    "profile.resolution=64",
    "dataset.min_bucket_reso=64",
    "eval.enabled=true",
    "eval.strengths=[0.5,1.0]",
    "eval.seeds=[0,1]",
    "eval.max_prompts=1",
]


def make_source_run(work: Path) -> Path:
    """One real 4-step tiny run, evaluated at its end (eval.enabled=true)."""
    subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "launch.py"),
            *TINY_RUN,
            f"paths.outputs={work / 'outputs'}",
            f"paths.cache={work / 'cache'}",
        ],
        cwd=work,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (run_dir,) = [p.parent for p in (work / "outputs").rglob("run.json")]
    if not (run_dir / "eval" / "eval.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "flux_lora.eval",
                str(run_dir),
                "--strengths",
                "0.5,1.0",
                "--seeds",
                "0,1",
                "--max-prompts",
                "1",
            ],
            cwd=PROJECT_ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return run_dir


def _scale_losses(evaluation: dict, factor: float) -> None:
    validation = evaluation.get("validation") or {}
    for point in validation.get("curve", []):
        if point.get("step"):  # step 0 is the base model: the same in every cell
            point["loss"] *= factor
    for key in ("best", "final"):
        if validation.get(key):
            validation[key]["loss"] *= factor
    for block in ((evaluation.get("diversity") or {}).get("by_strength") or {}).values():
        if block.get("mean_phash_distance") is not None:
            block["mean_phash_distance"] *= factor


def build_sweep(source: Path, sweep: Path) -> None:
    """27 copies of the source run, each turned into one cell and seed of the ablation matrix."""
    rng = random.Random(0)
    for index, (cell, seed) in enumerate((c, s) for c in CELLS for s in SEEDS):
        target = sweep / f"{index}_tiny-smoke-cpu-native-{cell}-seed{seed}"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*-state", "report*", ".flux-lora-claim"))
        # Cells 1-3 lower the loss, 4-5 do nothing, 6-8 raise it; seeds add noise of about a third of a step.
        effect = 1.0 + 0.002 * ([0, -3, -2, -1, 0, 0, 1, 2, 3][CELLS.index(cell)]) + rng.gauss(0, 0.0007)
        run = json.loads((target / "run.json").read_text())
        run.update(
            name=f"tiny-smoke-cpu-native-{cell}-seed{seed}",
            run_id=f"{index:012x}",
            ablation={"name": cell, "changes": ["profile.network_alpha"]},
        )
        (target / "run.json").write_text(json.dumps(run, indent=2))
        config = yaml.safe_load((target / "config.yaml").read_text())
        config["ablation"]["name"], config["profile"]["seed"] = cell, seed
        config["profile"]["network_alpha"] = 1 if cell == "baseline" else 8
        (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        evaluation = json.loads((target / "eval" / "eval.json").read_text())
        _scale_losses(evaluation, effect)
        (target / "eval" / "eval.json").write_text(json.dumps(evaluation))
        summary = json.loads((target / "output" / "train_summary.json").read_text())
        summary.update(
            average_loss=summary["average_loss"] * effect, seconds=summary["seconds"] * rng.uniform(0.9, 1.1)
        )
        (target / "output" / "train_summary.json").write_text(json.dumps(summary))


def time_report(sweep: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flux_lora.report", str(sweep)], cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--source", type=Path, default=None, help="an evaluated run directory to copy (default: train and evaluate one)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        work = Path(tmp)
        source = args.source or make_source_run(work)
        sweep = work / "sweep"
        build_sweep(source, sweep)
        time_report(sweep)  # unmeasured: the OS file cache warm, as after a sweep
        times = [time_report(sweep) for _ in range(args.runs)]
        md = (sweep / "report.md").read_text()
        marked = sum(md.count(f"| {word} (p=") for word in ("better", "worse"))
    median = statistics.median(times)
    lines = [
        f"machine: {machine()}",
        f"sweep: {len(CELLS)} cells x {len(SEEDS)} seeds = {len(CELLS) * len(SEEDS)} runs, each with eval/eval.json, TensorBoard events, samples",
        f"python -m flux_lora.report SWEEP_DIR, fresh process, median of {args.runs}: {median:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})",
        f"cells marked better/worse than baseline on validation loss: {marked} of {len(CELLS) - 1}",
        f"target {TARGET_S:.0f} s: {'met' if median < TARGET_S else 'OVER'}",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("# Report speed (benchmarks/bench_report.py)\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0 if median < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
