"""Screenshot of a run's viewer (the README's picture), in headless Chromium.

    python scripts/viewer_screenshot.py runs/demo docs/viewer.png

Writes the viewer (``trackstar view``), opens it in Debian's Chromium through playwright (the
``test`` extra; ``tests/browser.py``), unfolds the first score breakdown and saves the top of
the page as a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from browser import open_page  # noqa: E402

from trackstar.viewer import write_viewer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("png")
    p.add_argument("--experiment", default="e1")
    p.add_argument("--width", type=int, default=1500)
    p.add_argument("--height", type=int, default=1250)
    args = p.parse_args()
    page_file = write_viewer(args.run_dir, experiment=args.experiment)
    with open_page(page_file, width=args.width, height=args.height) as page:
        if page.errors:
            raise SystemExit(f"the page has script errors: {page.errors}")
        first = page.locator("details.breakdown summary").first
        if first.count():
            first.click()
        page.screenshot(path=args.png)
    print(f"{page_file} -> {args.png}")


if __name__ == "__main__":
    main()
