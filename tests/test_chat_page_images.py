"""The chat page (plinth/serve/static/index.html) with an image+text model: /v1/models says which
models read images, and in Chromium the page attaches images (file picker or paste), shows them, and
sends them as OpenAI image_url parts, turn after turn; a text-only model's entry says text only."""
import base64
import io
import os

import httpx
import pytest
from fastapi.testclient import TestClient

from plinth.serve.app import create_app
from tests.conftest import BAR_QUESTION, bar, server_state
from tests.test_serve import CHROMIUM, CHROMIUM_FLAGS
from tests.test_serve_images import served  # noqa: F401 (a fixture)

LAST_ANSWER = "[...document.querySelectorAll('.assistant')].at(-1)?.textContent"
IDLE = "!document.getElementById('send').disabled"

# what a paste of an image file does: a ClipboardEvent whose DataTransfer holds the file
PASTE = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/png" }));
  document.getElementById("prompt").dispatchEvent(
    new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
}"""


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_models_list_says_the_image_model_reads_images(served):
    models = httpx.get(f"{served}/v1/models").json()["data"]
    assert [m["input_modalities"] for m in models] == [["text", "image"]]


def test_models_list_says_a_text_model_reads_text_only(model, tokenizer):
    with server_state(model, tokenizer) as state:
        models = TestClient(create_app(state)).get("/v1/models").json()["data"]
    assert models and all(m["input_modalities"] == ["text"] for m in models)


def test_chat_page_sends_attached_and_pasted_images_in_chromium(served, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    (tmp_path / "down.png").write_bytes(png(bar(1001)))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(served + "/")
            page.wait_for_selector("#attach", state="visible")  # the model reads images: the button shows
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "8")

            # a picked image can be removed before sending
            page.set_input_files("#image-file", str(tmp_path / "down.png"))
            page.wait_for_selector("#attachments img")
            page.click("#attachments button")
            assert page.locator("#attachments img").count() == 0

            # turn 1: an image from the file picker
            page.set_input_files("#image-file", str(tmp_path / "down.png"))
            page.wait_for_selector("#attachments img")
            page.fill("#prompt", BAR_QUESTION)
            page.press("#prompt", "Enter")
            page.wait_for_function(f"{LAST_ANSWER} === 'down' && {IDLE}", timeout=60_000)
            assert page.locator(".user img").count() == 1
            assert page.locator("#attachments img").count() == 0  # sent: the tray is empty again

            # turn 2: a pasted image; the first turn's image goes again, in the history
            page.evaluate(PASTE, [base64.b64encode(png(bar(1000))).decode(), "up.png"])
            page.wait_for_selector("#attachments img")
            page.fill("#prompt", BAR_QUESTION)
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('.assistant').length === 2 && {IDLE}",
                                   timeout=60_000)
            assert page.evaluate(LAST_ANSWER) == "up"
            assert page.locator(".user img").count() == 2
            assert page.locator(".error").count() == 0

            # an image over the page's 4 MB is refused on the page, with a message, and not attached
            page.evaluate(PASTE, [base64.b64encode(bytes(3_500_000)).decode(), "huge.png"])
            page.wait_for_selector(".error")
            assert "huge.png" in page.text_content(".error") and "4 MB" in page.text_content(".error")
            assert page.locator("#attachments img").count() == 0
        finally:
            browser.close()
