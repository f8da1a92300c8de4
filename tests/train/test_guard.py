"""The memory guard limits anonymous memory on CPU (file pages do not count) and reserved memory on CUDA."""

from __future__ import annotations

import gc
import mmap
import sys

import pytest
import torch

from lorasp_edge.train.guard import MemoryGuard, process_memory

MB = 1_000_000
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the anonymous/file split is read from /proc")


@linux_only
def test_file_pages_count_in_rss_not_in_anonymous(tmp_path):
    size = 64 * 2**20
    path = tmp_path / "pages.bin"
    path.write_bytes(b"\1" * size)
    rss0, anon0 = process_memory()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        checksum = sum(mapped[i] for i in range(0, size, 4096))  # touch every page
        rss1, anon1 = process_memory()
    assert checksum == size // 4096
    assert rss1 - rss0 > 0.9 * size, (rss1 - rss0)
    assert abs(anon1 - anon0) < 0.1 * size, (anon1 - anon0)

    # A fresh anonymous mapping, every page written: new anonymous memory whatever the heap already
    # holds (a heap allocation could reuse pages earlier tests freed).
    with mmap.mmap(-1, size) as block:
        for offset in range(0, size, 4096):
            block[offset] = 1
        _, anon2 = process_memory()
    assert anon2 - anon1 > 0.9 * size, (anon2 - anon1)


@linux_only
def test_guard_limits_anonymous_memory_and_says_so(tmp_path):
    size = 256 * 2**20
    path = tmp_path / "pages.bin"
    with open(path, "wb") as handle:
        handle.truncate(size)
    gc.collect()
    _, anon = process_memory()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        sum(mapped[i] for i in range(0, size, 4096))
        with MemoryGuard(budget_bytes=anon + 128 * 2**20, predicted_bytes=anon) as guard:
            # The resident set is now over the budget (file pages), the anonymous part is not.
            assert guard.peak_rss_bytes() > guard.budget_bytes
            assert not guard.over_budget()
            # Measured just before the block: collecting earlier tests' objects can return heap to the
            # system, so anonymous memory may sit below the figure taken at the start.
            _, before = process_memory()
            block = torch.ones(64 * 2**20)  # 256 MiB anonymous: over
            assert guard.over_budget()
            message = guard.report(step=3)
            del block
    assert "anonymous memory" in message and "at step 3" in message
    assert guard.peak_anonymous_bytes() >= before + 256 * 2**20 * 0.9


def test_guard_on_cuda_watches_reserved_memory(monkeypatch):
    """No GPU here: the CUDA counters are replaced, to check which one the guard reads."""
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 7 * 10**9)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 10**9)
    guard = MemoryGuard(budget_bytes=6 * 10**9, predicted_bytes=5 * 10**9, device=torch.device("cuda"))
    assert guard.peak_bytes() == 7 * 10**9
    assert guard.over_budget()
    assert "reserved CUDA memory 7.00 GB" in guard.report(step=1) and "(+40%)" in guard.report(step=1)
