"""plinth/cpu_share.py: one thread fewer while another process keeps a core busy, the cores back
when it stops, and the same bits whatever the thread count."""
import copy
import subprocess
import sys
import time

import pytest
import torch

from plinth.cpu_share import CpuShare, busy_seconds, threads_for, usable_cpus
from plinth.engine import Engine
from plinth.quant import compact_
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("others, cores, most, threads", [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (1.0, 2, 2, 1), (1.9, 2, 2, 1),
    (0.7, 8, 8, 7), (2.2, 8, 8, 6), (0.0, 8, 4, 4), (-0.01, 2, 2, 2)])
def test_threads_for(others, cores, most, threads):
    assert threads_for(others, cores, most) == threads


def test_busy_seconds_reads_the_usable_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    #            user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  900 0 100 5000 50 0 0 0 0 0\n"
                    "cpu0 300 0 50 2500 20 10 5 5 0 0\n"
                    "cpu1 600 0 50 2500 30 0 0 0 0 0\n"
                    "intr 12345 0 0\n")
    monkeypatch.setattr("os.sysconf", lambda name: 100)
    assert busy_seconds({0}, stat) == pytest.approx((300 + 50 + 10 + 5 + 5) / 100)
    assert busy_seconds({0, 1}, stat) == pytest.approx((370 + 650) / 100)
    assert busy_seconds({0}, tmp_path / "missing") is None


class FakeMachine:
    """Busy seconds and own CPU seconds that advance as a test says, on a clock the test moves."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def advance(self, seconds: float, own_cores: float, other_cores: float):
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds


def test_one_thread_fewer_after_two_busy_windows_and_back():
    machine = FakeMachine()
    share = CpuShare(2, every=1.0, busy=lambda: machine.busy, own=lambda: machine.own, clock=lambda: machine.now)
    share.cores = 2
    torch.set_num_threads(2)
    seen = [share.adjust()]
    for others in (0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0):  # one busy window alone moves nothing
        machine.advance(1.0, own_cores=2.0 if share.threads == 2 else 1.0, other_cores=others)
        seen.append(share.adjust())
        assert torch.get_num_threads() == share.threads
    assert seen == [2, 2, 2, 2, 2, 1, 1, 1, 2]
    machine.advance(0.5, 1.0, 1.0)  # within a window: not measured yet
    assert share.adjust() == 2


def test_a_busy_process_beside_takes_a_thread_and_gives_it_back():
    if len(usable_cpus()) < 2:
        pytest.skip("needs two usable cores")
    most = len(usable_cpus())
    torch.set_num_threads(most)
    share = CpuShare(most, every=0.3)
    x = torch.randn(128, 128)

    def work_until(done, seconds: float = 15.0) -> bool:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            x @ x
            share.adjust()
            if done():
                return True
        return False

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert work_until(lambda: share.threads == most - 1), "the thread count did not drop beside a busy loop"
        assert torch.get_num_threads() == most - 1
    finally:
        busy.kill()
        busy.wait()
    assert work_until(lambda: share.threads == most), "the thread count did not come back"


def test_same_bits_on_one_thread_as_on_two(tokenizer):
    """What lets the count change under a running engine or training run: outputs and training
    steps do not depend on it."""
    def run(threads: int):
        torch.set_num_threads(threads)
        model = tiny_model()
        train = copy.deepcopy(model).train()
        batch = torch.randint(0, 259, (4, 33), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = train(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        grads = [p.grad for p in train.parameters()]
        compact_(model, "int4")
        with torch.inference_mode():
            logits = model(batch)
        text = Engine(model, tokenizer, max_batch=2, threads=threads).generate_many(
            [tokenizer.encode("hello"), tokenizer.encode("a longer prompt")], _greedy())
        return loss, grads, logits, [c.tokens for c in text]

    (loss1, grads1, logits1, tokens1), (loss2, grads2, logits2, tokens2) = run(1), run(2)
    assert torch.equal(loss1, loss2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert torch.equal(logits1, logits2)
    assert tokens1 == tokens2


def _greedy():
    from plinth.generate import SamplingParams
    return SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_an_engine_adapts_only_when_its_threads_are_not_given(model, tokenizer):
    adapting, fixed = Engine(model, tokenizer, max_batch=1), Engine(model, tokenizer, max_batch=1, threads=1)
    assert adapting.cpu_share is not None and fixed.cpu_share is None
    assert adapting.threads_in_use == len(usable_cpus()) and fixed.threads_in_use == 1
    adapting.cpu_share.threads = 1  # as after a busy neighbour: /metrics reports what runs now
    from plinth.serve.metrics import EngineCollector
    gauges = {m.name: m.samples[0].value for m in EngineCollector(adapting).collect()}
    assert gauges["plinth_threads"] == 1
