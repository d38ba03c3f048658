"""The macfn demo: train small models with MAC and with torch.optim baselines, and compare them.

Run it as ``python -m macfn demo`` or call :func:`run_demo`. Each task lives in its own
module and is listed in :data:`TASKS`; a task trains its runs and returns a
:class:`TaskReport`, and this package writes the table, the CSV and JSON files and the
loss plot from it (see ``macfn/demo/_report.py``).

The task modules import scikit-learn, matplotlib and tqdm (the ``demo`` extra). They are
imported only when a task runs, so neither ``import macfn`` nor ``import macfn.demo`` needs
those packages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from ._options import DemoOptions, check_epochs, check_out_dir, check_seed, check_threads, resolve_device
from ._report import Column, HistoryPoint, RunRecord, TaskReport, render_text, save_report


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """One entry of the task registry.

    Attributes:
        name: Value of ``--task``.
        summary: One line for ``--help``.
        default_epochs: Epochs when ``--epochs`` is not given.
        run: Trains every run of the task; imports the task module on first use.
    """

    name: str
    summary: str
    default_epochs: int
    run: Callable[[DemoOptions], TaskReport]


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """Result of :func:`run_demo`.

    Attributes:
        report: The task's runs, table columns and metadata.
        text: The summary line, the table and the optimizer settings, as the CLI prints them.
        files: Written paths keyed by ``"png"``, ``"csv"`` and ``"json"``.
    """

    report: TaskReport
    text: str
    files: dict[str, Path]


def _run_digits(options: DemoOptions) -> TaskReport:
    from . import digits

    return digits.run(options)


def _run_text(options: DemoOptions) -> TaskReport:
    from . import text

    return text.run(options)


TASKS: dict[str, DemoTask] = {
    "digits": DemoTask(
        name="digits",
        summary="MLP and CNN on scikit-learn's 8x8 handwritten digits; MAC vs SGD vs AdamW",
        default_epochs=20,
        run=_run_digits,
    ),
    "text": DemoTask(
        name="text",
        summary="character-level GPT on CPython's pydoc topics; MAC vs MAC without attention weighting vs "
        "AdamW vs SGD (an epoch here is 25 steps)",
        default_epochs=8,
        run=_run_text,
    ),
}
"""The tasks of ``python -m macfn demo --task NAME``, keyed by name."""

DEFAULT_TASK = "digits"
DEFAULT_OUT = "macfn-demo"
DEFAULT_THREADS = 1
"""Intra-op CPU threads while training. On a
2-core machine shared with other processes, two threads made the digits runs 3 to 36 times
slower than one (torch 2.13, one measurement). The likely cause is that each operation waited
for a worker thread that the other processes had pre-empted."""


def make_options(
    task: str = DEFAULT_TASK,
    *,
    epochs: int | None = None,
    out: str | Path = DEFAULT_OUT,
    device: str = "auto",
    seed: int = 0,
    quiet: bool = False,
    threads: int = DEFAULT_THREADS,
) -> DemoOptions:
    """Check the arguments of :func:`run_demo` and return them as :class:`DemoOptions`.

    Raises:
        ValueError: An unknown task, invalid epochs or seed, an ``out`` that is an existing
            file, or ``device="cuda"`` without a usable GPU.
    """
    entry = TASKS.get(task)
    if entry is None:
        raise ValueError(f"Invalid task={task!r}: expected one of {', '.join(sorted(TASKS))}.")
    return DemoOptions(
        task=task,
        epochs=entry.default_epochs if epochs is None else check_epochs(epochs),
        out=check_out_dir(out),
        device=resolve_device(device),
        seed=check_seed(seed),
        quiet=bool(quiet),
        threads=check_threads(threads),
    )


def run_task(options: DemoOptions) -> DemoResult:
    """Train the runs of ``options.task`` and write their plot, CSV and JSON files.

    PyTorch's intra-op thread count is ``options.threads`` while the task trains and is
    restored afterwards.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        report = TASKS[options.task].run(options)
    finally:
        torch.set_num_threads(previous_threads)
    files = save_report(report, options.out)
    return DemoResult(report=report, text=render_text(report), files=files)


def run_demo(
    task: str = DEFAULT_TASK,
    *,
    epochs: int | None = None,
    out: str | Path = DEFAULT_OUT,
    device: str = "auto",
    seed: int = 0,
    quiet: bool = False,
    threads: int = DEFAULT_THREADS,
) -> DemoResult:
    """Run one demo task and write its plot, CSV and JSON files.

    Every argument is checked before any training starts.

    Args:
        task: A key of :data:`TASKS`.
        epochs: Passes over the training data per run, >= 1; None takes the task's default.
        out: Folder for ``{task}.png``, ``{task}.csv`` and ``{task}.json``; created if missing.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: Seed of the data split, the initial weights and the batch order, in ``[0, 2**32 - 1]``.
        quiet: Hide the progress bar. It is also hidden when stderr is not a terminal.
        threads: Intra-op CPU threads while training, >= 1.

    Returns:
        The report, its text as the CLI prints it, and the written file paths.

    Raises:
        ValueError: An unknown task, invalid epochs or seed, an ``out`` that is an existing
            file, or ``device="cuda"`` without a usable GPU.
    """
    options = make_options(task, epochs=epochs, out=out, device=device, seed=seed, quiet=quiet, threads=threads)
    return run_task(options)


__all__ = [
    "DEFAULT_OUT",
    "DEFAULT_THREADS",
    "DEFAULT_TASK",
    "TASKS",
    "Column",
    "DemoOptions",
    "DemoResult",
    "DemoTask",
    "HistoryPoint",
    "RunRecord",
    "TaskReport",
    "make_options",
    "run_demo",
    "run_task",
]
