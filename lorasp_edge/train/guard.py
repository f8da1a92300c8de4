"""A watchdog that holds training to the plan's memory budget.

A background thread samples the process's resident set size (psutil) every `interval_s`; on CUDA,
`torch.cuda.max_memory_allocated` is read as well. The trainer asks `over_budget()` after every
step; over budget it writes a checkpoint and stops with exit code 3, saying how far the plan's
prediction was off. Sampling misses spikes shorter than the interval; the planner's validation
(tools/validate_planner.py) uses the same sampler, so the two agree on what "peak" means.
"""

from __future__ import annotations

import threading

import psutil
import torch


class MemoryGuard:
    def __init__(self, budget_bytes: int | None, predicted_bytes: int | None = None, interval_s: float = 0.01, device: torch.device | None = None):
        self.budget_bytes = budget_bytes
        self.predicted_bytes = predicted_bytes
        self.interval_s = interval_s
        self.device = device or torch.device("cpu")
        self._process = psutil.Process()
        self._peak_rss = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="lorasp-memory-guard", daemon=True)

    def __enter__(self) -> "MemoryGuard":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = self._process.memory_info().rss
            if rss > self._peak_rss:
                self._peak_rss = rss

    def peak_bytes(self) -> int:
        rss = max(self._peak_rss, self._process.memory_info().rss)
        self._peak_rss = rss
        if self.device.type == "cuda":
            # On a GPU the budget is device memory; host RSS is the CPU side's concern.
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(rss)

    def over_budget(self) -> bool:
        return self.budget_bytes is not None and self.peak_bytes() > self.budget_bytes

    def report(self, step: int) -> str:
        peak = self.peak_bytes()
        message = f"peak memory {peak / 1e9:.2f} GB went over the budget of {self.budget_bytes / 1e9:.2f} GB at step {step}"
        if self.predicted_bytes:
            message += f"; the plan predicted {self.predicted_bytes / 1e9:.2f} GB ({(peak / self.predicted_bytes - 1) * 100:+.0f}%)"
        return message + "; a checkpoint was written: plan for a smaller budget (or a smaller --seq-len/--batch) and --resume"
