"""Watch a sweep (or one run) while it runs: one line per cell, refreshed, from the run folders alone.

    python -m flux_lora.watch SWEEP_OR_RUN_DIR [--once] [--interval S] [--open-with PROGRAM]

Per cell: state, a progress bar of steps, the loss (smoothed) and its trend, it/s, ETA and attempts; below the
table, GPU utilisation, memory and temperature per GPU where NVML answers (nvidia-ml-py, the `gpu` extra), and
the newest sample image of the selected cell as a path. In a terminal, up/down (or k/j) select a cell, `o` opens
its newest sample with the desktop's viewer (xdg-open, or `open` on macOS; --open-with another program) and `q`
quits. It only reads files (status.json, train.log's progress lines, the sweep's multirun.yaml or slurm_jobs.json
for how many cells to expect), so it works on a login node over a shared filesystem and never blocks a run. It
exits by itself once every cell has ended; `--once` prints a single frame for scripts.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flux_lora.lifecycle.slurm import sweep_cells_expected
from flux_lora.records import LOG_FILE
from flux_lora.report.summary import find_run_dirs, read_json, read_run

# Progress lines of both engines: the native job's "step 12/100 loss 0.41 avg 0.43 1.9 it/s ETA 0:46" and
# sd-scripts' tqdm bar "steps:  12%|...| 12/100 [00:06<00:46, 1.9it/s, avr_loss=0.43]".
_NATIVE = re.compile(
    r"step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>[-+\w.]+) avg (?P<avg>[-+\w.]+) (?P<rate>[\d.]+) it/s"
)
_TQDM = re.compile(
    r"(?P<step>\d+)/(?P<total>\d+) \[[^,\]]*(?:<[^,\]]*)?,\s*(?P<rate>[\d.]+)(?:it/s|s/it)[^\]]*avr_loss=(?P<avg>[-+\w.]+)"
)
ENDED = ("succeeded", "failed", "interrupted", "refused", "dry_run", "skipped: done", "busy", "owner gone")
TAIL_BYTES = 64 * 1024


@dataclass
class CellView:
    run_dir: Path
    home: Path | None = None  # where the run's files are: the cell, or where its run_pointer.json points
    name: str = ""
    state: str = "not started"
    step: int = 0
    total: int = 0
    loss: float | None = None  # the moving average the job reports
    rate: float | None = None  # optimizer steps per second
    attempts: int = 0
    history: list[float] = field(default_factory=list)  # earlier smoothed losses, for the trend

    @property
    def trend(self) -> str:
        if len(self.history) < 2 or self.loss is None:
            return ""
        before = self.history[max(0, len(self.history) - 6)]
        return "↓" if self.loss < before * 0.995 else "↑" if self.loss > before * 1.005 else "→"

    @property
    def eta(self) -> str:
        if not self.rate or not self.total or self.state != "running":
            return "-"
        seconds = int((self.total - self.step) / self.rate)
        return f"{seconds // 60}:{seconds % 60:02d}"


def last_progress(log: Path) -> re.Match | None:
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - TAIL_BYTES))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    found = None
    for line in re.split(r"[\r\n]", tail):
        found = _NATIVE.search(line) or _TQDM.search(line) or found
    return found


def refresh(view: CellView) -> None:
    row = read_run(view.run_dir)
    home = (
        view.run_dir
        if (view.run_dir / "run.json").exists()
        else Path(read_json(view.run_dir / "run_pointer.json").get("run_dir", view.run_dir))
    )
    view.name, view.state, view.home = view.run_dir.name, row.state, home
    view.attempts = len(read_json(home / "status.json").get("attempts", []))
    progress = last_progress(home / LOG_FILE)
    if progress:
        view.step, view.total = int(progress["step"]), int(progress["total"])
        view.rate = float(progress["rate"])
        try:
            loss = float(progress["avg"])
        except ValueError:
            loss = None
        if loss is not None and loss != view.loss:
            if view.loss is not None:
                view.history.append(view.loss)
            view.loss = loss
    if view.state == "succeeded" and view.total:
        view.step = view.total


def expected_cells(root: Path) -> int | None:
    """How many cells the sweep will have: SLURM's record, else Hydra's multirun.yaml; None for a single run."""
    slurm = sweep_cells_expected(root)
    if slurm is not None:
        return slurm
    if not (root / "multirun.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    from flux_lora.cost import sweep_cells

    try:
        return len(sweep_cells(OmegaConf.load(root / "multirun.yaml")))
    except Exception:  # noqa: BLE001 - an unreadable sweep record: count the cells that appear
        return None


def gpu_lines() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return ["GPUs: no telemetry (nvidia-ml-py is not installed: pip install 'flux-lora[gpu]')"]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [f"GPUs: none visible here (NVML: {exc})"]
    lines = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        use, memory = pynvml.nvmlDeviceGetUtilizationRates(handle), pynvml.nvmlDeviceGetMemoryInfo(handle)
        temperature = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        lines.append(
            f"GPU {index}: {use.gpu}% busy, {memory.used / 2**30:.1f}/{memory.total / 2**30:.1f} GiB, {temperature} C"
        )
    return lines or ["GPUs: none visible here (NVML reports 0 devices)"]


def newest_sample(cell: CellView | None) -> Path | None:
    if cell is None:
        return None
    samples = sorted(((cell.home or cell.run_dir) / "output" / "sample").glob("*.png"), key=lambda p: p.stat().st_mtime)
    return samples[-1] if samples else None


def default_selection(cells: list[CellView]) -> Path | None:
    """The first running cell, else the first cell."""
    running = [c for c in cells if c.state == "running"] or cells
    return running[0].run_dir if running else None


def frame(
    root: Path,
    cells: list[CellView],
    expected: int | None,
    gpus: list[str],
    selected: Path | None = None,
    keys: bool = False,
    message: str = "",
) -> Group:
    table = Table(title=f"{root}  ({len(cells)}{'/' + str(expected) if expected else ''} cells)", expand=False)
    for column in ("", "cell", "state", "progress", "steps", "loss (avg)", "trend", "it/s", "ETA", "attempts"):
        table.add_column(column)
    for c in cells:
        bar = ProgressBar(total=max(c.total, 1), completed=c.step, width=20)
        table.add_row(
            "›" if c.run_dir == selected else "",
            c.name,
            c.state,
            bar,
            f"{c.step}/{c.total or '?'}",
            "-" if c.loss is None else f"{c.loss:.4f}",
            c.trend,
            "-" if c.rate is None else f"{c.rate:.2f}",
            c.eta,
            str(c.attempts),
        )
    chosen = next((c for c in cells if c.run_dir == selected), None)
    sample = newest_sample(chosen)
    notes = [Text(line) for line in gpus]
    notes.append(Text(f"newest sample of {chosen.name if chosen else '-'}: {sample if sample else 'none yet'}"))
    if keys:
        notes.append(
            Text(
                "keys: ↑/↓ or k/j select a cell · o open its newest sample · q quit"
                + (f"   {message}" if message else ""),
                style="dim",
            )
        )
    return Group(table, *notes)


def opener(program: str | None) -> str | None:
    """The program that shows an image on this desktop, or None when there is none."""
    if program:
        return program
    return shutil.which("open" if sys.platform == "darwin" else "xdg-open")


def open_sample(sample: Path | None, program: str | None) -> str:
    """Open the sample in the viewer, detached (the watch keeps refreshing); the line to show about it."""
    if sample is None:
        return "no sample yet in this cell"
    if program is None:
        return "no image viewer here (xdg-open not found): give one with --open-with"
    try:
        subprocess.Popen(
            [program, str(sample)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        return f"could not start {program}: {exc.strerror}"
    return f"opened {sample.name} with {Path(program).name}"


@contextmanager
def keystrokes(enabled: bool) -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive one by one, unechoed) while watching; restored however the watch ends."""
    if not enabled:
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_keys(fd: int | None, timeout_s: float) -> str:
    """Keys typed within timeout_s ("" if none); arrow keys come as escape sequences."""
    if fd is None:
        time.sleep(timeout_s)
        return ""
    ready, _, _ = select.select([fd], [], [], timeout_s)
    return os.read(fd, 64).decode("utf-8", errors="replace") if ready else ""


def move(cells: list[CellView], selected: Path | None, by: int) -> Path | None:
    if not cells:
        return selected
    names = [c.run_dir for c in cells]
    index = names.index(selected) if selected in names else 0
    return names[max(0, min(len(names) - 1, index + by))]


def all_ended(cells: list[CellView], expected: int | None) -> bool:
    return bool(cells) and len(cells) >= (expected or 1) and all(c.state in ENDED for c in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_lora.watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a sweep folder or a run folder")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    parser.add_argument(
        "--open-with", metavar="PROGRAM", help="the image viewer `o` starts (default: xdg-open, or open on macOS)"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root}: no such folder; give a sweep or run folder (outputs/sweeps/<dir>)", file=sys.stderr)
        return 2
    console = Console()
    views: dict[Path, CellView] = {}
    gpus = gpu_lines()

    def update() -> tuple[list[CellView], int | None]:
        for run_dir in find_run_dirs(args.root):
            refresh(views.setdefault(run_dir, CellView(run_dir)))
        return [views[d] for d in sorted(views, key=lambda d: d.name)], expected_cells(args.root)

    cells, expected = update()
    if args.once:
        console.print(frame(args.root, cells, expected, gpus, default_selection(cells)))
        return 0
    interactive = sys.stdin.isatty()
    chosen: Path | None = None  # the user's choice; until there is one, the first running cell
    message = ""
    with keystrokes(interactive) as fd, Live(console=console, refresh_per_second=4, screen=False) as live:
        while True:
            selected = chosen or default_selection(cells)
            live.update(frame(args.root, cells, expected, gpus, selected, interactive, message))
            if all_ended(cells, expected):
                return 0
            deadline = time.monotonic() + args.interval
            while (left := deadline - time.monotonic()) > 0:
                typed = read_keys(fd, left)
                for key in re.findall(r"\x1b\[[AB]|.", typed, flags=re.DOTALL):
                    if key in ("q", "Q"):
                        return 0
                    if key in ("\x1b[A", "k", "\x1b[B", "j"):
                        chosen = selected = move(cells, selected, -1 if key in ("\x1b[A", "k") else 1)
                        message = ""
                    elif key == "o":
                        message = open_sample(
                            newest_sample(next((c for c in cells if c.run_dir == selected), None)),
                            opener(args.open_with),
                        )
                if typed:
                    live.update(frame(args.root, cells, expected, gpus, selected, interactive, message))
            cells, expected = update()


if __name__ == "__main__":
    sys.exit(main())
