"""MAC on torch.distributed: averaging mean activations across ranks and row-sharded parameters.

Data parallel training (DDP, or FSDP2 on its data-parallel ranks) gives every rank its own
batch and hence its own mean activations. :func:`reduce_stats` averages them, weighted by the
rows each rank saw, with one all-reduce of one flat tensor, so every replica applies the same
preconditioner. The result equals the mean activation of the concatenated batch up to
floating-point rounding.

MAC's update is row-wise: output row ``i`` of a weight is preconditioned with the mean
activation of its block alone. A weight sharded along dim 0 (FSDP2's default ``Shard(0)``)
can therefore be preconditioned on each rank's local rows with the replicated mean activation
and no further communication. :func:`row_range` finds those rows and rejects other layouts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ._capture import Stats

__all__ = ["average_across_ranks", "is_dtensor", "local_tensor", "reduce_stats", "row_range", "sync_active"]

Rows = int | float | Mapping[str, int | float]


def sync_active(group: dist.ProcessGroup | None = None) -> bool:
    """Return True when a process group with more than one rank is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def reduce_stats(
    stats: Mapping[str, Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    rows: Rows | None = None,
) -> Stats:
    """Average mean activations across the ranks of ``group`` with one all-reduce.

    Each rank contributes ``rows_r * abar_r`` and ``rows_r`` for every layer, packed into one
    flat tensor, and the result is ``sum_r rows_r * abar_r / sum_r rows_r``: the mean
    activation of all ranks' rows together. Every rank must pass the same keys with the same
    shapes; the collective does not check this.

    Example:
        >>> grads, stats, loss = compute(params, x_local, y_local)
        >>> stats = macfn.distributed.reduce_stats(stats, rows=x_local.shape[0])

    Args:
        stats: ``{weight_name: [blocks, d]}`` from this rank's batch, all of one dtype.
        group: Process group to average over; the default group when None.
        rows: Weight of this rank: None weighs every rank equally (exact when all ranks see
            batches of one size), a number (e.g. the local batch size) weighs every layer by
            it (exact when every sample gives each layer the same number of rows), and a
            mapping ``{weight_name: rows}`` weighs each layer separately.

    Returns:
        A new dict with the same keys and shapes. Unchanged values when the group has one rank.

    Raises:
        ValueError: ``rows`` is negative, not finite or lacks a key of ``stats``, or the
            statistics mix dtypes or devices.
        RuntimeError: No process group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "macfn.distributed.reduce_stats needs an initialised process group; call "
            "torch.distributed.init_process_group first."
        )
    names = sorted(stats)
    weights = _row_weights(names, rows)
    entries = [(name, stats[name], weights[name], tuple(stats[name].shape)) for name in names]
    return average_across_ranks(entries, group)


def _row_weights(names: Sequence[str], rows: Rows | None) -> dict[str, float]:
    if rows is None:
        return dict.fromkeys(names, 1.0)
    if isinstance(rows, Mapping):
        missing = [name for name in names if name not in rows]
        if missing:
            raise ValueError(
                f"Missing rows for {', '.join(map(repr, missing))}: pass a row count for every key of stats, "
                "or one number for all layers."
            )
        weights = {name: rows[name] for name in names}
    else:
        weights = dict.fromkeys(names, rows)
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid rows={value!r} for '{name}': expected a finite number >= 0.")
    return {name: float(value) for name, value in weights.items()}


def average_across_ranks(
    entries: Sequence[tuple[str, Tensor | None, float, tuple[int, ...]]],
    group: dist.ProcessGroup | None = None,
) -> Stats:
    """Average ``(name, mean, rows, shape)`` entries across ranks with one all-reduce.

    ``mean`` may be None on a rank that did not call the layer; it then contributes zero rows.
    A layer with zero rows on every rank is left out of the result. All ranks must pass the
    entries in one order with the same shapes.

    Returns:
        ``{name: [blocks, d]}`` in the dtype of the widest mean given on this rank.
    """
    present = [mean for _, mean, _, _ in entries if mean is not None]
    if not present:
        dtype, device = torch.float32, torch.device("cpu")
    else:
        dtype = torch.float64 if any(m.dtype == torch.float64 for m in present) else torch.float32
        devices = {m.device for m in present}
        if len(devices) > 1:
            raise ValueError(f"Invalid stats on several devices {sorted(map(str, devices))}: move them to one device.")
        device = devices.pop()
    if not sync_active(group):
        return {name: mean for name, mean, _, _ in entries if mean is not None}

    # Step 1: pack rows * mean of every layer, then the row counts -> [sum(blocks * d) + layers].
    parts: list[Tensor] = []
    counts: list[float] = []
    for _, mean, weight, shape in entries:
        if mean is None or weight == 0.0:
            parts.append(torch.zeros(math.prod(shape), dtype=dtype, device=device))
            counts.append(0.0)
        else:
            parts.append(mean.to(dtype).reshape(-1) * weight)
            counts.append(weight)
    parts.append(torch.tensor(counts, dtype=dtype, device=device))
    packed = torch.cat(parts)

    # Step 2: one all-reduce, then divide every layer's sum by its total rows.
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    totals = packed[-len(entries):].tolist() if entries else []
    result: Stats = {}
    offset = 0
    for (name, _, _, shape), total in zip(entries, totals):
        size = math.prod(shape)
        if total > 0:
            result[name] = (packed[offset : offset + size] / total).reshape(shape)
        offset += size
    return result


def is_dtensor(tensor: object) -> bool:
    """Return True when ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """Return the rank-local part of a DTensor, or ``tensor`` itself; writes to it reach ``tensor``."""
    if is_dtensor(tensor):
        return tensor.to_local()  # type: ignore[attr-defined, no-any-return]
    return tensor


def row_range(name: str, tensor: Tensor) -> tuple[int, int]:
    """Return the global output rows ``[start, stop)`` of a weight that are stored on this rank.

    A plain tensor has all rows. A DTensor is supported when each mesh dimension places it
    as ``Shard(0)`` or ``Replicate()``: FSDP2's default, HSDP, and plain replication.

    Raises:
        ValueError: Another placement, such as ``Shard(1)`` or ``Partial()``, because MAC
            needs whole rows on a rank to apply the mean activation to them.
    """
    if not is_dtensor(tensor):
        return 0, tensor.shape[0]
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tensor.placements  # type: ignore[attr-defined]
    for placement in placements:
        # NOTE: type() rather than isinstance, because _StridedShard subclasses Shard and splits rows
        # in an interleaved order that a contiguous row range cannot describe.
        row_shard = type(placement) is Shard and placement.dim == 0
        if not (row_shard or isinstance(placement, Replicate)):
            raise ValueError(
                f"Invalid sharding of '{name}' with placements {tuple(placements)}: MAC preconditions whole "
                "output rows, so a preconditioned weight must be sharded along dim 0 (Shard(0)) or replicated; "
                "use fully_shard's default placement for this parameter."
            )
    local_shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, placements  # type: ignore[attr-defined]
    )
    return offset[0], offset[0] + local_shape[0]
