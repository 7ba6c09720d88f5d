"""Compiled decoding by default (plinth/compiled_decode.py, plinth/serve/background_build.py): a
server whose model has no kept programs answers at once, eagerly, while a `plinth compile` process
builds them, then decodes through them; `plinth generate` then decodes through the kept programs
without compiling, and eagerly where none is kept or with --no-compile."""
import re
import subprocess
import sys
import time

import httpx
import pytest
import torch

from plinth import compiled_decode
from plinth.cli import main
from plinth.compiled_decode import CompiledDecoder
from plinth.engine import default_threads
from plinth.train import checkpoint
from tests.conftest import byte_tokenizer, tiny_model
from tests.test_serve import free_port, stop

pytestmark = pytest.mark.slow
PROMPT = "Compiled by default"


@pytest.fixture
def run(tmp_path):
    """A float32 tiny model without sliding-window layers: `plinth generate` and `plinth serve` use
    the same programs, and its greedy text is the same compiled and eager."""
    folder = tmp_path / "tiny"
    checkpoint.save(folder, 1, tiny_model(), byte_tokenizer(), {})
    return checkpoint.latest(folder)


@pytest.fixture
def programs(tmp_path, monkeypatch):
    """An empty program cache, for this process and the ones it starts; the default compiles."""
    folder = tmp_path / "programs"
    monkeypatch.setattr(compiled_decode, "PROGRAM_CACHE", folder)
    monkeypatch.setenv("PLINTH_PROGRAM_CACHE", str(folder))
    monkeypatch.setenv("PLINTH_COMPILE", "1")
    return folder


def complete(base: str) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def compiled(base: str) -> int:
    """The server's own word, in /metrics, on whether it decodes through compiled programs."""
    return int(float(re.search(r"^plinth_compiled (\S+)$", httpx.get(f"{base}/metrics").text, re.M)[1]))


def wait_for_line(proc, pattern: str, seconds: float, seen: list[str]) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in {seconds} s: {''.join(seen)}")


def wait_until_up(base: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{base} did not answer in {seconds} s")


def generate(run, *options) -> tuple[str, int]:
    """`plinth generate RUN PROMPT` greedy, in this process, on the server's thread count; its text
    and how many passes went through a compiled program."""
    calls, real = [], CompiledDecoder._run
    before = torch.get_num_threads()
    torch.set_num_threads(default_threads())  # the programs are named by the threads they were tuned on
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CompiledDecoder, "_run", lambda self, *a: calls.append(1) or real(self, *a))
            patch.setattr(CompiledDecoder, "_build", lambda *a: pytest.fail("compiled without being asked"))
            text = capture(main, ["generate", str(run), PROMPT, "--max-tokens", "12", "--temperature", "0",
                                  "--top-k", "0", "--top-p", "1", "--min-p", "0", *options])
    finally:
        torch.set_num_threads(before)
    return text, len(calls)


def capture(fn, argv) -> str:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fn(argv) == 0
    return out.getvalue()


def test_a_server_decodes_eagerly_while_it_builds_then_compiled_and_generate_uses_what_it_kept(run, programs):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "plinth", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        wait_for_line(proc, "decoding eagerly while the compiled decoding programs are built", 60, seen)
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base)
        eager = complete(base)  # answered at once, while the build runs
        assert len(eager) > 0 and compiled(base) == 0
        wait_for_line(proc, "decoding through the compiled programs from now on", 600, seen)
        assert compiled(base) == 1
        assert complete(base) == eager  # float32: the same greedy text, now from the program
    finally:
        stop(proc)
    assert any(programs.iterdir())  # kept, for later starts

    compiled_text, compiled_steps = generate(run)  # the server's programs, loaded, not compiled again
    assert compiled_steps > 0 and eager in compiled_text
    eager_text, eager_steps = generate(run, "--no-compile")
    assert eager_steps == 0 and eager_text == compiled_text
    with pytest.MonkeyPatch.context() as patch:  # `plinth compile` finds them kept
        patch.setattr(CompiledDecoder, "_build", lambda *a: pytest.fail("compiled again"))
        assert "are kept in" in capture(main, ["compile", str(run), "--threads", str(default_threads())])


def test_generate_decodes_eagerly_where_no_program_is_kept(run, programs):
    text, steps = generate(run)
    assert steps == 0 and len(text) > 0
    assert not programs.exists() or not any(programs.iterdir())


def test_an_image_generator_is_not_compiled(toy_generator, programs, capsys):
    assert main(["compile", str(toy_generator)]) == 2
    assert "generates images; compiled decoding is for language models" in capsys.readouterr().err
