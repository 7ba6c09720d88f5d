"""The chat page (plinth/serve/static/index.html) with an image generator: /v1/models says the model
draws images, and in Chromium the page asks /v1/images/generations for as many images as set and
shows them, for a prompt and for an empty one."""
import os

import pytest

from tests.test_serve import CHROMIUM, CHROMIUM_FLAGS
from tests.test_serve_imagine import served  # noqa: F401 (a fixture)

IDLE = "!document.getElementById('send').disabled"


def drawn(reply: int) -> str:
    """JavaScript: the images of the page's `reply`-th answer, once loaded, as [width, height]."""
    return (f"[...(document.querySelectorAll('.assistant')[{reply}]?.querySelectorAll('img.drawn') ?? [])]"
            ".filter((img) => img.complete).map((img) => [img.naturalWidth, img.naturalHeight])")


def test_chat_page_draws_images_in_chromium(served):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(served + "/")
            page.wait_for_selector("#n-images", state="visible")  # the model draws: the page asks how many
            assert page.locator("#temperature").is_hidden() and page.locator("#attach").is_hidden()
            page.fill("#n-images", "3")
            page.fill("#prompt", "top")
            page.press("#prompt", "Enter")
            page.wait_for_function(f"{drawn(0)}.length === 3 && {IDLE}", timeout=60_000)
            assert page.evaluate(drawn(0)) == [[8, 8]] * 3
            assert page.locator(".user").first.text_content() == "top"

            page.fill("#n-images", "2")
            page.press("#prompt", "Enter")  # an empty prompt draws without one
            page.wait_for_function(f"{drawn(1)}.length === 2 && {IDLE}", timeout=60_000)
            assert page.locator(".error").count() == 0
        finally:
            browser.close()
