"""Soak test: 10,000 compiled MAC training steps with flat memory, consistent state and no recompilation.

Excluded by default; run it with ``pytest -m soak tests/test_soak.py`` (under a minute on two CPU cores).
"""

from __future__ import annotations

import math
import resource
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.func import functional_call

import macfn

STEPS = 10_000
STATS_INTERVAL = 10
NAN_STEPS = (2_500, 5_000, 7_501)  # two on statistics steps, one between them
WARMUP = 1_000
MIDPOINT = 5_500
# Resident memory may grow by allocator caching and page-level noise, never by a leak per step:
# a leak of one float32 [16, 8] tensor per step adds 11 MiB over 9,000 steps (measured).
RSS_GROWTH_LIMIT = 4 * 2**20
# The Python heap is traced from WARMUP on. Its growth from MIDPOINT to the end must stay below
# what one leaked 64-byte object per step would add (288 KiB). Observed: -2 to 2 KiB.
PYTHON_GROWTH_LIMIT = 64 * 2**10
# The running mean is a float32 EMA of float32 batch means; the float64 EMA of the same inputs
# differs by rounding only. Observed: about 1e-7.
EMA_TOLERANCE = 1e-5


def _rss_bytes() -> int:
    """Return the current resident set size, or the peak where /proc is unavailable."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.soak
@pytest.mark.compile
def test_ten_thousand_compiled_steps():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    config = macfn.MACConfig(lr=0.05, momentum=0.9, weight_decay=1e-4, damping=1.0, stat_decay=0.95)

    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    compute = macfn.grad_and_stats(model, loss_fn)

    def train_step(params, state, x, y, lr, refresh: bool):
        grads, stats, loss = compute(params, x, y)
        params, state = macfn.step(params, grads, stats if refresh else None, state, config, lr=lr)
        return params, state, loss, stats

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 8, generator=generator) + 0.3
    labels = (inputs[:, :4].argmax(dim=1) + (inputs[:, 4] > 0).long()) % 4
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = macfn.init(params, config, compute(params, inputs[:16], labels[:16])[1])

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(train_step, fullgraph=True, backend=counter)

    reference_ema = {name: torch.zeros_like(mean, dtype=torch.float64) for name, mean in state["mean_activation"].items()}
    stats_updates = 0
    first_loss = last_loss = float("nan")
    rss_after_warmup = python_at_midpoint = 0
    started = time.perf_counter()
    for index in range(STEPS):
        start = (index * 16) % 64
        x, y = inputs[start:start + 16], labels[start:start + 16]
        if index in NAN_STEPS:
            x = x.clone()
            x[0, 0] = float("nan")
        lr = torch.tensor(config.lr * 0.5 * (1 + math.cos(math.pi * index / STEPS)))
        refresh = index % STATS_INTERVAL == 0
        params, state, loss, stats = compiled(params, state, x, y, lr, refresh)
        if refresh and index not in NAN_STEPS:
            stats_updates += 1
            for name, mean in stats.items():
                reference_ema[name] = config.stat_decay * reference_ema[name] + (1 - config.stat_decay) * mean.double()
        if index == 0:
            first_loss = loss.item()
        if index == STEPS - 1:
            last_loss = loss.item()
        if index == WARMUP:
            rss_after_warmup = _rss_bytes()
            tracemalloc.start()
        if index == MIDPOINT:
            python_at_midpoint = tracemalloc.get_traced_memory()[0]
    elapsed = time.perf_counter() - started
    python_growth = tracemalloc.get_traced_memory()[0] - python_at_midpoint
    tracemalloc.stop()
    rss_growth = _rss_bytes() - rss_after_warmup

    report = (f"{STEPS} steps in {elapsed:.1f} s ({elapsed / STEPS * 1e3:.2f} ms/step), RSS growth after warm-up "
              f"{rss_growth / 2**20:.2f} MiB, Python heap growth over the last {STEPS - MIDPOINT} steps "
              f"{python_growth / 2**10:.1f} KiB, "
              f"{counter.frame_count} compiled frames, loss {first_loss:.3f} -> {last_loss:.3f}")
    warnings.warn(report, UserWarning, stacklevel=1)

    assert counter.frame_count == 2, f"recompiled: {counter.frame_count} frames ({report})"
    assert state["step"].item() == STEPS - len(NAN_STEPS)
    assert state["skipped"].item() == len(NAN_STEPS)
    for name, reference in reference_ema.items():
        assert state["stat_count"][name].item() == stats_updates
        torch.testing.assert_close(state["mean_activation"][name].double(), reference, rtol=EMA_TOLERANCE,
                                   atol=EMA_TOLERANCE)
    assert all(torch.isfinite(p).all() for p in params.values())
    assert all(torch.isfinite(b).all() for b in state["momentum"].values())
    assert last_loss < 0.5 * first_loss, report
    assert rss_growth < RSS_GROWTH_LIMIT, report
    assert python_growth < PYTHON_GROWTH_LIMIT, report
    torch._dynamo.reset()
