"""MAC on real gloo process groups (2 CPU processes on 127.0.0.1) against single-process references.

Each spawn starts two processes, which start and destroy their own group. The spawn and the
import of torch take most of its 15 to 25 s, so the two DDP tests share one spawn.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import macfn
import macfn.distributed
import macfn.optim
from tests import _dist_workers as workers
from tests._reference import conv2d_mean, linear_mean

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

# Two ranks average per-rank mean gradients and mean activations where one process averages
# the whole batch; the sums associate differently. Observed parameter differences after 4
# steps: 1.3e-6 (DDP) and 3.2e-6 (FSDP2), on parameters of size about 0.1 to 1.
DATA_PARALLEL_TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def test_reduce_stats_weights_rows():
    generator = torch.Generator().manual_seed(3)
    stats = [{"a.weight": torch.randn(1, 4, generator=generator), "b.weight": torch.randn(2, 3, generator=generator)}
             for _ in range(workers.WORLD_SIZE)]
    rows = [5, 3]

    results = workers.spawn(workers.reduce_stats_worker, stats, rows)

    for name in stats[0]:
        pooled = (rows[0] * stats[0][name].double() + rows[1] * stats[1][name].double()) / sum(rows)
        halves = (stats[0][name].double() + stats[1][name].double()) / 2
        for result in results:
            torch.testing.assert_close(result["weighted"][name].double(), pooled, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(result["per_layer"][name].double(), pooled, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(result["equal"][name].double(), halves, rtol=1e-6, atol=1e-7)
            assert result["weighted"][name].dtype == torch.float32
    assert [result["collectives"] for result in results] == [1, 1]


@pytest.fixture(scope="module")
def ddp_results():
    return workers.spawn(workers.ddp_worker)


def test_ddp_matches_single_process(ddp_results):
    reference = workers.conv_model()
    optimizer = macfn.optim.MAC(reference, stats_interval=workers.STATS_INTERVAL, **workers.HYPERPARAMETERS)
    workers.train(reference, optimizer, workers.batches())

    for result in ddp_results:
        for name, p in reference.named_parameters():
            torch.testing.assert_close(result["params"][name], p.detach(), **DATA_PARALLEL_TOLERANCE)
        # One all-reduce on each statistics step, none on the steps between.
        assert result["collectives"] == [1, 0, 1, 0]


def test_ddp_statistics_weighted_by_rows(ddp_results):
    x, _ = workers.batches(1)[0]  # 8 samples, split 5 and 3 across the ranks by the worker
    model = workers.conv_model()
    hidden = torch.nn.Sequential(*list(model)[:3])(x)
    expected = {
        "0.weight": conv2d_mean(model[0], x),
        "3.weight": linear_mean(hidden, bias=True),
    }
    stat_decay = macfn.MACConfig().stat_decay

    for result in ddp_results:
        for name, mean in expected.items():
            running = result["running"][name].double() / (1 - stat_decay)
            torch.testing.assert_close(running, mean, rtol=1e-5, atol=1e-6)


def test_fsdp2_matches_single_process_and_resumes():
    reference = workers.conv_model()
    optimizer = macfn.optim.MAC(reference, stats_interval=workers.STATS_INTERVAL, **workers.HYPERPARAMETERS)
    workers.train(reference, optimizer, workers.batches())

    results = workers.spawn(workers.fsdp_worker)

    # The model covers every row layout that MAC supports under Shard(0).
    assert results[0]["local_rows"]["3.weight"] == (3, 100)
    assert results[1]["local_rows"]["3.weight"] == (2, 100)
    assert results[1]["local_rows"]["6.weight"] == (0, 5)
    assert results[0]["local_rows"]["0.weight"] == (2, 1, 3, 3)
    for result in results:
        for name, p in reference.named_parameters():
            torch.testing.assert_close(result["params"][name], p.detach(), **DATA_PARALLEL_TOLERANCE)
            assert torch.equal(result["resumed_params"][name], result["params"][name]), name
        assert result["nan_changed"] == [], "a NaN on one rank must skip the step on every rank"
        assert result["nan_skipped"] == [1]
        assert "Shard(0)" in result["column_error"]
        assert "whole blocks" in result["block_error"]
