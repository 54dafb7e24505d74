"""docs/report.png: a screenshot of a sweep's report.html in headless chromium, for the README.

    python docs/make_report_png.py outputs/sweeps/<time>_ablation_seeds/report.html [docs/report.png] [--height 2600]

The full page is captured at 1400 px wide, cut at --height (the tables, plots and sample grid come first),
and stored with a 256-colour palette so the file stays small enough for the repository.
"""

from __future__ import annotations

import argparse
import sys
from io import BytesIO
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.report.cdp import Chromium  # noqa: E402 - the same DevTools client the browser tests use

WIDTH = 1400


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).parent / "report.png")
    parser.add_argument("--height", type=int, default=2600, help="cut the page at this many pixels")
    args = parser.parse_args()
    if not args.html.is_file():
        print(
            f"error: {args.html}: no such report; write it with python -m flux_lora.report SWEEP_DIR", file=sys.stderr
        )
        return 2
    with Chromium(width=WIDTH, height=1000) as browser:
        page = browser.open_page()
        browser.navigate(page, args.html.resolve().as_uri())
        png = browser.screenshot(page)
    image = Image.open(BytesIO(png)).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, args.height)))
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height}, {args.out.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
