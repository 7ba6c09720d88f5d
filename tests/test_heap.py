"""plinth/heap.py: inside `freed_memory_kept()` a freed block is reused without page faults;
outside it glibc hands large blocks back to the OS and every allocation faults its pages in again.
Measured in a fresh interpreter: what glibc does with a block depends on the heap's history."""
import json
import os
import subprocess
import sys

import pytest

from plinth import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="not glibc: freed_memory_kept() changes nothing")

CHILD = '''
import json, os, resource, torch
from plinth import heap

def page_faults_per_allocation(rounds=4):
    torch.empty(16 << 20).fill_(1)  # 64 MiB: over glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.empty(16 << 20).fill_(1)  # touch every page, then free
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

seen = {"outside": page_faults_per_allocation(), "resident": resident_mib()}
with heap.freed_memory_kept():
    with heap.freed_memory_kept():  # nested: only the outermost block restores glibc's settings
        pass
    for _ in range(2):  # the heap settles over the first few blocks (how many depends on its history)
        page_faults_per_allocation()
    seen["inside"], seen["resident_inside"] = page_faults_per_allocation(), resident_mib()
seen["resident_after"], seen["after"] = resident_mib(), page_faults_per_allocation()
try:
    with heap.freed_memory_kept():
        raise RuntimeError("boom")
except RuntimeError:
    seen["after_error"], seen["depth"] = page_faults_per_allocation(), heap._depth
print(json.dumps(seen))
'''


def run_child(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return json.loads(done.stdout)


def test_freed_memory_is_reused_inside_the_block_and_handed_back_after_it():
    seen = run_child()
    assert seen["outside"] > 4000  # 16,384 pages of 4 KiB: each faulted in again
    assert seen["inside"] < 100
    assert seen["resident_inside"] > seen["resident"] + 48  # the 64 MiB block kept, though freed
    assert seen["resident_after"] < seen["resident"] + 32  # handed back when the block ends
    assert seen["after"] > 4000 and seen["after_error"] > 4000  # glibc's settings back, also after an error
    assert seen["depth"] == 0


def test_a_user_tuned_allocator_is_left_alone():
    seen = run_child(MALLOC_ARENA_MAX="2")  # any glibc allocator setting of the user's
    assert seen["outside"] > 4000 and seen["inside"] > 4000


SERVER_CHILD = '''
import ctypes, json, resource, sys
from plinth import heap

libc = heap._glibc()
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if sys.argv[1] == "returned":
    heap.freed_memory_returned()
libc.free(libc.malloc(16 << 20))  # mapped on its own; by default freeing it raises glibc's threshold to 16 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    block = libc.malloc(4 << 20)
    ctypes.memset(block, 1, 4 << 20)  # touch every page
    libc.free(block)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4))
'''


@pytest.mark.parametrize("setting", ["default", "returned"])
def test_a_server_hands_freed_blocks_back_where_glibc_would_keep_them(setting):
    done = subprocess.run([sys.executable, "-c", SERVER_CHILD, setting], capture_output=True, text=True, check=True)
    faults = json.loads(done.stdout)  # a 4 MiB block is 1,024 pages of 4 KiB
    if setting == "default":
        assert faults < 512  # mostly from the heap after that first free, and kept there: it never goes back
    else:
        assert faults > 1000  # unmapped on every free, so mapped and faulted in anew
