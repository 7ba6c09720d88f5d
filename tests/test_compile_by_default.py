"""Compiled decoding by default (plinth/compiled_decode.py, plinth/serve/background_build.py): a
server whose model has no kept programs answers at once, eagerly, while a `plinth compile` process
builds them, then decodes through them; `plinth generate` then decodes through the kept programs
without compiling, and eagerly where none is kept or with --no-compile."""
import queue
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from plinth import compiled_decode
from plinth.cli import main
from plinth.compiled_decode import CompiledDecoder
from plinth.engine import default_threads
from plinth.train import checkpoint
from tests.conftest import byte_tokenizer, tiny_model
from tests.test_serve import start_server, stop

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


class Lines:
    """A server's output, read on a thread of its own, so that waiting for a line can time out."""

    def __init__(self, proc):
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=lambda: [self.lines.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, pattern: str, seconds: float, unless: str = "building the compiled decoding programs failed"):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            assert unless not in line, "".join(self.seen)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} in {seconds} s: {''.join(self.seen)}")


def generate(run, *options) -> tuple[str, int]:
    """`plinth generate RUN PROMPT` greedy, in this process (on whatever thread count earlier tests
    left: the programs are named by the cores they were tuned on); its text and how many passes
    went through a compiled program."""
    calls, real = [], CompiledDecoder._run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompiledDecoder, "_run", lambda self, *a: calls.append(1) or real(self, *a))
        patch.setattr(CompiledDecoder, "_build", lambda *a: pytest.fail("compiled without being asked"))
        text = capture(main, ["generate", str(run), PROMPT, "--max-tokens", "12", "--temperature", "0",
                              "--top-k", "0", "--top-p", "1", "--min-p", "0", *options])
    return text, len(calls)


def capture(fn, argv) -> str:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fn(argv) == 0
    return out.getvalue()


def test_a_server_decodes_eagerly_while_it_builds_then_compiled_and_generate_uses_what_it_kept(run, programs):
    proc, base = start_server(str(run))
    lines = Lines(proc)
    try:
        lines.wait_for("decoding eagerly while the compiled decoding programs are built", 60)
        eager = complete(base)  # answered at once, while the build runs
        assert len(eager) > 0 and compiled(base) == 0
        lines.wait_for("decoding through the compiled programs from now on", 600)
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


def session_members(session: int) -> list[int]:
    """Processes of `session` (a build started by a server runs in a session of its own)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def poll(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} in {seconds} s")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's process table")
def test_a_server_stopped_while_it_builds_ends_the_build_and_keeps_nothing_half_built(run, programs):
    proc, _ = start_server(str(run))
    try:
        Lines(proc).wait_for("decoding eagerly while the compiled decoding programs are built", 60)
        # the build has begun: its own folder, named after the program
        poll(lambda: programs.exists() and [f for f in programs.iterdir() if f.name.startswith(".")], 120,
             "no program being built")
        [builder] = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
                     if b"compile" in (stat.parent / "cmdline").read_bytes() and
                     str(run).encode() in (stat.parent / "cmdline").read_bytes()]
    finally:
        stop(proc)
    poll(lambda: not session_members(builder), 30, "the build and its compilers still run")
    assert list(programs.iterdir()) == []  # neither a program nor its folder in the making


def test_generate_decodes_eagerly_where_no_program_is_kept(run, programs):
    text, steps = generate(run)
    assert steps == 0 and len(text) > 0
    assert not programs.exists() or not any(programs.iterdir())


def test_an_image_generator_is_not_compiled(toy_generator, programs, capsys):
    assert main(["compile", str(toy_generator)]) == 2
    assert "generates images; compiled decoding is for language models" in capsys.readouterr().err
