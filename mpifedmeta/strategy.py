"""Choose how a block's meta-gradients are batched, by measurement (``train.strategy = "auto"``).

vmap is 2–3.5× faster than a per-agent loop for MLPs on CPU but slower for CNNs (per-agent conv
weights become a grouped convolution), and its memory grows with the block and ν. So we time a
few meta-steps of each candidate on the real model, device, block size and ν, drop candidates
whose peak memory exceeds the budget, and keep the fastest.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

CANDIDATES = ("loop", "chunked", "vmap")    # least memory first (CPU peak memory is monotonic)


@dataclass
class Choice:
    strategy: str
    chunk: int
    seconds: dict = field(default_factory=dict)     # candidate -> best seconds per meta-step
    peak_mb: dict = field(default_factory=dict)     # candidate -> peak memory (MB) seen while it ran
    skipped: dict = field(default_factory=dict)     # candidate -> reason

    def describe(self) -> str:
        parts = [f"{c}: {1e3 * s:.1f} ms" + (f", {self.peak_mb[c]:.0f} MB" if c in self.peak_mb else "")
                 for c, s in self.seconds.items()]
        parts += [f"{c}: skipped ({why})" for c, why in self.skipped.items()]
        return f"{self.strategy}" + (f" (chunk {self.chunk})" if self.strategy == "chunked" else "") + " — " + "; ".join(parts)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PREFERENCE_MARGIN = 0.10   # another candidate must be >10% faster than vmap to be chosen (timing noise)


def pick(seconds: dict) -> str:
    """The fastest candidate, but vmap unless another one beats it by more than the margin."""
    best = min(seconds, key=seconds.get)
    if "vmap" in seconds and seconds[best] > (1 - PREFERENCE_MARGIN) * seconds["vmap"]:
        return "vmap"
    return best


def measure(step: Callable[[str, int], None], device: torch.device, chunk: int, block: int,
            memory_budget_mb: float = 0.0, repeats: int = 3) -> Choice:
    """Time ``step(strategy, chunk)`` (one batched meta-step) for each candidate; pick the fastest
    that stays within ``memory_budget_mb`` (0 = no limit) of memory growth."""
    seconds, peaks, skipped = {}, {}, {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_mb(device)
    for cand in CANDIDATES:
        if cand == "chunked" and chunk >= block:
            skipped[cand] = f"chunk {chunk} >= block {block}: same as vmap"
            continue
        try:
            step(cand, chunk)                          # warm-up
            _sync(device)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step(cand, chunk)
                _sync(device)
                times.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            skipped[cand] = "out of memory"
            torch.cuda.empty_cache()
            continue
        peaks[cand] = _peak_mb(device) - base
        if memory_budget_mb and peaks[cand] > memory_budget_mb:
            skipped[cand] = f"peak {peaks[cand]:.0f} MB > budget {memory_budget_mb:.0f} MB"
            continue
        seconds[cand] = min(times)     # least disturbed by other processes
    if not seconds:
        return Choice("loop", chunk, seconds, peaks, skipped)
    return Choice(pick(seconds), chunk, seconds, peaks, skipped)
