"""Turn the results of ``python -m benchmarks.report`` into ``docs/benchmarks.md`` and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE_DIR = "img"
MB = 1024 * 1024

TARGETS = (
    # (label, section, workload, variant, comparison, limit)
    ("macfn compiled optimizer step / SGD, MLP W=2048", "optimizer_step", "mlp-2048", "macfn-compiled", "<=", 1.3),
    ("macfn compiled optimizer step / SGD, small GPT", "optimizer_step", "gpt", "macfn-compiled", "<=", 1.3),
    ("dense-inverse MAC optimizer step / SGD, MLP W=2048", "optimizer_step", "mlp-2048", "dense-mac", ">=", 20.0),
    ("macfn whole training step / SGD, MLP W=2048", "train_step", "mlp-2048", "macfn-compiled", "<=", 1.10),
    ("macfn whole training step / SGD, CNN", "train_step", "cnn", "macfn-compiled", "<=", 1.10),
)

VARIANT_NOTES = {
    "sgd": "`torch.optim.SGD(momentum=0.9, weight_decay, foreach=True)`, eager; the baseline of every ratio",
    "sgd-compiled": "the same SGD with `torch.compile(model)` and `torch.compile(optimizer.step)`, 0-dim tensor lr",
    "adamw": "`torch.optim.AdamW(foreach=True)`, eager",
    "macfn-eager": "`macfn.grad_and_stats` + `macfn.step`, eager",
    "macfn-compiled": "`torch.compile(macfn.step, fullgraph=True)` as the optimizer step; the whole training "
                      "step (gradients, statistics, update) as one `torch.compile(fullgraph=True)` graph",
    "macfn-compiled-nocheck": "`macfn-compiled` with `nonfinite=\"ignore\"` (no finite check, no selection of "
                              "the old values)",
    "macfn-compiled-plain": "`macfn-compiled` with `stats=None` on every step (the steps between two statistics "
                            "refreshes): no running-mean update, fewer inputs and outputs",
    "macfn-optim": "`macfn.optim.MAC(model, ...)`, the torch.optim adapter, `compile=False`",
    "macfn-optim-compiled": "`macfn.optim.MAC(model, compile=True, ...)`, 0-dim tensor lr",
    "dense-mac": "MAC with the explicit d x d matrix `I - abar abar^T / (rho + |abar|^2)` rebuilt and multiplied "
                 "into every gradient each step (the authors' formulation), then `torch.optim.SGD`",
    "kfac": "curvlinops-for-pytorch `KFACLinearOperator` (Monte-Carlo Fisher, one sample) and "
            "`KFACInverseLinearOperator` (damped Cholesky inverse), refreshed every 10 steps, then `torch.optim.SGD`",
}


def _ratio(results: dict[str, Any], section: str, workload: str, variant: str) -> float | None:
    entry = results.get("workloads", {}).get(workload, {}).get(section, {}).get("summary", {}).get(variant)
    return None if entry is None else float(entry["ratio"])


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _variant_order(results: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for entry in results.get("workloads", {}).values():
        for name in entry["variants"]:
            if name not in seen:
                seen.append(name)
    return [name for name in VARIANT_NOTES if name in seen]


def targets_table(results: dict[str, Any]) -> str:
    """Return the table of targets with the measured ratio and whether each one is met."""
    rows = []
    for label, section, workload, variant, comparison, limit in TARGETS:
        value = _ratio(results, section, workload, variant)
        if value is None:
            verdict = "not measured"
        else:
            met = value <= limit if comparison == "<=" else value >= limit
            verdict = "met" if met else "**missed**"
        rows.append([label, f"{comparison} {limit:g}x", _fmt_ratio(value), verdict])
    state_rows = state_target_rows(results)
    return _table(["target", "limit", "measured", "verdict"], rows + state_rows)


def state_target_rows(results: dict[str, Any]) -> list[list[str]]:
    """Return one row per workload for the target: macfn state <= SGD state + 1%."""
    rows = []
    for workload, entry in results.get("workloads", {}).items():
        states = entry.get("state_bytes", {})
        if "sgd" not in states or "macfn-compiled" not in states:
            continue
        excess = states["macfn-compiled"] / states["sgd"] - 1.0
        rows.append([f"macfn optimizer state / SGD's, {workload}", "<= 1.01x", f"{1 + excess:.4f}x",
                     "met" if excess <= 0.01 else "**missed**"])
    return rows


def timing_table(results: dict[str, Any], section: str) -> str:
    """Return median milliseconds per step (and the ratio to SGD) for every workload and variant."""
    variants = _variant_order(results)
    rows = []
    for workload, entry in results.get("workloads", {}).items():
        summary = entry.get(section, {}).get("summary")
        if not summary:
            continue
        repeats = summary.get("sgd", {}).get("repeats")
        row = [workload if repeats is None else f"{workload} ({repeats:.0f})"]
        for variant in variants:
            item = summary.get(variant)
            if item is None:
                if variant in entry.get("skipped", {}):
                    row.append("skipped")
                else:
                    row.append("failed" if variant in entry.get("errors", {}) else "-")
            else:
                row.append(f"{_fmt_ms(item['median_s'])} ({_fmt_ratio(item['ratio'])})")
        rows.append(row)
    return _table(["workload", *variants], rows)


def faults_table(results: dict[str, Any]) -> str:
    """Return the median minor page faults per optimizer and training step; "" when none were counted."""
    variants = _variant_order(results)
    rows = []
    for workload, entry in results.get("workloads", {}).items():
        for section, label in (("optimizer_step", "optimizer step"), ("train_step", "training step")):
            faults = entry.get(section, {}).get("page_faults")
            if not faults:
                continue
            rows.append([workload, label, *(f"{faults[v]:.0f}" if v in faults else "-" for v in variants)])
    return _table(["workload", "step", *variants], rows) if rows else ""


def memory_table(results: dict[str, Any]) -> str:
    """Return optimizer state and peak step memory in MiB, with ratios to SGD."""
    variants = _variant_order(results)
    rows = []
    for workload, entry in results.get("workloads", {}).items():
        states = entry.get("state_bytes", {})
        peaks = entry.get("peak_step_bytes", {})
        row = [workload, f"{entry['parameter_bytes'] / MB:.2f}"]
        for variant in variants:
            if variant not in states:
                row.append("-")
                continue
            cell = f"{states[variant] / MB:.2f}"
            if states.get("sgd"):
                cell += f" ({_fmt_ratio(states[variant] / states['sgd'])})"
            if variant in peaks:
                cell += f" / {peaks[variant] / MB:.1f}"
            row.append(cell)
        rows.append(row)
    return _table(["workload", "params MiB", *variants], rows)


def slopes(results: dict[str, Any], key: str, minimum_width: int = 1024) -> dict[str, float]:
    """Return the least-squares slope of log(value) against log(W) over MLP widths >= ``minimum_width``."""
    series = _mlp_series(results, key)
    fitted = {}
    for variant, points in series.items():
        points = [(w, v) for w, v in points if w >= minimum_width and v > 0]
        if len(points) < 2:
            continue
        xs = [math.log(w) for w, _ in points]
        ys = [math.log(v) for _, v in points]
        mean_x = sum(xs) / len(xs)
        mean_y = sum(ys) / len(ys)
        fitted[variant] = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return fitted


def _mlp_series(results: dict[str, Any], key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for workload, entry in results.get("workloads", {}).items():
        if not workload.startswith("mlp-"):
            continue
        width = int(workload.removeprefix("mlp-"))
        if key == "state_bytes":
            values = {n: float(b) for n, b in entry.get("state_bytes", {}).items()}
        else:
            values = {n: s["median_s"] for n, s in entry.get(key, {}).get("summary", {}).items()}
        for variant, value in values.items():
            series.setdefault(variant, []).append((width, value))
    return {variant: sorted(points) for variant, points in series.items()}


def stats_table(results: dict[str, Any]) -> str:
    """Return training-step times with and without statistics, eager and compiled."""
    rows = []
    for workload, entry in results.get("stats_cost", {}).items():
        summary = entry["summary"]
        for mode in ("eager", "compiled"):
            plain = summary.get(f"plain-{mode}")
            stats = summary.get(f"stats-{mode}")
            if plain is None or stats is None:
                continue
            undeclared = summary.get(f"stats-undeclared-{mode}")
            rows.append([
                workload, mode, _fmt_ms(plain["median_s"]), _fmt_ms(stats["median_s"]),
                f"{stats['median_s'] / plain['median_s'] - 1:+.1%}",
                "-" if undeclared is None else f"{undeclared['median_s'] / plain['median_s'] - 1:+.1%}",
                _fmt_ms(summary["sgd"]["median_s"]),
            ])
    return _table(["workload", "mode", "plain step ms", "statistics step ms", "statistics cost",
                   "cost without attention declarations", "SGD step ms"], rows)


def compile_table(results: dict[str, Any]) -> str:
    """Return first-call times of the compiled variants and the recompile counts."""
    rows = []
    for workload, entry in results.get("workloads", {}).items():
        first_step = entry.get("optimizer_step", {}).get("first_call_s", {})
        first_train = entry.get("train_step", {}).get("first_call_s", {})
        for variant in ("macfn-compiled", "macfn-compiled-nocheck", "macfn-optim-compiled", "sgd-compiled"):
            if variant in first_step:
                train = first_train.get(variant)
                rows.append([workload, variant, f"{first_step[variant]:.1f}",
                             "-" if train is None else f"{train:.1f}"])
    table = _table(["workload", "variant", "first optimizer step s", "first whole training step s"], rows)
    recompile_rows = []
    for workload, entry in results.get("recompiles", {}).items():
        for variant, item in entry.items():
            recompile_rows.append([workload, variant, f"{item['first_step_s']:.1f}",
                                   str(item["graphs_after_first_step"]), str(item["recompiles"]),
                                   str(item["steps"])])
    recompiles = _table(["workload", "variant", "first step s (fresh compile)", "graphs after step 1",
                         "recompiles in later steps", "steps"], recompile_rows)
    return table + "\n\n" + recompiles


def anatomy_table(results: dict[str, Any]) -> str:
    """Return the probe times of ``benchmarks.anatomy`` with their ratios to SGD."""
    entry = results.get("anatomy")
    if not entry:
        return "Not measured in this run (`python -m benchmarks.report --sections anatomy --merge` adds it)."
    rows = [[name, _fmt_ms(item["median_s"]), _fmt_ratio(item["ratio"])] for name, item in entry["summary"].items()]
    return _table([f"update at MLP W={entry['width']}", "median ms", "ratio to SGD"], rows)


def sections_table(results: dict[str, Any]) -> str:
    """Return when each section ran and the machine load around it."""
    rows = [[name, item["started"], str(item["load_average_at_start"]), str(item["load_average_at_end"]),
             f"{item['wall_clock_s'] / 60:.1f}"] for name, item in results.get("sections", {}).items()]
    if not rows:
        return ""
    return _table(["section", "started", "load average at start (1, 5, 15 min)", "at end", "minutes"], rows)


def tasks_table(results: dict[str, Any]) -> str:
    """Return median time and steps to the loss target per task and optimizer."""
    rows = []
    for task, entry in results.get("time_to_target", {}).items():
        for variant, item in entry["variants"].items():
            summary = item["summary"]
            seconds = "-" if summary["median_seconds"] is None else f"{summary['median_seconds']:.2f}"
            steps = "-" if summary["median_steps"] is None else f"{summary['median_steps']:.0f}"
            per_seed = ", ".join(
                f"{run['seconds']:.2f}" if run["reached"] else "not reached" for run in item["runs"]
            )
            rows.append([task, f"{entry['target']:g}", variant, f"{entry['lrs'][variant]:g}", seconds, steps,
                         f"{summary['reached']}/{summary['seeds']}", per_seed])
    return _table(["task", "loss target", "optimizer", "lr", "median s", "median steps", "reached",
                   "seconds per seed"], rows)


def summary_table(results: dict[str, Any]) -> str:
    """Return a short plain-text table of every timed ratio, for the terminal."""
    lines = [f"device {results['environment'].get('device')} {results['environment'].get('gpu', '')} "
             f"driver {results['environment'].get('driver', '-')} torch {results['environment']['torch']}"]
    for workload, entry in results.get("workloads", {}).items():
        for section in ("optimizer_step", "train_step"):
            summary = entry.get(section, {}).get("summary")
            if not summary:
                continue
            cells = "  ".join(f"{n} {_fmt_ms(s['median_s'])}ms {_fmt_ratio(s['ratio'])}" for n, s in summary.items())
            lines.append(f"{workload:9s} {section:15s} {cells}")
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the scaling and time-to-target plots; return their paths relative to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    if results.get("workloads"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key, label in ((axes[0], "optimizer_step", "optimizer step (s)"),
                               (axes[1], "state_bytes", "optimizer state (bytes)")):
            fitted = slopes(results, key)
            for variant, points in _mlp_series(results, key).items():
                if len(points) < 3:
                    continue
                widths, values = zip(*points)
                slope = fitted.get(variant)
                name = variant if slope is None else f"{variant} (slope {slope:.2f})"
                ax.loglog(widths, values, marker="o", label=name)
            ax.set_xlabel("MLP width W (784-W-W-10, batch 128)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Scaling with width; slopes fitted over W >= 1024")
        fig.tight_layout()
        path = f"{IMAGE_DIR}/benchmarks-scaling.png"
        fig.savefig(out_dir / path, dpi=110)
        plt.close(fig)
        written.append(path)
    task_results = results.get("time_to_target", {})
    if task_results:
        fig, axes = plt.subplots(1, len(task_results), figsize=(5 * len(task_results), 4), squeeze=False)
        for ax, (task, entry) in zip(axes[0], task_results.items()):
            for variant, item in entry["variants"].items():
                history = item["runs"][0]["history"]
                finite = [(s, loss) for s, _, loss in history if loss is not None and math.isfinite(loss)]
                if finite:
                    ax.plot(*zip(*finite), label=variant)
            ax.axhline(entry["target"], color="black", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("training seconds (seed 0)")
            ax.set_ylabel("training loss")
            ax.set_title(task)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{IMAGE_DIR}/benchmarks-time-to-target.png"
        fig.savefig(out_dir / path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _task_threads(results: dict[str, Any]) -> str:
    threads = sorted({str(entry.get("threads", "?")) for entry in results.get("time_to_target", {}).values()})
    return f"{', '.join(threads)} thread" + ("" if threads == ["1"] else "s")


def environment_table(results: dict[str, Any]) -> str:
    """Return the environment of the run as a two-column table."""
    env = results["environment"]
    keys = ("cpu", "cpu_count", "torch_threads", "torch", "python", "platform", "device", "macfn_commit",
            "load_average_at_start", "load_average_at_end")
    rows = [[key, str(env[key])] for key in keys if key in env]
    rows.append(["started", results.get("started", "-")])
    rows.append(["wall clock of the run", f"{results.get('wall_clock_s', 0) / 60:.1f} min"])
    return _table(["", ""], rows)


NO_MMAP_FILE = "benchmarks-no-mmap.json"
NO_MMAP_COMMAND = (
    "GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4000000000 python -m benchmarks.report "
    f"--sections steps --workloads mlp-1024,mlp-2048,mlp-4096 --json docs/{NO_MMAP_FILE}"
)


def no_mmap_section(no_mmap: dict[str, Any]) -> str:
    """Return the slopes and W=4096 ratios of a steps run whose heap kept freed memory."""
    step_slopes = slopes(no_mmap, "optimizer_step")
    widest = no_mmap.get("workloads", {}).get("mlp-4096", {}).get("optimizer_step", {}).get("summary", {})
    rows = [[v, f"{step_slopes[v]:.2f}", _fmt_ratio(widest[v]["ratio"]) if v in widest else "-"]
            for v in step_slopes]
    environment = no_mmap.get("environment", {})
    return "\n".join([
        "The same widths measured in a separate run whose heap keeps freed memory for reuse, so that no "
        f"step faults in fresh pages (`{NO_MMAP_COMMAND}`, macfn at {environment.get('macfn_commit', 'unknown')}, "
        f"{environment.get('libc', 'unknown libc')}):",
        "",
        _table(["variant", "slope of step time, no page faults", "ratio to SGD at W=4096, no page faults"], rows),
    ])


def write_page(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``benchmarks.md`` and its plots into ``out_dir``; return the page's path."""
    plots = write_plots(results, out_dir)
    predictions = (HERE / "predictions.md").read_text(encoding="utf-8")
    observations_path = HERE / "observations.md"
    observations = observations_path.read_text(encoding="utf-8") if observations_path.exists() else ""
    no_mmap_path = out_dir / NO_MMAP_FILE
    no_mmap = json.loads(no_mmap_path.read_text(encoding="utf-8")) if no_mmap_path.exists() else None
    page = render_page(results, plots, predictions, observations, no_mmap)
    path = out_dir / "benchmarks.md"
    path.write_text(page, encoding="utf-8")
    return path


def render_page(results: dict[str, Any], plots: Sequence[str], predictions: str, observations: str,
                no_mmap: dict[str, Any] | None = None) -> str:
    """Return the Markdown of the benchmark page."""
    step_slopes = slopes(results, "optimizer_step")
    state_slopes = slopes(results, "state_bytes")
    slope_rows = [[v, f"{step_slopes[v]:.2f}", f"{state_slopes.get(v, float('nan')):.2f}"] for v in step_slopes]
    skipped = [f"- {workload}, {variant}: {reason}" for workload, entry in results.get("workloads", {}).items()
               for variant, reason in entry.get("skipped", {}).items()]
    skipped += [f"- {workload}, {variant} failed: `{message}`"
                for workload, entry in results.get("workloads", {}).items()
                for variant, message in entry.get("errors", {}).items()]
    variant_rows = [[f"`{name}`", note] for name, note in VARIANT_NOTES.items()]
    parts = [
        "# Benchmarks: MAC at the cost of SGD",
        "",
        "MAC preconditions every nn.Linear and nn.Conv2d gradient with a rank-one correction, "
        "`Ghat = G - (G abar) abar^T / (rho + |abar|^2)`, so its update should cost about what "
        "momentum SGD's costs. This page measures that claim side by side against "
        "`torch.optim.SGD`, `torch.optim.AdamW`, MAC with the explicit d x d matrix, and KFAC.",
        "",
        f"Produced by `{results.get('command', 'python -m benchmarks.report')}` "
        "(the results, every sample included, are in [benchmarks.json](benchmarks.json)). "
        "Re-render this page from that file with `python -m benchmarks.report --render-only`. "
        "`python -m benchmarks.report --plan quick` (about 3 minutes on 2 cores) times the optimizer and "
        "training steps of fewer workloads and variants with 3 repeats, writes docs/benchmarks-quick.json "
        "and prints its table, leaving this page alone.",
        "",
        "## Machine",
        "",
        environment_table(results),
        "",
        sections_table(results),
        "",
        "No GPU was available, so `benchmarks/gpu.sh` (the same suite on CUDA, one table) has not been run.",
        "",
        "## How to read the numbers",
        "",
        "- Every time is the median over repeats of one block of 10 consecutive steps divided by 10 "
        "(10 is KFAC's refresh period, so KFAC's factor computation and inversion are amortised in its "
        "per-step time). The variants of one workload run interleaved, block by block, in an order "
        "that rotates every repeat, so a change in machine load reaches all of them. The workloads "
        "that decide a target (MLP W=2048, CNN, GPT) get more repeats than the others, because their "
        "block times spread the most. The number after each workload in the timing tables is its number of "
        "repeats.",
        "- A ratio is the variant's median over SGD's median from the same run. A paired ratio is the "
        "median over repeats of the variant's block time over SGD's block time in the same repeat.",
        "- The report's own two threads keep the load average near 2 on 2 cores; a load well above that "
        "means another job shared the machine.",
        "- **Optimizer step**: the update alone, applied again and again to gradients (and mean activations) "
        "computed once; for KFAC it includes the curvature refresh every 10 steps (one extra forward and "
        "backward pass with sampled labels, then the damped Cholesky inverses).",
        "- **Training step**: forward, backward, statistics and update on a fixed batch.",
        "- **State**: bytes of every tensor the optimizer keeps between steps, summed exactly from the "
        "tensors' storages (momentum buffers, running mean activations and counters, dense matrices, "
        "Kronecker factors and their inverses). **Peak**: the largest total of torch CPU allocations during "
        "one training step above what was live before it, from `torch.profiler` with `profile_memory=True`; "
        "it counts activations, gradients and temporaries, not Python objects or compiler memory.",
        "- Batches: MLP 128 x 784; CNN and ViT 32 x 3 x 32 x 32; GPT 32 sequences of 64 characters.",
        "",
        _table(["variant", "what runs"], variant_rows),
        "",
        "## Targets",
        "",
        targets_table(results),
        "",
        "## Optimizer step: median ms per step (ratio to SGD)",
        "",
        timing_table(results, "optimizer_step"),
        "",
        "## Training step: median ms per step (ratio to SGD)",
        "",
        timing_table(results, "train_step"),
        "",
        "## Where the time of the compiled update goes",
        "",
        "`python -m benchmarks.anatomy` times hand-written functional MAC updates of the MLP that differ from "
        "the fastest one in one choice each (see the module's docstring), next to macfn's compiled step and SGD. "
        "The gap between `minimal` and `macfn-compiled` is what the formulation of the core costs. This is a "
        "separate run with eight tasks interleaved instead of eleven variants, so its times differ from the "
        "optimizer-step table's.",
        "",
        anatomy_table(results),
        "",
        "## Scaling with width",
        "",
    ]
    if plots and plots[0].endswith("scaling.png"):
        parts += [f"![optimizer-step time and state memory against W]({plots[0]})", ""]
    parts += [
        "Log-log slopes over the widths from 1024 up that each variant ran (1024 to 4096; KFAC 1024 to "
        "2048, because it skips 4096).",
        "",
        _table(["variant", "slope of step time", "slope of state bytes"], slope_rows),
        "",
    ]
    if no_mmap is not None:
        parts += [no_mmap_section(no_mmap), ""]
    parts += [
        "## Memory: state MiB (ratio to SGD) / peak MiB of a training step",
        "",
        memory_table(results),
        "",
    ]
    faults = faults_table(results)
    if faults:
        libc = results.get("environment", {}).get("libc")
        libc_note = f" ({libc} on this machine)" if libc else ""
        parts += [
            "Minor page faults per step (median over repeats), counted by `getrusage`. A fault is the first "
            "touch of a page the process has not used before. With glibc"
            f"{libc_note}, a buffer larger than "
            "32 MiB comes fresh from `mmap` on every allocation and goes back to the system when freed. A step that "
            "allocates such buffers therefore faults in every one of their 4 KiB pages, every step. A functional step "
            "returns new parameters and momentum buffers, and `torch.optim.SGD` with weight decay allocates "
            "one new tensor per parameter for the decayed gradient. In-place updates allocate none.",
            "",
            faults,
            "",
        ]
    parts += [
        "## Statistics capture",
        "",
        "A plain step computes the gradients with `torch.func.grad_and_value` and calls `macfn.step` with "
        "`stats=None`; a statistics step uses `macfn.grad_and_stats`, which also records every layer's mean "
        "activation (and, for the declared attention blocks, the attention-weighted mean of the value rows).",
        "",
        stats_table(results),
        "",
        "## Compilation",
        "",
        "The first call compiles. Recompiles are counted with `torch._dynamo.utils.counters` (new compiled "
        "graphs after the first step) over 100 training steps whose learning rate follows a cosine schedule: "
        "`CosineAnnealingLR` for the torch.optim variants, a 0-dim tensor filled in place for the functional "
        "step.",
        "",
        compile_table(results),
        "",
        "## Time to target",
        "",
        "Wall-clock training time until the training loss (evaluated every few steps on the whole digits "
        "training set, or on 128 fixed windows of the text; evaluations untimed) first reaches the target. "
        "The clock starts after the first step, so compilation is not in it. Medians over seeds; a variant "
        "that missed the target on any seed has no median. "
        f"These runs use {_task_threads(results)} (`torch.set_num_threads`), as `python -m macfn demo` does: "
        "the models are so small that a second thread mostly adds synchronisation. "
        "SGD and every MAC variant use the authors' settings (lr 0.1, momentum 0.9); AdamW uses lr 1e-3 "
        "(torch's default) on digits and 3e-3 on text; KFAC's lr 0.01 and damping 0.1 were picked from a "
        "3 x 3 grid on seed 0 of digits-mlp, where damping 0.01 diverged. Nothing else was tuned.",
        "",
        tasks_table(results),
        "",
    ]
    if any(p.endswith("time-to-target.png") for p in plots):
        parts += [f"![training loss against time]({[p for p in plots if p.endswith('time-to-target.png')][0]})", ""]
    if skipped:
        parts += ["## Not measured", "", *skipped, ""]
    parts += [predictions.strip(), ""]
    if observations:
        parts += [observations.strip(), ""]
    return "\n".join(parts)
