"""schemathesis over the running server's own /openapi.json (issue 17): generated requests, valid
and invalid, for every operation, with and without an API key (sent with every request), must get
no server error and answers that match the documented response schemas, statuses and media types.
Bounded: a fixed seed and a few dozen examples an operation (fewer with a key).

`positive_data_acceptance` (a schema-valid request must not be refused) runs as
tests/schemathesis_hooks.py's variant, which lets a request whose prompt and `max_tokens` overflow
the context be refused: the only rule the schema cannot state. A response may take up to 60 s: the
largest requests the server takes (2,048 embedding inputs) take seconds on two cores."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.weights.native import write_model
from tests.conftest import byte_tokenizer, tiny_model
from tests.test_serve import start_server

pytest.importorskip("schemathesis")
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_model(tiny_model(max_seq_len=256), folder)
    byte_tokenizer().save(folder)
    return folder


@pytest.mark.parametrize("api_key", [None, "secret"])
def test_generated_requests_get_no_server_error_and_documented_answers(tiny_folder, tmp_path, api_key):
    key = ["--api-key", api_key] if api_key else []
    # With a key, the same operations again: fewer examples, to see that authorised requests are
    # answered as documented too (the run without one fuzzes the bodies further).
    examples = "10" if api_key else "25"
    proc, base = start_server(str(tiny_folder), "--max-model-len", "256", "--max-batch", "4", *key)
    try:
        cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        header = ["-H", f"Authorization: Bearer {api_key}"] if api_key else []
        hooks = {"SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
        run = subprocess.run([cli, "run", f"{base}/openapi.json", "--checks", "all", "--exclude-checks",
                              "positive_data_acceptance", "--phases", "coverage,fuzzing", "--max-examples", examples,
                              "--seed", "0", "--request-timeout", "60", "--max-response-time", "60", "--no-color",
                              *header], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={**os.environ, **hooks})
        assert run.returncode == 0, run.stdout[-6000:]  # schemathesis exits 1 on any failed check
    finally:
        proc.kill()
        proc.wait()
