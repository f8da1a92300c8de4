"""A watchdog that holds training to the plan's memory budget.

What the budget limits is memory the process cannot give back:
  cpu   anonymous memory: the resident set minus its file-backed pages (Linux /proc/self/status:
        VmRSS - RssFile; heap, tensors, shared memory). Clean file pages (a mapped checkpoint, the
        libraries' code) are dropped by the kernel under pressure and re-read on use, so they
        cannot run the machine out of memory; the resident set is still reported beside it.
        Where the split is unavailable (not Linux) the whole resident set counts.
  cuda  reserved device memory (torch.cuda.max_memory_reserved): the caching allocator keeps
        freed blocks, so reserved, not allocated, is what other allocations cannot use. The
        CUDA context lies outside it (the plan's runtime term holds it).
A background thread samples every `interval_s`; the trainer asks `over_budget()` after every
step; over budget it writes a checkpoint and stops with exit code 3, saying how far the plan's
prediction was off. Sampling misses spikes shorter than the interval.
"""

from __future__ import annotations

import sys
import threading

import psutil
import torch

STATUS_FILE = "/proc/self/status"


def process_memory() -> tuple[int, int]:
    """(resident set, anonymous part of it) of this process, in bytes."""
    if sys.platform.startswith("linux"):
        try:
            fields = {}
            with open(STATUS_FILE) as status:
                for line in status:
                    if line.startswith(("VmRSS:", "RssFile:")):
                        key, value = line.split(":", 1)
                        fields[key] = int(value.split()[0]) * 1024  # the kernel reports kB
            if len(fields) == 2:
                return fields["VmRSS"], fields["VmRSS"] - fields["RssFile"]
        except (OSError, ValueError):
            pass
    rss = psutil.Process().memory_info().rss
    return rss, rss


class MemoryGuard:
    def __init__(self, budget_bytes: int | None, predicted_bytes: int | None = None, interval_s: float = 0.01, device: torch.device | None = None):
        self.budget_bytes = budget_bytes
        self.predicted_bytes = predicted_bytes
        self.interval_s = interval_s
        self.device = device or torch.device("cpu")
        self._peak_rss, self._peak_anon = process_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="lorasp-memory-guard", daemon=True)

    def __enter__(self) -> "MemoryGuard":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _update(self) -> None:
        rss, anon = process_memory()
        self._peak_rss = max(self._peak_rss, rss)
        self._peak_anon = max(self._peak_anon, anon)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    @property
    def measure(self) -> str:
        """What `peak_bytes` measures, in words."""
        if self.device.type == "cuda":
            return "reserved CUDA memory"
        return "anonymous memory (resident set without file-backed pages)"

    def peak_rss_bytes(self) -> int:
        """The whole process's peak resident set, file-backed pages included."""
        self._update()
        return int(self._peak_rss)

    def peak_anonymous_bytes(self) -> int:
        self._update()
        return int(self._peak_anon)

    def peak_bytes(self) -> int:
        """The peak of what the budget limits (see the module docstring)."""
        self._update()
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device))
        return int(self._peak_anon)

    def over_budget(self) -> bool:
        return self.budget_bytes is not None and self.peak_bytes() > self.budget_bytes

    def report(self, step: int) -> str:
        peak = self.peak_bytes()
        message = f"peak {self.measure} {peak / 1e9:.2f} GB went over the budget of {self.budget_bytes / 1e9:.2f} GB at step {step}"
        if self.predicted_bytes:
            message += f"; the plan predicted {self.predicted_bytes / 1e9:.2f} GB ({(peak / self.predicted_bytes - 1) * 100:+.0f}%)"
        return message + "; a checkpoint was written: plan for a smaller budget (or a smaller --seq-len/--batch) and resume with --plan"
