"""Interleaved wall-clock timing, peak memory of a step, and the environment of a run."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device``; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    tasks: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    block: int,
    warmup_blocks: int = 1,
    device: torch.device = torch.device("cpu"),
    errors: dict[str, str] | None = None,
    faults: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time several tasks side by side and return seconds per call for each repeat.

    Each repeat times one block of ``block`` consecutive calls of every task, in an order
    that rotates from repeat to repeat, so that a change in machine load during the run
    reaches every task alike.

    Args:
        tasks: Zero-argument callables keyed by name.
        repeats: Timed blocks per task.
        block: Calls per block; the block time is divided by it.
        warmup_blocks: Untimed blocks per task before the first timed one.
        device: Device to synchronise before reading the clock.
        errors: Where to record a task that raises, as ``{name: message}``; that task is
            dropped from later repeats and keeps the samples it has. When None, errors propagate.
        faults: Where to record the minor page faults of this process per call, one entry
            per timed block, as ``{name: [faults per call]}``. A fault is the first touch of a
            page the process has not used yet, e.g. of a large buffer fresh from ``mmap``.

    Returns:
        ``{name: [seconds per call, one entry per repeat]}``.
    """
    names = list(tasks)
    samples: dict[str, list[float]] = {name: [] for name in names}
    failed: set[str] = set()

    def run_block(name: str) -> float | None:
        try:
            synchronize(device)
            faults_before = minor_faults()
            start = time.perf_counter()
            for _ in range(block):
                tasks[name]()
            synchronize(device)
            seconds = (time.perf_counter() - start) / block
            faults_after = minor_faults()
            if faults is not None and faults_before is not None and faults_after is not None:
                faults.setdefault(name, []).append((faults_after - faults_before) / block)
            return seconds
        except Exception as error:
            if errors is None:
                raise
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            failed.add(name)
            return None

    for name in names:
        for _ in range(warmup_blocks):
            if name not in failed:
                run_block(name)
    if faults is not None:
        faults.clear()
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            seconds = run_block(name)
            if seconds is not None:
                samples[name].append(seconds)
    return samples


def minor_faults() -> int | None:
    """Return the minor page faults this process has taken so far; None where unknown (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(samples: Mapping[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Return the median, quartiles and ratio to ``baseline`` of every task that has samples.

    ``ratio`` is the median of the task over the median of the baseline; ``paired_ratio`` is
    the median over repeats of the ratio within each repeat.
    """
    base = samples[baseline]
    base_median = statistics.median(base)
    summary: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        if not values:
            continue
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        paired = [v / b for v, b in zip(values, base)]
        summary[name] = {
            "median_s": statistics.median(values),
            "q1_s": quartiles[0],
            "q3_s": quartiles[2],
            "ratio": statistics.median(values) / base_median,
            "paired_ratio": statistics.median(paired),
            "repeats": len(values),
        }
    return summary


def peak_step_bytes(step: Callable[[], object]) -> int:
    """Return the peak of torch-allocated CPU memory during one call, above its start.

    The allocation and free events that ``torch.profiler`` records with
    ``profile_memory=True`` are summed in time order; the result is the largest running
    total. Tensors that live before the call (parameters, optimizer state) are not in it,
    and neither is memory that Python objects or the compiler take.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        step()
    # NOTE: kineto_results is not public API, but it is the only place that keeps each
    # allocation as its own timed event; key_averages() folds them into the enclosing op.
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = 0
    peak = 0
    for event in events:
        if event.device_type() != torch._C._autograd.DeviceType.CPU:
            continue
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages, or an empty list where unknown."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def environment(device: torch.device) -> dict[str, Any]:
    """Return the software and hardware facts that the numbers depend on."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "libc": " ".join(platform.libc_ver()).strip() or "unknown",
        "load_average_at_start": load_average(),
    }
    # Allocator settings change how often a step faults in fresh pages.
    allocator = {name: value for name, value in os.environ.items()
                 if name == "GLIBC_TUNABLES" or name.startswith("MALLOC_") or name == "LD_PRELOAD"}
    if allocator:
        info["allocator_environment"] = allocator
    info["macfn_commit"] = _git_commit()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def _git_commit() -> str:
    """Return the repository's commit, with "+ local changes" when macfn/ differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False, timeout=10).stdout.strip()
        # NOTE: --no-optional-locks keeps git status from rewriting the index while it runs.
        status = ["git", "--no-optional-locks", "-C", root, "status", "--porcelain", "--", "macfn"]
        changed = subprocess.run(status, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" + local changes in macfn/" if changed else "")


def _nvidia_driver() -> str:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=False, timeout=10)
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
