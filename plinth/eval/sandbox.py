"""Run untrusted generated Python (HumanEval completions) in a child process that cannot hurt the host.

The child is a fresh interpreter (-I: no user site, no PYTHON* variables) in a temporary folder
that is deleted afterwards, with a minimal environment. Before the program runs, the child limits
itself: address space (memory cap), CPU seconds, file size, no new processes (RLIMIT_NPROC 0, and
os.fork/subprocess/os.system replaced: a fork bomb is a failed test, not a dead machine), and no
network (its own empty network namespace where the kernel allows it, and sockets refused in any
case). The parent kills the child's whole process group when the wall-clock limit passes, so a
program that hangs is a scored failure.

    run_python("assert 1 + 1 == 2")        # Outcome(status="passed", ...)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the untrusted program: limits first, then the program from program.py.
GUARD = r"""
import ctypes, os, resource, socket, subprocess, sys
memory, cpu = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET) != 0:
    pass  # no namespace here (a container may forbid it): the socket guard below still holds

def refused(*args, **kwargs):
    raise PermissionError("the sandbox allows no new processes and no network")

import posix, _posixsubprocess
for module in (os, posix):
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "spawnv", "spawnve", "kill", "killpg"):
        if hasattr(module, name):
            setattr(module, name, refused)
class NoSocket(socket.socket):  # a class, so that modules subclassing socket (ssl) still import
    def __init__(self, *args, **kwargs):
        refused()

subprocess.Popen = _posixsubprocess.fork_exec = socket.create_connection = refused
socket.socket = NoSocket
sys.modules["ctypes"] = sys.modules["_ctypes"] = None  # no calling libc's fork() directly either
sys.argv = ["program.py"]
code = open("program.py", encoding="utf-8").read()
exec(compile(code, "program.py", "exec"), {"__name__": "__main__"})
"""

OUTPUT_CHARS = 2000  # of stderr kept in the outcome: enough to see why a test failed


@dataclass
class Outcome:
    status: str        # "passed", "failed" (an exception or a non-zero exit), "timeout"
    detail: str = ""   # the end of stderr, or why it was stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="plinth-sandbox-") as folder:
        Path(folder, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1"}
        cpu_seconds = max(1, int(timeout) + 1)
        with open(Path(folder, "stderr"), "wb") as err:  # a file (capped by RLIMIT_FSIZE), not a pipe to buffer
            proc = subprocess.Popen([sys.executable, "-I", "-c", GUARD, str(memory_mb << 20), str(cpu_seconds)],
                                    cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)  # its own process group: killable as one
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return Outcome("timeout", f"still running after {timeout:g} s")
            finally:
                _kill_group(proc)  # and anything it left behind in its group
        text = Path(folder, "stderr").read_bytes()[-OUTPUT_CHARS:].decode("utf-8", errors="replace")
        if proc.returncode == 0:
            return Outcome("passed")
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return Outcome("timeout", f"stopped by the CPU limit ({cpu_seconds} s)")
        return Outcome("failed", text or f"exit status {proc.returncode}")


def _kill_group(proc: subprocess.Popen):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
