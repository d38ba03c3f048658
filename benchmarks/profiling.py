"""Print where the time of one variant's step goes, from ``torch.profiler``.

Usage::

    python -m benchmarks.profiling mlp-2048 macfn-compiled            # optimizer step
    python -m benchmarks.profiling cnn macfn-compiled --train         # whole training step
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .models import build_workload, workload_names
from .variants import REFRESH_PERIOD, build_variant, variant_names


def profile_table(workload_name: str, variant_name: str, *, train: bool, rows: int = 20,
                  device: str = "cpu") -> str:
    """Return the profiler's table of one block of ``REFRESH_PERIOD`` steps, sorted by self CPU time."""
    workload = build_workload(workload_name, device=device)
    variant = build_variant(variant_name, workload)

    def step() -> None:
        if train:
            variant.train_step(workload.inputs, workload.targets)
        else:
            variant.optimizer_step()

    variant.prepare(workload.inputs, workload.targets)
    for _ in range(2 * REFRESH_PERIOD):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(REFRESH_PERIOD):
            step()
    table: str = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and print the profile."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=workload_names())
    parser.add_argument("variant", choices=variant_names())
    parser.add_argument("--train", action="store_true", help="profile the whole training step")
    parser.add_argument("--rows", type=int, default=20, help="operators to list (default: 20)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)
    print(profile_table(args.workload, args.variant, train=args.train, rows=args.rows, device=args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
