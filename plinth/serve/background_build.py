"""Building a served model's compiled decoding programs while it serves: what `plinth serve` does
by default when they are not kept yet (plinth/compiled_decode.py).

The server answers at once, decoding eagerly. A separate `plinth compile` process, at a lower
priority than the server's, builds the programs (minutes, once for a model); the engine then loads
them (under a second) and decodes compiled from the next step on. A separate process, not a thread:
exporting and compiling take the interpreter's lock for seconds at a time and a gigabyte or more of
memory, which a thread of the server would stall its requests on and keep as its own afterwards.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1


class BackgroundBuild:
    """`plinth compile MODEL` for `engine`'s cache layout and thread count, then `engine.use_compiled`
    with the programs it kept. `stop()` ends the build (the server's shutdown: nothing half-built is
    kept, programs are written atomically)."""

    def __init__(self, engine, model: str, dtype: str | None = None):
        self.engine, self.process = engine, None
        self.command = [sys.executable, "-m", "plinth", "compile", model, "--threads", str(engine.threads),
                        "--max-model-len", str(engine.max_len), *(["--dtype", dtype] if dtype else [])]
        self._stopping = False
        self._thread = threading.Thread(target=self._build, name="plinth-compile", daemon=True)

    def start(self) -> "BackgroundBuild":
        self._thread.start()
        return self

    def stop(self):
        self._stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def join(self, timeout: float | None = None):
        self._thread.join(timeout)

    def _build(self):
        # started by this thread, which waits for it: the build ends if the server dies
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, preexec_fn=_lower_priority)
        _, errors = self.process.communicate()
        if self._stopping:
            return
        if self.process.returncode != 0:
            last = (errors.strip().splitlines() or ["no message"])[-1]
            print(f"plinth: building the compiled decoding programs failed ({last}); decoding stays eager. "
                  f"`{' '.join(self.command[2:])}` shows the whole error", file=sys.stderr, flush=True)
            return
        try:
            compiled = self.engine.call(lambda: self.engine.use_compiled(build=False)).result()
        except Exception as e:  # a program that does not load: serving goes on as it was
            print(f"plinth: the compiled decoding programs did not load ({e}); decoding stays eager",
                  file=sys.stderr, flush=True)
            return
        if compiled:
            print("plinth: decoding through the compiled programs from now on", flush=True)


def _lower_priority():
    """In the build's process before it runs: below the server in the scheduler, and ended with the
    thread that started it (Linux's parent-death signal)."""
    os.nice(10)
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):  # not Linux: the build finishes on its own
        pass
