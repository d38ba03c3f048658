"""pytest-benchmark suite: optimizer step and training step of every variant on every workload.

Run with ``python -m pytest benchmarks --benchmark-only``; the default ``python -m pytest``
collects only ``tests/``. Each round is one block of ``REFRESH_PERIOD`` steps, so KFAC's
refresh is amortised as in ``python -m benchmarks.report``. Narrow the run with ``-k``, e.g.
``-k "mlp-2048 and optimizer"``. Set ``MACFN_BENCH_DEVICE=cuda`` to run on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from .models import build_workload
from .timing import synchronize
from .variants import REFRESH_PERIOD, build_variant, variant_names

WORKLOADS = ("mlp-1024", "mlp-2048", "cnn", "vit", "gpt")
DEVICE = torch.device(os.environ.get("MACFN_BENCH_DEVICE", "cpu"))
ROUNDS = 7


@pytest.fixture(autouse=True)
def _fresh_compile_cache() -> None:
    """Start every benchmark from an empty dynamo cache, so that no test hits the recompile limit."""
    torch._dynamo.reset()


def _block(call: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(REFRESH_PERIOD):
            call()
        synchronize(DEVICE)

    return run


@pytest.mark.parametrize("variant_name", variant_names())
@pytest.mark.parametrize("workload_name", WORKLOADS)
def test_optimizer_step(benchmark: BenchmarkFixture, workload_name: str, variant_name: str) -> None:
    workload = build_workload(workload_name, device=DEVICE)
    variant = build_variant(variant_name, workload)
    variant.prepare(workload.inputs, workload.targets)
    benchmark.group = f"optimizer step {workload_name}"
    benchmark.pedantic(_block(variant.optimizer_step), rounds=ROUNDS, warmup_rounds=1)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("variant_name", variant_names())
@pytest.mark.parametrize("workload_name", WORKLOADS)
def test_train_step(benchmark: BenchmarkFixture, workload_name: str, variant_name: str) -> None:
    workload = build_workload(workload_name, device=DEVICE)
    variant = build_variant(variant_name, workload)
    losses: list[torch.Tensor] = []

    def step() -> None:
        losses.append(variant.train_step(workload.inputs, workload.targets))

    benchmark.group = f"training step {workload_name}"
    benchmark.pedantic(_block(step), rounds=ROUNDS, warmup_rounds=1)  # type: ignore[no-untyped-call]
    assert torch.isfinite(torch.stack(losses)).all()
