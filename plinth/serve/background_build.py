"""Building a served model's compiled decoding programs while it serves: what `plinth serve` does
by default when they are not kept yet (plinth/compiled_decode.py).

The server answers at once, decoding eagerly. A separate `plinth compile` process, at a lower
priority than the server's, builds the programs (minutes, once for a model); the engine then loads
them (under a second) and decodes compiled from the next step on. A separate process, not a thread:
exporting and compiling take the interpreter's lock for seconds at a time and a gigabyte or more of
memory, which a thread of the server would stall its requests on and keep as its own afterwards.
Kernels are chosen by timing them: requests served meanwhile slow those timings down, and may have
a slower kernel chosen (`plinth compile` ahead, on an idle machine, avoids it).

The build runs in a session of its own, so that Ctrl-C at the server's terminal does not reach it;
the server's shutdown ends it and the compilers it started. A server killed outright leaves it to
finish: what it keeps is whole (programs are written to a folder of their own, then renamed).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading


class BackgroundBuild:
    """`plinth compile MODEL` for `engine`'s cache layout and thread count, then `engine.use_compiled`
    with the programs it kept. `stop()` ends the build."""

    def __init__(self, engine, model: str, dtype: str | None = None):
        self.engine, self.process = engine, None
        self.command = [sys.executable, "-m", "plinth", "compile", model, "--threads", str(engine.threads),
                        "--max-model-len", str(engine.max_len), *(["--dtype", dtype] if dtype else [])]
        self._lock, self._stopping = threading.Lock(), False
        self._thread = threading.Thread(target=self._build, name="plinth-compile", daemon=True)

    def start(self) -> "BackgroundBuild":
        self._thread.start()
        return self

    def stop(self):
        with self._lock:
            self._stopping = True
            process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # ended already
                os.killpg(process.pid, signal.SIGTERM)  # the build and the compilers it runs
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # ended already
                    os.killpg(process.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None):
        self._thread.join(timeout)

    def _build(self):
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []  # below the server in the scheduler
        with self._lock:
            if self._stopping:
                return
            try:
                self.process = subprocess.Popen(nice + self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True, start_new_session=True)
            except OSError as e:
                return _say(f"plinth: the compiled decoding programs cannot be built ({e}); decoding stays eager")
        _, errors = self.process.communicate()
        if self._stopping:
            return
        if self.process.returncode != 0:
            last = (errors.strip().splitlines() or ["no message"])[-1]
            return _say(f"plinth: building the compiled decoding programs failed ({last}); decoding stays eager. "
                        f"`{' '.join(self.command[2:])}` shows the whole error")
        try:
            compiled = self.engine.call(lambda: self.engine.use_compiled(build=False)).result()
        except Exception as e:  # a program that does not load, or the engine stopped: serving goes on as it was
            return _say(f"plinth: the compiled decoding programs did not load ({e}); decoding stays eager")
        if compiled:
            print("plinth: decoding through the compiled programs from now on", flush=True)
        else:
            _say("plinth: the compiled decoding programs were built but do not match this server (plinth changed "
                 "since it started?); decoding stays eager")


def _say(message: str):
    print(message, file=sys.stderr, flush=True)
