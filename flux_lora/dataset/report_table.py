"""The report in the terminal: a summary, a table of the images that need attention, dataset-wide findings."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from flux_lora.dataset.flags import FLAGS
from flux_lora.dataset.report import DatasetReport, ImageRecord

# Small sets are listed whole; large ones only by the images that carry a flag.
LIST_ALL_UP_TO = 60


def _flag_text(image: ImageRecord) -> str:
    parts = []
    for flag in image.flags:
        style = "red" if FLAGS[flag].severity == "error" else "yellow"
        parts.append(f"[{style}]{flag}[/{style}]")
    return ", ".join(parts) or "[green]ok[/green]"


def _faces_text(image: ImageRecord) -> str:
    if image.faces is None:
        return "-"
    if not image.faces:
        return "0"
    largest = image.faces[0]
    return f"{len(image.faces)} ({largest['w']:.0%} wide)"


def print_report(report: DatasetReport, console: Console | None = None) -> None:
    console = console or Console()
    summary = report.summary()
    width, height = summary["width"], summary["height"]
    console.print(f"[bold]Dataset[/bold] {report.dataset_path}")
    sizes = f"; sizes {width['min']}-{width['max']} x {height['min']}-{height['max']} px" if width and height else ""
    console.print(
        f"{summary['n_images']} images, {summary['n_usable']} usable, {summary['n_captions']} captions{sizes}; "
        f"analysed in {report.analysis['seconds']:.2f} s ({report.analysis['cache_hits']} from cache)"
    )
    table = Table(show_lines=False, header_style="bold")
    for column, justify in (
        ("image", "left"),
        ("size", "right"),
        ("bucket", "right"),
        ("blur", "right"),
        ("faces", "right"),
        ("caption tokens", "right"),
        ("flags", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    shown = report.images if len(report.images) <= LIST_ALL_UP_TO else [i for i in report.images if i.flags]
    for image in shown:
        table.add_row(
            image.path,
            f"{image.width}x{image.height}" if image.width else "-",
            f"{image.bucket[0]}x{image.bucket[1]}" if image.bucket else "-",
            f"{image.blur_score:.0f}" if image.blur_score is not None else "-",
            _faces_text(image),
            str(image.caption.clip_tokens) if image.caption.clip_tokens is not None else "-",
            _flag_text(image),
        )
    if shown:
        console.print(table)
    if len(shown) < len(report.images):
        console.print(f"({len(report.images) - len(shown)} images without flags not listed)")
    if summary["buckets"]:
        console.print("buckets: " + ", ".join(f"{size} x{count}" for size, count in summary["buckets"].items()))
    for group in report.duplicate_groups:
        console.print(f"[yellow]near-duplicates[/yellow] (sharpest first): {' = '.join(group)}")
    for group in report.identical_caption_groups:
        console.print(f"[yellow]identical captions[/yellow]: {', '.join(group)}")
    for group in report.near_identical_caption_groups:
        console.print(f"[yellow]near-identical captions[/yellow]: {', '.join(group)}")
    for hint in report.leakage_hints:
        console.print(
            f"[yellow]leakage hint[/yellow]: '{hint['word']}' in {hint['captions']} captions ({hint['share']:.0%}); "
            "if it is in most photos it becomes part of the identity"
        )
    for orphan in report.orphan_captions:
        console.print(f"[yellow]caption without image[/yellow]: {orphan}")
