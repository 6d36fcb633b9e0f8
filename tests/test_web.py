"""The web app end to end, in headless Chromium through Playwright (Debian's ``chromium``; no browser download).

Needs ``apt-get install chromium`` and ``pip install playwright gradio``; skipped cleanly otherwise.
Run alone: ``pytest -m browser tests/test_web.py``.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("gradio")
pytest.importorskip("fastapi")
playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("LENS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def ui_url():
    from lens.pipeline import LensPipeline
    from lens.serve import create_app
    from lens.serve import serve_in_thread as running
    from lens.serve.web import mount_ui

    app = mount_ui(create_app(LensPipeline.from_pretrained(device="cpu")))
    with running(app) as base:
        yield f"{base}/ui/"


def test_upload_segment_and_ask_in_a_real_browser(ui_url, tmp_path):
    from PIL import Image

    from lens.data.synthetic import SyntheticWorld

    image_path = tmp_path / "scene.png"
    Image.fromarray(SyntheticWorld(seed=0).scene("test", 0).image).save(image_path)
    bad_path = tmp_path / "bad.png"
    bad_path.write_bytes(b"this is not an image")
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(ui_url, wait_until="domcontentloaded")
        page.locator("#lens-msg textarea").wait_for(timeout=60_000)

        # No image yet: a clear message, not a crash.
        page.locator("#lens-msg textarea").fill("please segment the hexagon.")
        page.locator("#lens-send").click()
        page.get_by_text("Upload an image first").first.wait_for(timeout=30_000)

        page.locator("#lens-image input[type=file]").set_input_files(str(image_path))
        page.locator("#lens-image img").first.wait_for(timeout=30_000)
        page.get_by_label("segmentation", exact=True).check()
        page.locator("#lens-msg textarea").fill("please segment the hexagon.")
        page.locator("#lens-send").click()
        page.locator("#lens-overlay img").first.wait_for(timeout=60_000)
        page.locator("#lens-attention img").first.wait_for(timeout=60_000)
        chat = page.locator("#lens-chat")
        chat.get_by_text("[segmentation]").first.wait_for(timeout=30_000)

        page.get_by_label("dialogue", exact=True).check()
        page.locator("#lens-msg textarea").fill("how many shapes are there?")
        page.locator("#lens-send").click()
        chat.get_by_text("[dialogue]").first.wait_for(timeout=60_000)
        texts = chat.inner_text()
        assert "please segment the hexagon." in texts and "how many shapes are there?" in texts
        overlay_src = page.locator("#lens-overlay img").first.get_attribute("src")
        assert overlay_src
        browser.close()
