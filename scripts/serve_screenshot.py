"""Screenshot of the ``knnmt serve`` web page (docs/serve.png) with headless Chromium.

Start the server first (README, "Service"), then::

    python scripts/serve_screenshot.py --url http://127.0.0.1:8000 --out docs/serve.png \\
        --text "Select the cell and open the dialog."
"""

from __future__ import annotations

import argparse
import logging

from playwright.sync_api import sync_playwright

logger = logging.getLogger("serve_screenshot")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", default="docs/serve.png")
    parser.add_argument("--text", default="Choose Format - Cells and click the Borders tab.")
    parser.add_argument(
        "--token-index", type=int, default=None, help="token to open (default: highest p_kNN)"
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        page.goto(args.url + "/")
        page.wait_for_function("document.getElementById('meta').textContent.includes('entries')")
        page.fill("#source", args.text)
        page.click("#translate")
        page.wait_for_selector(".token")
        index = args.token_index
        if index is None:  # the token where the memory disagrees most with the model
            index = page.evaluate(
                """() => { const e = window.lastExplanation(); let best = 0, score = -1;
                e.forEach((t, i) => { const s = t.p_knn - t.p_mt; if (s > score) { score = s; best = i; } });
                return best; }"""
            )
        page.click(f".token >> nth={index}")
        page.wait_for_selector("#details:not([hidden])")
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
