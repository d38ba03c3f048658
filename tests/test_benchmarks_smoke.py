"""Smoke tests of the benchmark suite: every variant runs on a tiny model, and the page renders.

The benchmarks themselves live in ``benchmarks/`` and are not collected by default; these
tests keep their builders working. They need the repository root on ``sys.path``, which
``python -m pytest`` from the root provides.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import render, tasks
from benchmarks.models import build_workload, workload_names
from benchmarks.timing import minor_faults, peak_step_bytes, summarize, time_interleaved
from benchmarks.variants import FunctionalMAC, build_variant, state_bytes, variant_names

COMPILED = {"sgd-compiled", "macfn-compiled", "macfn-compiled-nocheck", "macfn-optim-compiled"}
EAGER = [name for name in variant_names() if name not in COMPILED]


def _run_twice(workload_name: str, variant_name: str) -> None:
    workload = build_workload(workload_name, tiny=True)
    variant = build_variant(variant_name, workload)
    first = variant.train_step(workload.inputs, workload.targets)
    second = variant.train_step(workload.inputs, workload.targets)
    variant.prepare(workload.inputs, workload.targets)
    variant.optimizer_step()
    assert math.isfinite(float(first))
    assert math.isfinite(float(second))
    assert math.isfinite(float(variant.loss_on(workload.inputs, workload.targets)))
    assert state_bytes(variant) > 0


@pytest.mark.parametrize("variant_name", EAGER)
@pytest.mark.parametrize("workload_name", ["mlp-16", "cnn", "vit", "gpt"])
def test_eager_variant_runs(workload_name: str, variant_name: str) -> None:
    _run_twice(workload_name, variant_name)


@pytest.mark.compile
@pytest.mark.parametrize("variant_name", sorted(COMPILED & set(variant_names())))
def test_compiled_variant_runs(variant_name: str) -> None:
    torch._dynamo.reset()
    _run_twice("mlp-16", variant_name)


def test_dense_mac_matches_macfn() -> None:
    # The dense matrix G P and the rank-one form are the same update, so three steps from the
    # same weights must agree up to float32 rounding.
    workload = build_workload("cnn", tiny=True)
    dense = build_variant("dense-mac", workload)
    rank_one = build_variant("macfn-eager", workload)
    assert isinstance(rank_one, FunctionalMAC)
    for _ in range(3):
        dense.train_step(workload.inputs, workload.targets)
        rank_one.train_step(workload.inputs, workload.targets)
    for name, param in dense.model.named_parameters():  # type: ignore[attr-defined]
        torch.testing.assert_close(param.detach(), rank_one.params[name], rtol=1e-4, atol=1e-5)


def test_dense_mac_differs_from_sgd() -> None:
    # Negative control for the test above: the preconditioner must change the update.
    workload = build_workload("mlp-16", tiny=True)
    dense = build_variant("dense-mac", workload)
    sgd = build_variant("sgd", workload)
    for _ in range(2):
        dense.train_step(workload.inputs, workload.targets)
        sgd.train_step(workload.inputs, workload.targets)
    weight_dense = dense.model.state_dict()["2.weight"]  # type: ignore[attr-defined]
    weight_sgd = sgd.model.state_dict()["2.weight"]  # type: ignore[attr-defined]
    assert not torch.allclose(weight_dense, weight_sgd, rtol=1e-4, atol=1e-6)


def test_state_bytes_ordering() -> None:
    workload = build_workload("mlp-64", tiny=True)
    sizes = {}
    for name in ("sgd", "macfn-eager", "dense-mac", "kfac", "adamw"):
        variant = build_variant(name, workload)
        variant.train_step(workload.inputs, workload.targets)
        sizes[name] = state_bytes(variant)
    momentum = sum(p.numel() * 4 for p in workload.model.parameters())
    assert sizes["sgd"] == momentum
    # Beyond the momentum, MAC keeps one float32 mean activation of length d_in + 1 per layer
    # and a few int64 counters.
    mean_activations = sum((m.in_features + 1) * 4 for m in workload.model.modules()
                           if isinstance(m, torch.nn.Linear))
    assert 0 <= sizes["macfn-eager"] - momentum - mean_activations <= 128
    assert sizes["dense-mac"] > sizes["macfn-eager"]
    assert sizes["kfac"] > sizes["sgd"]
    assert sizes["adamw"] >= 2 * momentum


def test_workload_names_build() -> None:
    for name in workload_names():
        workload = build_workload(name, tiny=True)
        output = workload.model(workload.inputs)
        assert output.shape[-1] == workload.classes


def test_unknown_names_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown workload 'resnet-50'"):
        build_workload("resnet-50")
    with pytest.raises(ValueError, match="Unknown variant 'lamb'"):
        build_variant("lamb", build_workload("mlp-16", tiny=True))


def test_peak_step_bytes_counts_temporaries() -> None:
    def allocate() -> None:
        a = torch.ones(1000, 1000)
        b = a * 2
        del a
        (b + 1).sum()

    peak = peak_step_bytes(allocate)
    assert 8_000_000 <= peak < 12_100_000


@pytest.mark.skipif(minor_faults() is None, reason="getrusage is not available on this platform")
def test_page_faults_counted_per_call() -> None:
    reused_buffer = torch.zeros(1 << 20)

    def touch_fresh_buffer() -> None:
        torch.ones(16 << 20)  # 64 MiB, above glibc's largest mmap threshold

    def touch_reused_buffer() -> None:
        reused_buffer.fill_(1.0)

    faults: dict[str, list[float]] = {}
    time_interleaved({"fresh": touch_fresh_buffer, "reused": touch_reused_buffer}, repeats=3, block=2,
                     faults=faults)
    assert len(faults["fresh"]) == 3
    assert len(faults["reused"]) == 3
    # 64 MiB are 16,384 pages of 4 KiB, or 32 pages of 2 MiB where transparent huge pages back the buffer.
    assert min(faults["fresh"]) >= 32
    assert max(faults["reused"]) < min(faults["fresh"])


def test_timing_and_page_render(tmp_path: object) -> None:
    workload = build_workload("mlp-16", tiny=True)
    built = {name: build_variant(name, workload) for name in ("sgd", "macfn-eager", "dense-mac")}
    for variant in built.values():
        variant.prepare(workload.inputs, workload.targets)
    samples = time_interleaved({n: v.optimizer_step for n, v in built.items()}, repeats=2, block=2)
    summary = summarize(samples, "sgd")
    assert summary["sgd"]["ratio"] == 1.0
    results = {
        "environment": {"cpu": "test", "torch": torch.__version__, "device": "cpu"},
        "workloads": {"mlp-2048": {
            "variants": list(built), "skipped": {}, "parameter_bytes": 1024,
            "optimizer_step": {"summary": summary, "samples": samples, "first_call_s": {},
                               "page_faults": {"sgd": 0.0, "macfn-eager": 12.0}},
            "state_bytes": {n: state_bytes(v) for n, v in built.items()},
        }},
    }
    page = render.render_page(results, [], "## Predictions", "")
    assert "## Targets" in page
    assert "dense-inverse MAC optimizer step / SGD, MLP W=2048" in page
    assert "not measured" in page  # the GPT and training-step targets have no numbers here
    assert "| mlp-2048 | optimizer step | 0 | 12 | - |" in page
    assert "no page faults" not in page
    with_no_mmap = render.render_page(results, [], "## Predictions", "", no_mmap=results)
    assert "| variant | slope of step time, no page faults |" in with_no_mmap


def test_time_to_target_runs() -> None:
    task = tasks.digits_task("MLP", torch.device("cpu"))
    task.target = 10.0  # reached at the first evaluation
    run = tasks.run_to_target(task, "macfn-eager", seed=0)
    assert run["reached"]
    assert run["steps"] == task.eval_every
    summary = tasks.summarize_runs([run, run, run])
    assert summary["reached"] == 3


def test_text_task_windows() -> None:
    task = tasks.text_task(torch.device("cpu"))
    assert task.train_x.shape[1] == tasks.TEXT_CONTEXT
    # Targets are the inputs shifted by one character.
    assert torch.equal(task.train_x[0, 1:], task.train_y[0, :-1])
    vocab = len(set(tasks.text_corpus()))
    logits = task.build_model()(task.eval_x[:2])
    assert logits.shape == (2, tasks.TEXT_CONTEXT, vocab)
