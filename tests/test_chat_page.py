"""The chat page (plinth/serve/static/) in headless Chromium, against a server whose model is an echo:
each answer is the conversation's last user message, token by token, so a test chooses what the
"model" writes: Markdown, code, or markup that must never run. Covered: streaming with Markdown and a
code block's copy button, the sanitiser, stop (the server cancels the request and frees its slot),
conversations kept across a reload (rename, delete), and the model picker and system prompt reaching
the request. One server and one browser serve every test; each test has a fresh browser profile."""
import os
import re
import time

import httpx
import pytest
import torch

from plinth.engine import Engine
from plinth.serve.state import ServerState
from tests.conftest import byte_tokenizer, live, tiny_model
from tests.test_serve import CHROMIUM, CHROMIUM_FLAGS

USER_TURN = [257, *b"user\n"]  # <|im_start|>user\n in the byte tokenizer's ChatML prompt
END_OF_TURN = 258              # <|im_end|>
STEP_SECONDS = 0.01            # each decoding step's time: a long answer is still streaming when stop is pressed
IDLE = "!document.getElementById('send').disabled"
TITLES = "[...document.querySelectorAll('#conversations .open')].map((b) => b.textContent)"


def echo(engine: Engine):
    """Engine._run with the model replaced: the logits (B, V) of each request's next token, the next
    byte of the prompt's last user message, then the end of the turn."""
    def run(group, most=1):
        time.sleep(STEP_SECONDS)
        logits = torch.full((len(group), engine.model.config.vocab_size), -1e9)
        for row, request in enumerate(group):
            request.computed = len(request.tokens)  # the whole prompt at once: no KV cache to fill
            prompt = request.seq.prompt
            start = max(i for i in range(len(prompt)) if prompt[i:i + len(USER_TURN)] == USER_TURN) + len(USER_TURN)
            said, n = prompt[start:prompt.index(END_OF_TURN, start)], len(request.seq.output)
            logits[row, said[n] if n < len(said) else END_OF_TURN] = 0
        return logits
    return run


@pytest.fixture(scope="module")
def served():
    tokenizer = byte_tokenizer()
    # speculate=False: a lone request's guessed-token passes would call the model past the echo
    engine = Engine(tiny_model(max_seq_len=4096), tokenizer, max_batch=2, max_len=4096, threads=1, speculate=False)
    engine._run = echo(engine)
    engine.start()
    try:  # a second served name, as a LoRA adapter's is, for the model picker
        yield from live(ServerState(engine, tokenizer, "tiny", adapters={"tiny-alt": 1}))
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])  # its own localStorage
    page = context.new_page()
    page.goto(served + "/")
    page.wait_for_function("document.getElementById('model').value === 'tiny'")
    yield page
    context.close()


def ask(page, text: str, answers: int):
    """Sends `text` and waits for the page's `answers`-th answer to be complete."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.assistant').length === {answers} && {IDLE}",
                           timeout=30_000)


def counter(served: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{served}/metrics").text, re.M).group(1))


def test_an_answer_streams_as_markdown_with_a_copy_button_on_code(page):
    text = "# Steps\n\nRun **this**, then `that`:\n\n```python\nprint('hi')\n```"
    ask(page, text, 1)
    assert page.text_content(".user") == text  # the user's own text is shown as typed
    assert page.text_content(".assistant h1") == "Steps"
    assert page.text_content(".assistant strong") == "this"
    assert page.text_content(".assistant p code") == "that"
    assert page.get_attribute(".assistant pre code", "class") == "language-python"
    assert page.text_content(".assistant pre code") == "print('hi')\n"
    assert page.locator(".error").count() == 0
    assert int(page.text_content("#status").split()[0]) == len(text)  # streamed: one event per byte token
    page.click(".assistant pre .copy")
    page.wait_for_function("document.querySelector('.assistant pre .copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"


INJECTION = """<script>window.ran = "script"</script>
<img src="x" onerror="window.ran = 'onerror'">
<svg><animate onbegin="window.ran = 'svg'" attributeName="x" dur="1s"/></svg>
<details open ontoggle="window.ran = 'ontoggle'">details</details>
<iframe srcdoc="<script>parent.ran = 'iframe'</script>"></iframe>
<a id="raw" href="javascript:window.ran = 'href'">a link</a>

and [another](javascript:window.ran='markdown')"""
RAN = "window.ran === undefined ? null : window.ran"


def test_markup_in_the_answer_never_runs(page, browser):
    reference = browser.new_page()  # the same markup put in a page as it is: it runs
    reference.set_content(INJECTION)
    reference.wait_for_function("window.ran !== undefined")
    reference.close()

    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.fill("#max-tokens", "1000")
    ask(page, INJECTION, 1)
    for shown in ("answered", "reloaded"):  # rendered as it streams, and again from the kept conversation
        if shown == "reloaded":
            page.reload()
            page.wait_for_selector(".assistant")
        answer = page.locator(".assistant")
        assert answer.locator("script, iframe, img, svg").count() == 0, shown
        handlers = answer.evaluate("a => [...a.querySelectorAll('*')].flatMap(e => e.getAttributeNames())"
                                   ".filter(name => name.startsWith('on'))")
        assert handlers == [], shown
        assert "details" in answer.text_content() and "a link" in answer.text_content()  # the text itself stays
        page.click("#raw")
        page.click("text=another")
        page.wait_for_timeout(300)  # what an event handler would need to fire
        assert page.evaluate(RAN) is None and dialogs == [], shown


def test_stop_cancels_the_request_and_the_server_frees_its_slot(page, served):
    cancelled = counter(served, "plinth_requests_cancelled_total")
    page.fill("#max-tokens", "2000")
    long = "count " * 300
    page.fill("#prompt", long)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_function("document.querySelector('.assistant').textContent.length >= 20", timeout=30_000)
    page.click("#stop")
    page.wait_for_function(IDLE)
    assert page.locator("#stop").is_hidden() and page.text_content("#status").startswith("stopped after")
    kept = page.text_content(".assistant")
    assert 20 <= len(kept) < len(long.strip()) and long.startswith(kept)
    deadline = time.monotonic() + 10
    while counter(served, "plinth_requests_cancelled_total") < cancelled + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter(served, "plinth_requests_cancelled_total") == cancelled + 1
    assert httpx.get(f"{served}/health").json()["running"] == 0
    assert page.text_content(".assistant") == kept  # nothing more arrived
    ask(page, "next", 2)  # the next question is answered at once
    assert page.locator(".assistant").nth(1).text_content() == "next"


def test_conversations_are_kept_across_a_reload_renamed_and_deleted(page):
    ask(page, "first question", 1)
    page.reload()
    page.wait_for_selector(".assistant")
    assert page.locator(".msg").all_text_contents() == ["first question", "first question"]
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "a follow-up", 2)
    assert sent.value.post_data_json["messages"] == [  # the model sees the reloaded conversation
        {"role": "user", "content": "first question"}, {"role": "assistant", "content": "first question"},
        {"role": "user", "content": "a follow-up"}]

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    ask(page, "second chat", 1)
    assert page.evaluate(TITLES) == ["second chat", "first question"]
    assert page.text_content(".conversation.current .open") == "second chat"

    page.once("dialog", lambda dialog: dialog.accept("Renamed"))
    page.locator(".conversation", has_text="first question").locator(".rename").click()
    page.reload()
    page.wait_for_selector(".assistant")
    assert sorted(page.evaluate(TITLES)) == ["Renamed", "second chat"]
    assert page.locator(".msg").all_text_contents() == ["second chat", "second chat"]  # the one open stays open

    page.locator(".conversation", has_text="Renamed").locator(".open").click()
    assert page.locator(".msg").count() == 4
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator(".conversation.current .delete").click()  # declined: nothing is deleted
    assert len(page.evaluate(TITLES)) == 2
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(".conversation.current .delete").click()
    assert page.evaluate(TITLES) == ["second chat"]
    assert page.locator(".msg").all_text_contents() == ["second chat", "second chat"]
    page.reload()
    page.wait_for_selector(".assistant")
    assert page.evaluate(TITLES) == ["second chat"]


def test_the_picked_model_and_the_system_prompt_reach_the_request(page):
    assert page.locator("#model option").all_text_contents() == ["tiny", "tiny-alt"]
    page.select_option("#model", "tiny-alt")
    page.fill("#system", "Answer in one word.")
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "hi", 1)
    body = sent.value.post_data_json
    assert body["model"] == "tiny-alt" and body["stream"] is True
    assert body["messages"] == [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"}]

    page.reload()
    page.wait_for_selector(".assistant")
    page.wait_for_function("document.getElementById('model').value === 'tiny-alt'")  # kept with the conversation
    assert page.input_value("#system") == "Answer in one word."

    page.click("#new-chat")  # starts with the open conversation's system prompt, then has its own
    assert page.input_value("#system") == "Answer in one word."
    page.fill("#system", "")
    with page.expect_request("**/v1/chat/completions") as sent:
        ask(page, "hello", 1)
    assert sent.value.post_data_json["messages"] == [{"role": "user", "content": "hello"}]
    page.locator(".conversation", has_text="hi").locator(".open").click()
    assert page.input_value("#system") == "Answer in one word."
