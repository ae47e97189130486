"""Regenerate docs/app.png: the app on the demo checkpoint, after uploading one demo image.

    make demo
    python app.py --port 7862 &
    python docs/screenshot.py http://127.0.0.1:7862/ \
        train/demo_data/fashion_mnist_sample/test/coat/test_03639.png docs/app.png
"""

import sys
import tempfile

from playwright.sync_api import sync_playwright

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(url: str, image: str, output: str) -> None:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(), executable_path="/usr/bin/chromium", headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.goto(url)
        page.locator("#input-image input[type=file]").set_input_files(image)
        page.locator("#fused-label [data-testid=label-output-value]").wait_for()
        page.wait_for_timeout(500)
        page.screenshot(path=output, full_page=True)
        print(page.locator("#fused-label [data-testid=label-output-value]").inner_text())
        context.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
