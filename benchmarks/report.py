"""Run the benchmark suite and, for the full CPU plan, write ``docs/benchmarks.md`` with its tables and plots.

Usage::

    python -m benchmarks.report                 # full CPU run, about 20 minutes on 2 cores
    python -m benchmarks.report --plan quick    # a few minutes, fewer workloads and repeats; writes
                                                # docs/benchmarks-quick.json and prints its table
    python -m benchmarks.report --device cuda   # the GPU run; see benchmarks/gpu.sh

A CPU run writes ``docs/benchmarks.json`` (every sample and the environment),
``docs/benchmarks.md`` and the plots in ``docs/img/``. A CUDA run writes
``docs/benchmarks-cuda.json`` and prints its table, leaving the CPU page alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import macfn

from . import anatomy, render, tasks
from .models import Workload, build_workload
from .timing import environment, load_average, peak_step_bytes, summarize, time_interleaved
from .variants import (
    REFRESH_PERIOD,
    FunctionalMAC,
    Variant,
    build_variant,
    cosine_lr,
    macfn_optim_available,
    parameter_bytes,
    state_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "sgd"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The workloads, repeats and tasks of one run.

    Attributes:
        name: Plan name.
        step_workloads: Workloads whose optimizer step alone is timed.
        train_workloads: Workloads whose whole training step is timed too (a subset).
        target_workloads: Workloads that also time the diagnostic variants (compiled SGD,
            macfn without the NaN check, the compiled adapter).
        repeats: Timed blocks per variant; heavy workloads use ``heavy_repeats`` and target
            workloads ``target_repeats``.
        target_repeats: Timed blocks per variant on ``target_workloads``, whose ratios decide
            the targets; their block times spread the most (up to 2x between blocks on the GPT).
        heavy_repeats: Timed blocks per variant on ``heavy_workloads``.
        heavy_workloads: Workloads where the dense and KFAC variants take seconds per step.
        skip: ``{workload: {variant: reason}}`` pairs that are not run.
        stats_workloads: Workloads for the statistics-capture cost, eager.
        stats_compiled_workloads: Workloads for the statistics-capture cost, compiled too.
        anatomy_width: MLP width of the probes that take the compiled update apart.
        recompile_workloads: Workloads, in their tiny size, for the recompile count under a
            cosine schedule; the count depends on the graph's structure, not on its sizes.
        tasks: Time-to-target tasks.
        task_variants: Variants in the time-to-target runs.
        seeds: Seeds per time-to-target run.
        task_threads: ``torch.set_num_threads`` for the time-to-target runs. Their models are so
            small that a second thread mostly adds synchronisation, as in ``python -m macfn demo``.
    """

    name: str
    step_workloads: tuple[str, ...]
    train_workloads: tuple[str, ...]
    target_workloads: tuple[str, ...]
    repeats: int
    target_repeats: int
    heavy_repeats: int
    heavy_workloads: tuple[str, ...]
    skip: dict[str, dict[str, str]]
    stats_workloads: tuple[str, ...]
    stats_compiled_workloads: tuple[str, ...]
    anatomy_width: int
    recompile_workloads: tuple[str, ...]
    tasks: tuple[str, ...]
    task_variants: tuple[str, ...]
    seeds: int
    task_threads: int


MAIN_VARIANTS = ("sgd", "adamw", "macfn-eager", "macfn-compiled", "macfn-optim", "dense-mac", "kfac")
TARGET_EXTRAS = ("sgd-compiled", "macfn-compiled-nocheck", "macfn-compiled-plain", "macfn-optim-compiled")
TASK_VARIANTS = ("sgd", "adamw", "macfn-eager", "macfn-optim", "dense-mac", "kfac")

PLANS = {
    "full": Plan(
        name="full",
        step_workloads=("mlp-256", "mlp-512", "mlp-1024", "mlp-2048", "mlp-4096", "cnn", "vit", "gpt"),
        train_workloads=("mlp-2048", "cnn", "vit", "gpt"),
        target_workloads=("mlp-2048", "cnn", "gpt"),
        repeats=5,
        target_repeats=11,
        heavy_repeats=4,
        heavy_workloads=("mlp-4096",),
        skip={"mlp-4096": {"kfac": "each step multiplies the 4096 x 4097 gradient by two inverse factors "
                                    "of about 4096 x 4096 (an estimated 2 to 3 s per step on 2 cores), which "
                                    "does not fit the run's 20-minute budget"}},
        stats_workloads=("mlp-2048", "cnn", "vit", "gpt"),
        stats_compiled_workloads=("mlp-2048", "cnn"),
        anatomy_width=2048,
        recompile_workloads=("mlp-256", "gpt"),
        tasks=("digits-mlp", "digits-cnn", "text-gpt"),
        task_variants=TASK_VARIANTS,
        seeds=3,
        task_threads=1,
    ),
    "quick": Plan(
        name="quick",
        step_workloads=("mlp-256", "mlp-1024", "mlp-2048", "gpt"),
        train_workloads=("mlp-2048", "gpt"),
        target_workloads=("mlp-2048",),
        repeats=3,
        target_repeats=3,
        heavy_repeats=2,
        heavy_workloads=(),
        skip={},
        stats_workloads=("mlp-2048",),
        stats_compiled_workloads=("mlp-2048",),
        anatomy_width=2048,
        recompile_workloads=("mlp-256",),
        tasks=("digits-mlp",),
        task_variants=("sgd", "macfn-eager", "dense-mac"),
        seeds=3,
        task_threads=1,
    ),
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()[:1]}] {message}", file=sys.stderr, flush=True)


def _available(names: Sequence[str]) -> list[str]:
    if macfn_optim_available():
        return list(names)
    return [name for name in names if not name.startswith("macfn-optim")]


def _variants_for(plan: Plan, workload: str) -> list[str]:
    names = list(MAIN_VARIANTS)
    if workload in plan.target_workloads:
        names += TARGET_EXTRAS
    skipped = plan.skip.get(workload, {})
    return [name for name in _available(names) if name not in skipped]


def _timed_first_call(call: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _build(names: Sequence[str], workload: Workload, errors: dict[str, str],
           first_call: Callable[[Variant], object], device: torch.device) -> tuple[dict[str, Variant], dict[str, float]]:
    """Build every variant and time its first call; record a variant that raises in ``errors``."""
    built: dict[str, Variant] = {}
    first_call_s: dict[str, float] = {}
    for variant_name in names:
        _log(f"{workload.name}: building {variant_name}")
        try:
            variant = build_variant(variant_name, workload)
            first_call_s[variant_name] = _timed_first_call(lambda: first_call(variant), device)
        except Exception as error:
            errors[variant_name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            _log(f"{workload.name}: {variant_name} failed: {errors[variant_name]}")
            continue
        built[variant_name] = variant
    return built, first_call_s


def measure_workload(plan: Plan, name: str, device: torch.device) -> dict[str, Any]:
    """Time the optimizer step (and, for training workloads, the training step) of every variant.

    The training step is timed on freshly built variants, because repeating one fixed gradient
    for the optimizer-step timing moves the weights far from anything training would reach.
    """
    torch._dynamo.reset()
    workload = build_workload(name, device=device)
    names = _variants_for(plan, name)
    heavy = name in plan.heavy_workloads
    if heavy:
        repeats = plan.heavy_repeats
    elif name in plan.target_workloads:
        repeats = plan.target_repeats
    else:
        repeats = plan.repeats
    warmup = 0 if heavy else 1
    errors: dict[str, str] = {}

    def prepare_and_step(variant: Variant) -> None:
        variant.prepare(workload.inputs, workload.targets)
        variant.optimizer_step()

    built, first_step_s = _build(names, workload, errors, prepare_and_step, device)
    _log(f"{name}: timing the optimizer step of {len(built)} variants, {repeats} repeats")
    step_faults: dict[str, list[float]] = {}
    step_samples = time_interleaved({n: v.optimizer_step for n, v in built.items()}, repeats=repeats,
                                    block=REFRESH_PERIOD, warmup_blocks=warmup, device=device, errors=errors,
                                    faults=step_faults)
    result: dict[str, Any] = {
        "variants": names,
        "skipped": plan.skip.get(name, {}),
        "parameter_bytes": parameter_bytes(workload),
        "optimizer_step": {"summary": summarize(step_samples, BASELINE), "samples": step_samples,
                           "first_call_s": first_step_s, "page_faults": _median_each(step_faults)},
        "state_bytes": {n: state_bytes(v) for n, v in built.items()},
        "errors": errors,
    }
    del built
    if name in plan.train_workloads:
        def train(variant: Variant) -> None:
            variant.train_step(workload.inputs, workload.targets)

        trained, first_train_s = _build(names, workload, errors, train, device)
        _log(f"{name}: timing the training step of {len(trained)} variants, {repeats} repeats")
        calls = {n: (lambda v=v: train(v)) for n, v in trained.items()}
        train_faults: dict[str, list[float]] = {}
        train_samples = time_interleaved(calls, repeats=repeats, block=REFRESH_PERIOD, warmup_blocks=warmup,
                                         device=device, errors=errors, faults=train_faults)
        result["train_step"] = {"summary": summarize(train_samples, BASELINE), "samples": train_samples,
                                "first_call_s": first_train_s, "page_faults": _median_each(train_faults)}
        result["peak_step_bytes"] = {n: _peak_bytes(call, device) for n, call in calls.items() if n not in errors}
    result["load_average"] = load_average()
    return result


def _median_each(values: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(items) for name, items in values.items() if items}


def _peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_step_bytes(step)


class _UndeclaredMAC(FunctionalMAC):
    """The functional MAC step without attention declarations: every qkv row gets the plain mean."""

    def __init__(self, name: str, model: torch.nn.Module, config: macfn.MACConfig, *, compiled: bool) -> None:
        super().__init__(name, model, config, compiled=compiled)
        self.compute = macfn.grad_and_stats(model, self._loss)


def measure_stats_cost(name: str, device: torch.device, repeats: int, *, compiled_too: bool) -> dict[str, Any]:
    """Time training steps with and without statistics, eager (and compiled when ``compiled_too``)."""
    torch._dynamo.reset()
    workload = build_workload(name, device=device)
    has_attention = name in ("vit", "gpt")
    contenders: dict[str, Variant] = {"sgd": build_variant("sgd", workload)}
    for compiled in (False, True) if compiled_too else (False,):
        suffix = "compiled" if compiled else "eager"
        model = copy.deepcopy(workload.model)
        contenders[f"plain-{suffix}"] = FunctionalMAC(f"plain-{suffix}", model, workload.config, compiled=compiled,
                                                      statistics=False)
        contenders[f"stats-{suffix}"] = build_variant(f"macfn-{suffix}", workload)
        if has_attention:
            model = copy.deepcopy(workload.model)
            contenders[f"stats-undeclared-{suffix}"] = _UndeclaredMAC(
                f"stats-undeclared-{suffix}", model, workload.config, compiled=compiled)
    _log(f"{name}: statistics cost, compiling and timing {len(contenders)} steps")
    def train(variant: Variant) -> Callable[[], object]:
        return lambda: variant.train_step(workload.inputs, workload.targets)

    calls = {n: train(v) for n, v in contenders.items()}
    for call in calls.values():
        call()
    samples = time_interleaved(calls, repeats=repeats, block=REFRESH_PERIOD, device=device)
    return {"summary": summarize(samples, "sgd"), "samples": samples, "load_average": load_average()}


def count_recompiles(name: str, device: torch.device, steps: int = 100) -> dict[str, Any]:
    """Count compiled graphs added after the first step over ``steps`` steps of a cosine schedule."""
    from torch._dynamo.utils import counters

    workload = build_workload(name, device=device, tiny=True)
    result: dict[str, Any] = {}
    candidates = ["macfn-compiled", "sgd-compiled"] + (["macfn-optim-compiled"] if macfn_optim_available() else [])
    for variant_name in candidates:
        torch._dynamo.reset()
        counters.clear()
        variant = build_variant(variant_name, workload)
        schedule = _cosine_schedule(variant, steps)
        start = time.perf_counter()
        variant.train_step(workload.inputs, workload.targets)
        first = time.perf_counter() - start
        graphs_after_first = counters["stats"]["unique_graphs"]
        for _ in range(1, steps):
            schedule()
            variant.train_step(workload.inputs, workload.targets)
        result[variant_name] = {
            "first_step_s": first,
            "graphs_after_first_step": graphs_after_first,
            "recompiles": counters["stats"]["unique_graphs"] - graphs_after_first,
            "steps": steps,
        }
        _log(f"{name}: {variant_name} recompiles {result[variant_name]['recompiles']}")
    return result


def _cosine_schedule(variant: Variant, steps: int) -> Callable[[], None]:
    """Return a callable that advances a cosine learning-rate schedule by one step.

    ``torch.optim`` variants use ``torch.optim.lr_scheduler.CosineAnnealingLR``; the functional
    variant writes the same values into its 0-dim learning-rate tensor.
    """
    if isinstance(variant, FunctionalMAC):
        peak = float(variant.lr)
        count = [0]

        def advance() -> None:
            count[0] += 1
            variant.lr.fill_(cosine_lr(count[0], steps, peak))

        return advance
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(getattr(variant, "optimizer"), T_max=steps)
    return scheduler.step


def measure_tasks(plan: Plan, device: torch.device) -> dict[str, Any]:
    """Run every time-to-target task for every variant and seed, with ``plan.task_threads`` threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.task_threads)
    try:
        return _measure_tasks(plan, device)
    finally:
        torch.set_num_threads(threads)


def _measure_tasks(plan: Plan, device: torch.device) -> dict[str, Any]:
    builders: dict[str, Callable[[], tasks.Task]] = {
        "digits-mlp": lambda: tasks.digits_task("MLP", device),
        "digits-cnn": lambda: tasks.digits_task("CNN", device),
        "text-gpt": lambda: tasks.text_task(device),
    }
    results: dict[str, Any] = {}
    for task_name in plan.tasks:
        task = builders[task_name]()
        per_variant: dict[str, Any] = {}
        for variant_name in _available(plan.task_variants):
            runs = [tasks.run_to_target(task, variant_name, seed) for seed in range(plan.seeds)]
            per_variant[variant_name] = {"runs": runs, "summary": tasks.summarize_runs(runs)}
            _log(f"{task_name}: {variant_name} {per_variant[variant_name]['summary']}")
        results[task_name] = {
            "threads": torch.get_num_threads(), "target": task.target, "batch": task.batch, "eval_every": task.eval_every,
            "max_seconds": task.max_seconds, "lrs": {n: task.lrs.get(n, task.config.lr) for n in per_variant},
            "kfac_damping": task.kfac_damping, "config": dataclasses.asdict(task.config), "variants": per_variant,
        }
    return results


def run(plan: Plan, device: torch.device, sections: Sequence[str],
        save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the selected sections of ``plan`` and return every result with the environment.

    ``save`` receives the results after every section, so that a run stopped later keeps them.
    """
    results: dict[str, Any] = {"environment": environment(device), "plan": dataclasses.asdict(plan),
                               "command": " ".join(["python -m benchmarks.report", *sys.argv[1:]]),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    started = time.perf_counter()
    for section in sections:
        section_start = time.perf_counter()
        record: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                  "load_average_at_start": load_average()}
        if section == "steps":
            results["workloads"] = {name: measure_workload(plan, name, device) for name in plan.step_workloads}
        elif section == "anatomy" and device.type == "cpu":
            results["anatomy"] = anatomy.measure(plan.anatomy_width, plan.repeats)
        elif section == "stats":
            repeats = max(3, plan.repeats)
            results["stats_cost"] = {
                name: measure_stats_cost(name, device, repeats, compiled_too=name in plan.stats_compiled_workloads)
                for name in plan.stats_workloads
            }
        elif section == "compile":
            results["recompiles"] = {name: count_recompiles(name, device) for name in plan.recompile_workloads}
        elif section == "tasks":
            results["time_to_target"] = measure_tasks(plan, device)
        record["load_average_at_end"] = load_average()
        record["wall_clock_s"] = time.perf_counter() - section_start
        label = section
        if section == "steps" and plan.step_workloads != PLANS[plan.name].step_workloads:
            label = f"steps ({', '.join(plan.step_workloads)})"
        results["sections"][label] = record
        if save is not None:
            save(results)
    results["environment"]["load_average_at_end"] = load_average()
    results["wall_clock_s"] = time.perf_counter() - started
    return results


SECTIONS = ("steps", "anatomy", "stats", "compile", "tasks")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the plan and write the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="full", help="what to measure (default: full)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default: docs/benchmarks.json for the full plan, "
                             "docs/benchmarks-<plan>.json for another plan, with -cuda before .json on CUDA)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite docs/benchmarks.md and the plots from the full plan's results file, "
                             "measuring nothing")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated subset of the plan's step workloads, e.g. mlp-2048,gpt")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the measured sections in an existing results file, keeping the rest")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine.")
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}: expected a subset of {','.join(SECTIONS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    plan = PLANS[args.plan]
    if args.workloads:
        chosen = tuple(w for w in args.workloads.split(",") if w)
        unknown_workloads = sorted(set(chosen) - set(plan.step_workloads))
        if unknown_workloads:
            parser.error(f"unknown workloads {unknown_workloads}: expected a subset of {','.join(plan.step_workloads)}")
        plan = dataclasses.replace(plan, step_workloads=chosen)
    recorded = plan.name == "full" and args.json is None
    suffix = "" if plan.name == "full" else f"-{plan.name}"
    json_path = args.json or ROOT / "docs" / (f"benchmarks{suffix}.json" if device.type == "cpu"
                                              else f"benchmarks{suffix}-cuda.json")
    subset = set(sections) != set(SECTIONS) or bool(args.workloads)
    if recorded and subset and not args.merge and not args.render_only:
        parser.error(f"--sections or --workloads without --merge would replace {json_path} with a partial run; "
                     "add --merge to replace only what this run measures, or --json PATH to write elsewhere.")

    if args.render_only:
        results = json.loads(json_path.read_text(encoding="utf-8"))
    else:
        previous = json.loads(json_path.read_text(encoding="utf-8")) if args.merge and json_path.exists() else None

        def save(partial: dict[str, Any]) -> None:
            combined = partial if previous is None else _merge(previous, partial)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(_finite(combined), indent=1) + "\n", encoding="utf-8")
            _log(f"wrote {json_path}")

        results = run(plan, device, sections, save)
        save(results)
        if previous is not None:
            results = _merge(previous, results)
    # Only the full plan's results file becomes docs/benchmarks.md; other runs print their table.
    if device.type == "cpu" and recorded:
        render.write_page(results, ROOT / "docs")
        _log(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")
    print(render.summary_table(results))
    return 0


def _merge(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Return ``previous`` with the sections (and, for the step timings, the workloads) in ``new`` replaced."""
    merged = dict(previous)
    for key in ("anatomy", "stats_cost", "recompiles", "time_to_target"):
        if key in new:
            merged[key] = new[key]
    if "workloads" in new:
        merged["workloads"] = {**previous.get("workloads", {}), **new["workloads"]}
    merged["sections"] = {**previous.get("sections", {}), **new["sections"]}
    # The environment and the wall clock stay those of the run that wrote the file first.
    merged["command"] = f"{previous.get('command', '')}; then {new['command']}"
    return merged


def _finite(tree: Any) -> Any:
    """Replace NaN and infinity by None so that the JSON file is standard JSON."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if isinstance(tree, dict):
        return {key: _finite(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_finite(value) for value in tree]
    return tree


if __name__ == "__main__":
    raise SystemExit(main())
