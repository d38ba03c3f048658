"""Task-independent parts of the demo: timing, progress bar, results table, CSV/JSON files, loss plot.

A task returns a :class:`TaskReport`, which contains one :class:`RunRecord` per optimizer and
model and the :class:`Column` list of its table. Everything here works from that report alone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch

import macfn


@dataclasses.dataclass(frozen=True)
class HistoryPoint:
    """The tracked loss of a run at one moment of its training.

    Attributes:
        seconds: Training wall-clock time so far, in seconds, evaluation excluded.
        steps: Optimizer steps taken so far.
        loss: The loss the task tracks (e.g. on the whole training split) at that moment.
    """

    seconds: float
    steps: int
    loss: float


@dataclasses.dataclass
class RunRecord:
    """One training run of a demo task.

    Attributes:
        optimizer: Display name of the optimizer, e.g. ``"MAC"``; it picks the line colour.
        model: Display name of the model; runs of the same model share a plot panel.
        history: The tracked loss over training, in time order, starting at step 0.
        metrics: Final figures keyed by :attr:`Column.key`, e.g. ``{"test_accuracy": 0.97}``.
        settings: The optimizer's hyperparameters in one line.
    """

    optimizer: str
    model: str
    history: list[HistoryPoint]
    metrics: dict[str, float]
    settings: str = ""


@dataclasses.dataclass(frozen=True)
class Column:
    """One metric column of the results table.

    Attributes:
        key: Key in :attr:`RunRecord.metrics`; also the CSV and JSON field name.
        header: Table heading, with the unit.
        spec: Format spec of the values, e.g. ``".4f"``.
    """

    key: str
    header: str
    spec: str = ".4g"


@dataclasses.dataclass
class TaskReport:
    """Everything a task returns for the table, the files and the plot.

    Attributes:
        task: Task name; the output files are ``{task}.png``, ``{task}.csv`` and ``{task}.json``.
        summary: One line on the data and the run settings, printed above the table.
        runs: The runs in table order.
        columns: Metric columns after the optimizer and model columns.
        history_label: y-axis label of the plot: what :attr:`RunRecord.history` measures, with its unit.
        title: Title of the plot.
        metadata: Settings and environment written to the JSON file (JSON-serialisable values).
    """

    task: str
    summary: str
    runs: list[RunRecord]
    columns: tuple[Column, ...]
    history_label: str
    title: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class ProgressBar(Protocol):
    """The part of ``tqdm.tqdm`` that the tasks use."""

    def update(self, n: int = 1) -> object: ...

    def set_description_str(self, desc: str) -> None: ...

    def set_postfix_str(self, s: str) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, description: str, *, quiet: bool, unit: str = "epoch") -> ProgressBar:
    """Open a tqdm progress bar on stderr, disabled with ``quiet`` or when stderr is not a terminal.

    A disabled bar accepts the same calls and prints nothing.
    """
    from tqdm import tqdm

    enabled = not quiet and sys.stderr.isatty()
    return cast(ProgressBar, tqdm(total=total, desc=description, unit=unit, disable=not enabled, file=sys.stderr))


class Stopwatch:
    """Wall-clock time summed over the timed sections only.

    On CUDA it synchronises the device at each start and stop, so queued kernels are
    counted in the section that launched them.

    Args:
        device: Device whose queued work each section waits for.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0
        self._started: float | None = None

    def __enter__(self) -> Stopwatch:
        self._synchronize()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._synchronize()
        assert self._started is not None, "Stopwatch exited without entering"
        self.elapsed += time.perf_counter() - self._started
        self._started = None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def format_value(value: float, spec: str) -> str:
    """Format a metric, writing non-finite values as ``nan`` or ``inf`` whatever the spec."""
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_table(runs: Sequence[RunRecord], columns: Sequence[Column]) -> str:
    """Lay the runs out as a plain-text table: optimizer, model, then one column per metric.

    Text columns are left-aligned and numbers right-aligned; a missing metric shows as ``-``.
    """
    headers = ["optimizer", "model", *(column.header for column in columns)]
    rows = [
        [
            run.optimizer,
            run.model,
            *(format_value(run.metrics[c.key], c.spec) if c.key in run.metrics else "-" for c in columns),
        ]
        for run in runs
    ]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        text = [cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(cells, widths))]
        return "  ".join(text).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def render_text(report: TaskReport) -> str:
    """Return the summary line, the table and one settings line per optimizer."""
    settings: dict[str, str] = {}
    for run in report.runs:
        if run.settings:
            settings.setdefault(run.optimizer, run.settings)
    notes = [f"  {name}: {text}" for name, text in settings.items()]
    parts = [report.summary, "", format_table(report.runs, report.columns)]
    if notes:
        parts += ["", "Settings:", *notes]
    return "\n".join(parts)


def write_csv(path: Path, runs: Sequence[RunRecord], columns: Sequence[Column]) -> None:
    """Write one CSV row per run with the optimizer, model, every metric and the settings."""
    fields = ["optimizer", "model", *(column.key for column in columns), "settings"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            writer.writerow(
                {"optimizer": run.optimizer, "model": run.model, **run.metrics, "settings": run.settings}
            )


def write_json(path: Path, report: TaskReport) -> None:
    """Write the metadata, the column headings and every run with its full history."""
    document = {
        "task": report.task,
        "summary": report.summary,
        "metadata": report.metadata,
        "columns": {column.key: column.header for column in report.columns},
        "history": {"seconds": "training wall-clock time (s)", "steps": "optimizer steps", "loss": report.history_label},
        "runs": [dataclasses.asdict(run) for run in report.runs],
    }
    # NOTE: json writes nan and inf as the non-standard NaN and Infinity, which Python's json
    # module reads back. A diverged run is kept in the file this way instead of being dropped.
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def plot_histories(path: Path, report: TaskReport) -> None:
    """Plot every run's history as a PNG: one column of panels per model.

    The top row plots the loss against training wall-clock time and the bottom row against
    optimizer steps. The y axis is logarithmic when every finite loss is positive, and each
    optimizer keeps its colour in every panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(run.model for run in report.runs))
    optimizers = list(dict.fromkeys(run.optimizer for run in report.runs))
    colours = {name: f"C{i % 10}" for i, name in enumerate(optimizers)}
    losses = [point.loss for run in report.runs for point in run.history if math.isfinite(point.loss)]
    log_scale = bool(losses) and min(losses) > 0

    figure = Figure(figsize=(5.0 * len(models), 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(models), squeeze=False)
    for column, model in enumerate(models):
        by_time, by_step = axes[0][column], axes[1][column]
        for run in (r for r in report.runs if r.model == model):
            style = {"marker": ".", "markersize": 4, "color": colours[run.optimizer], "label": run.optimizer}
            by_time.plot([p.seconds for p in run.history], [p.loss for p in run.history], **style)
            by_step.plot([p.steps for p in run.history], [p.loss for p in run.history], **style)
        by_time.set_title(model)
        by_time.set_xlabel("training wall-clock time (s)")
        by_step.set_xlabel("optimizer steps")
        for axis in (by_time, by_step):
            axis.set_ylabel(report.history_label)
            if log_scale:
                axis.set_yscale("log")
            axis.grid(True, alpha=0.3)
            axis.legend(title="optimizer")
    figure.suptitle(report.title)
    figure.savefig(path, dpi=120)


def save_report(report: TaskReport, out: Path) -> dict[str, Path]:
    """Write ``{task}.png``, ``{task}.csv`` and ``{task}.json`` into ``out``, creating it if needed.

    Returns:
        The written paths keyed by ``"png"``, ``"csv"`` and ``"json"``.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: out / f"{report.task}.{kind}" for kind in ("png", "csv", "json")}
    plot_histories(files["png"], report)
    write_csv(files["csv"], report.runs, report.columns)
    write_json(files["json"], report)
    return files


def run_environment(seed: int, device: torch.device) -> dict[str, Any]:
    """Return the seed, device and software versions that every task report records."""
    return {
        "seed": seed,
        "device": str(device),
        "torch": torch.__version__,
        "macfn": macfn.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
