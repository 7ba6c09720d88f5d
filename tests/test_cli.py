"""The `plinth` command as a user runs it: real processes, exit codes, no tracebacks."""
import re
import subprocess
import sys

import pytest


def plinth(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "plinth", *args], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["generate", "no-such-model", "hi"], "unknown model 'no-such-model'.*smollm2-135m-instruct"),
    (["generate", "runs/never-trained/final", "hi"], "no checkpoint 'runs/never-trained/final': train the run first"),
    (["generate", "hi", "--temperature", "-1"], "temperature=-1.0"),
    (["generate", "hi", "--top-p", "1.5"], "top_p=1.5"),
    (["chat", "--max-tokens", "0"], "max_tokens=0"),
])
def test_bad_input_exits_2_with_one_clear_line(args, message):
    result = plinth(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_bad_model_file_exits_2(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    result = plinth("generate", str(bad), "hi")
    assert result.returncode == 2 and "not a readable GGUF file" in result.stderr and "Traceback" not in result.stderr


def test_list_shows_the_default_model():
    result = plinth("list")
    assert result.returncode == 0 and "smollm2-135m-instruct" in result.stdout and "installed" in result.stdout


@pytest.mark.slow
def test_generate_streams_a_completion():
    result = plinth("generate", "smollm2-135m-instruct", "The capital of France is", "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_chat_is_multi_turn_with_reset_and_exit():
    result = plinth("chat", "--temperature", "0", "--max-tokens", "30",
                    stdin="What is the capital of France?\n/reset\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "(conversation cleared)" in result.stdout
