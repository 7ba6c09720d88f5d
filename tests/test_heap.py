"""plinth/heap.py: inside `freed_memory_kept()` a freed block is reused without page faults;
outside it glibc hands large blocks back to the OS and every allocation faults its pages in again."""
import os
import resource

import pytest
import torch

from plinth import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="not glibc: freed_memory_kept() changes nothing")


def page_faults_per_allocation(rounds=4) -> float:
    torch.empty(16 << 20).fill_(1)  # 64 MiB: over glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.empty(16 << 20).fill_(1)  # touch every page, then free
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


def resident_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_freed_memory_is_reused_inside_the_block_and_returned_outside():
    assert page_faults_per_allocation() > 4000  # 16,384 pages of 4 KiB: each faulted in again
    resident = resident_mib()
    with heap.freed_memory_kept():
        with heap.freed_memory_kept():  # nested: only the outermost block restores glibc's settings
            pass
        page_faults_per_allocation()  # the heap settles over the first few blocks
        assert page_faults_per_allocation() < 100
        assert resident_mib() > resident + 48  # the 64 MiB block kept, though freed
    assert resident_mib() < resident + 32  # handed back when the block ends
    assert page_faults_per_allocation() > 4000


def test_settings_come_back_after_an_exception():
    with pytest.raises(RuntimeError), heap.freed_memory_kept():
        raise RuntimeError("boom")
    assert heap._depth == 0
    assert page_faults_per_allocation() > 4000
