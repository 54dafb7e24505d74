"""Contact sheet: every image as a thumbnail with its face boxes and flags, because people would rather look."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from flux_lora.dataset.image_analysis import THUMBNAIL_SIDE
from flux_lora.dataset.report import DatasetReport, ImageRecord

COLUMNS = 8
PADDING = 8
TEXT_LINES = 3
LINE_HEIGHT = 13
_COLOURS = {"error": (200, 30, 30), "warning": (200, 120, 0), "ok": (30, 140, 60), "text": (30, 30, 30)}


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _thumbnail(report: DatasetReport, image: ImageRecord, dataset_path: Path) -> Image.Image | None:
    data = report.thumbnail(image)
    if data is None:  # a report read back from JSON or made without a cache: decode again
        from flux_lora.dataset.decode import decode_image
        from flux_lora.dataset.image_analysis import thumbnail_jpeg

        decoded = decode_image(dataset_path / image.path, min_side=THUMBNAIL_SIDE)
        data = thumbnail_jpeg(decoded.rgb) if decoded.rgb is not None else None
    if not data:
        return None
    return Image.open(io.BytesIO(data)).convert("RGB")


def _flag_lines(image: ImageRecord, width: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, current = [], ""
    for flag in image.flags or ["ok"]:
        candidate = f"{current}, {flag}" if current else flag
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = flag
        else:
            current = candidate
    lines.append(current)
    return lines[: TEXT_LINES - 1]


def write_contact_sheet(report: DatasetReport, dataset_path: Path, out_png: Path) -> Path:
    """Write a PNG grid of thumbnails, face boxes in green, file names and flags coloured by severity."""
    dataset_path, out_png = Path(dataset_path), Path(out_png)
    cell_width, thumb_height = THUMBNAIL_SIDE + PADDING, THUMBNAIL_SIDE
    cell_height = thumb_height + TEXT_LINES * LINE_HEIGHT + PADDING
    columns = max(1, min(COLUMNS, len(report.images)))
    rows = max(1, -(-len(report.images) // columns))
    sheet = Image.new("RGB", (columns * cell_width + PADDING, rows * cell_height + PADDING), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for index, image in enumerate(report.images):
        left = PADDING + (index % columns) * cell_width
        top = PADDING + (index // columns) * cell_height
        thumb = _thumbnail(report, image, dataset_path)
        if thumb is None:
            draw.rectangle([left, top, left + THUMBNAIL_SIDE - 1, top + thumb_height - 1], fill=(220, 200, 200))
            draw.text((left + 6, top + thumb_height // 2 - 6), "unreadable", fill=_COLOURS["error"], font=font)
        else:
            offset_x = left + (THUMBNAIL_SIDE - thumb.width) // 2
            offset_y = top + (thumb_height - thumb.height) // 2
            sheet.paste(thumb, (offset_x, offset_y))
            for face in image.faces or []:
                box = [
                    offset_x + face["x"] * thumb.width,
                    offset_y + face["y"] * thumb.height,
                    offset_x + (face["x"] + face["w"]) * thumb.width,
                    offset_y + (face["y"] + face["h"]) * thumb.height,
                ]
                draw.rectangle(box, outline=(0, 220, 0), width=2)
        text_top = top + thumb_height + 2
        name = image.path if len(image.path) <= 26 else "…" + image.path[-25:]
        draw.text((left, text_top), name, fill=_COLOURS["text"], font=font)
        if image.unusable:
            colour = _COLOURS["error"]
        elif image.flags:
            colour = _COLOURS["warning"]
        else:
            colour = _COLOURS["ok"]
        for line_number, line in enumerate(_flag_lines(image, THUMBNAIL_SIDE, font, draw), start=1):
            draw.text((left, text_top + line_number * LINE_HEIGHT), line, fill=colour, font=font)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, compress_level=1)  # fast compression: the sheet is looked at, not archived
    return out_png
