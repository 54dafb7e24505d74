"""One labelled PNG per prompt: the no-LoRA row on top, then one row per strength; one column per seed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL_MAX = 256  # a cell never exceeds this side: a 1024 px grid of 5 x 4 images would be 20 MP
LABEL_WIDTH = 96
HEADER_HEIGHT = 40  # the prompt line and the seed labels
_BACKGROUND = (255, 255, 255)
_TEXT = (30, 30, 30)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def grid_size(rows: int, columns: int, cell: int) -> tuple[int, int]:
    return LABEL_WIDTH + columns * cell, HEADER_HEIGHT + rows * cell


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def write_prompt_grid(
    title: str, row_labels: list[str], seeds: list[int], cells: list[list[Path]], out_png: Path, cell: int
) -> Path:
    """cells[row][column] are image files; each is scaled into a cell x cell square."""
    width, height = grid_size(len(row_labels), len(seeds), cell)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title_font, label_font = _font(13), _font(12)
    draw.text((6, 4), _fit(title, width - 12, draw, title_font), fill=_TEXT, font=title_font)
    for column, seed in enumerate(seeds):
        draw.text((LABEL_WIDTH + column * cell + 4, HEADER_HEIGHT - 18), f"seed {seed}", fill=_TEXT, font=label_font)
    for row, label in enumerate(row_labels):
        top = HEADER_HEIGHT + row * cell
        draw.text(
            (6, top + cell // 2 - 7), _fit(label, LABEL_WIDTH - 10, draw, label_font), fill=_TEXT, font=label_font
        )
        for column, path in enumerate(cells[row]):
            with Image.open(path) as image:
                thumbnail = image.convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(thumbnail, (LABEL_WIDTH + column * cell, top))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
