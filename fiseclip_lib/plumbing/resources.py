"""Machine resources: the CPUs this process may use, and memory measurements for cost records."""
from __future__ import annotations

import os
import sys


def usable_cpus() -> int:
    """The CPUs this process may use: a container or `taskset` limit is respected (os.cpu_count is not)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource  # POSIX only: imported where it is used

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1e6


def memory_mark(device) -> float:
    """Start a memory measurement: on CUDA the peak counter is reset; on the CPU the process's peak RSS so far
    (MB) is returned, so that `memory_increase_mb` reports what this piece of work added."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device)) / 2**20
    return peak_rss_mb()


def memory_increase_mb(device, mark: float) -> float:
    """What the work since `memory_mark` added: CUDA peak allocated, or growth of the CPU peak RSS (MB)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return float(torch.cuda.max_memory_allocated(device)) / 2**20 - mark
    return max(0.0, peak_rss_mb() - mark)
