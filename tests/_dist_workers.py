"""Worker processes for tests/test_distributed.py: real gloo process groups on 127.0.0.1.

Each ``*_worker`` runs on one rank of a group it starts and destroys itself. It saves what the
test checks to ``{out}/rank{rank}.pt``, and the parent process computes single-process
references with the same models and batches. Workers must live in an importable module because
``torch.multiprocessing.spawn`` pickles them by name.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import macfn
import macfn.distributed
import macfn.optim

WORLD_SIZE = 2
STEPS = 4
STATS_INTERVAL = 2
HYPERPARAMETERS: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "damping": 0.5}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spawn(worker: Callable[..., None], *args: Any) -> list[dict[str, Any]]:
    """Run ``worker(rank, port, out, *args)`` on WORLD_SIZE processes and return each rank's saved results."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_run_then_exit, args=(worker, free_port(), out, *args), nprocs=WORLD_SIZE, join=True)
        return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=True) for rank in range(WORLD_SIZE)]


def _run_then_exit(rank: int, worker: Callable[..., None], *args: Any) -> None:
    """Run one rank's worker, then leave the process without its interpreter teardown.

    Workers that used torch.profiler next to a gloo group were killed by SIGABRT ("terminate
    called without an active exception") in 5 of 17 runs on 2 cores, during interpreter teardown
    after the worker had returned. os._exit skips that teardown, and no failure came in 10 runs
    since. An exception in the worker still propagates, so mp.spawn reports it.
    """
    worker(rank, *args)
    os._exit(0)


def _start(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )


def _save(out: str, rank: int, results: dict[str, Any]) -> None:
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


# ---------------------------------------------------------------------- shared models and data


def conv_model() -> nn.Module:
    """A conv net whose layers cover every FSDP2 row layout: even, uneven, grouped and empty shards."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),  # 2 blocks of 2 rows: one whole block per rank
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 5),  # 5 rows: 3 on rank 0, 2 on rank 1
        nn.LayerNorm(5),
        nn.Tanh(),
        nn.Linear(5, 1),  # 1 row: rank 1 has none
    )


def batches(count: int = STEPS, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 2, 5, 5, generator=generator) + 0.5, torch.randn(size, 1, generator=generator))
        for _ in range(count)
    ]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()


def local_rows(data: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return this rank's half of every batch."""
    half = data[0][0].shape[0] // WORLD_SIZE
    return [(x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]) for x, y in data]


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather every parameter in full (DTensors are all-gathered) as plain tensors."""
    result = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if macfn.distributed.is_dtensor(p) else p
        result[name] = value.detach().clone()
    return result


# ---------------------------------------------------------------------- workers


def reduce_stats_worker(rank: int, port: int, out: str, stats: list[dict[str, torch.Tensor]], rows: list[int]) -> None:
    """Reduce given per-rank statistics three ways and count the collectives of one reduction."""
    _start(rank, port)
    try:
        with torch.profiler.profile() as profile:
            weighted = macfn.distributed.reduce_stats(stats[rank], rows=rows[rank])
        collectives = sum(1 for event in profile.events() if event.name == "gloo:all_reduce")
        equal = macfn.distributed.reduce_stats(stats[rank])
        per_layer = macfn.distributed.reduce_stats(stats[rank], rows={name: rows[rank] for name in stats[rank]})
        _save(out, rank, {"weighted": weighted, "equal": equal, "per_layer": per_layer, "collectives": collectives})
    finally:
        dist.destroy_process_group()


def ddp_worker(rank: int, port: int, out: str) -> None:
    """Train a DDP model on half of every batch; count the all-reduces inside each optimizer step."""
    _start(rank, port)
    try:
        model = nn.parallel.DistributedDataParallel(conv_model())
        optimizer = macfn.optim.MAC(model, stats_interval=STATS_INTERVAL, **HYPERPARAMETERS)
        collectives = []
        for x, y in local_rows(batches(), rank):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            with torch.profiler.profile() as profile:
                optimizer.step()
            collectives.append(sum(1 for event in profile.events() if event.name == "gloo:all_reduce"))

        # Ranks with 5 and 3 samples: the running mean must be the mean over all 8 samples.
        unequal = conv_model()
        unequal_optimizer = macfn.optim.MAC(unequal, momentum=0.0)
        x, y = batches(1)[0]
        x, y = (x[:5], y[:5]) if rank == 0 else (x[5:], y[5:])
        loss_fn(unequal(x), y).backward()
        unequal_optimizer.step()
        running = {name: entry["mean_activation"] for name, entry in unequal_optimizer.state_dict()["state"].items()
                   if "mean_activation" in entry}
        _save(out, rank, {"params": full_params(model.module), "collectives": collectives, "running": running})
    finally:
        dist.destroy_process_group()


def _sharded_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = conv_model()
    for index in (0, 3, 6):
        fully_shard(model[index])
    fully_shard(model)
    return model


def fsdp_worker(rank: int, port: int, out: str) -> None:
    """Train an FSDP2 model, checkpoint it with torch.distributed.checkpoint, and try unsupported layouts."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    _start(rank, port)
    try:
        results: dict[str, Any] = {}
        data = local_rows(batches(), rank)
        half = STEPS // 2

        # A run of every step, and a run saved halfway and resumed in a fresh model and optimizer.
        model = _sharded_model()
        optimizer = macfn.optim.MAC(model, stats_interval=STATS_INTERVAL, **HYPERPARAMETERS)
        results["local_rows"] = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
        train(model, optimizer, data[:half])
        # The checkpoint directory is shared by both ranks; rank 0 names it.
        names = [os.path.join(out, "checkpoint")]
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=names[0])
        train(model, optimizer, data[half:])
        results["params"] = full_params(model)

        resumed = _sharded_model()
        resumed_optimizer = macfn.optim.MAC(resumed, stats_interval=STATS_INTERVAL, **HYPERPARAMETERS)
        template = {"model": resumed.state_dict(), "optim": resumed_optimizer.state_dict()}
        dcp.load(template, checkpoint_id=names[0])
        resumed.load_state_dict(template["model"])
        resumed_optimizer.load_state_dict(template["optim"])
        train(resumed, resumed_optimizer, data[half:])
        results["resumed_params"] = full_params(resumed)

        # A NaN in rank 1's gradient shard alone skips the step on both ranks.
        x, y = data[-1]
        resumed_optimizer.zero_grad()
        loss_fn(resumed(x), y).backward()
        if rank == 1:
            resumed[3].weight.grad.to_local()[0, 0] = float("nan")
        before_nan = full_params(resumed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            resumed_optimizer.step()
        after_nan = full_params(resumed)
        results["nan_changed"] = [name for name in before_nan if not torch.equal(before_nan[name], after_nan[name])]
        results["nan_skipped"] = [int(entry["skipped"]) for entry in resumed_optimizer.state_dict()["group_state"]]

        # Column sharding and blocks split across ranks are rejected with the reason.
        column = conv_model()
        fully_shard(column[3], shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        results["column_error"] = _error_text(lambda: macfn.optim.MAC(column))
        torch.manual_seed(0)
        grouped = nn.Sequential(nn.Conv2d(3, 6, 1, groups=3))  # 3 blocks of 2 rows: rank 0 holds rows 0-2
        fully_shard(grouped)
        results["block_error"] = _error_text(lambda: macfn.optim.MAC(grouped))
        _save(out, rank, results)
    finally:
        dist.destroy_process_group()


def _error_text(build: Callable[[], Any]) -> str:
    try:
        build()
    except ValueError as error:
        return str(error)
    return ""
