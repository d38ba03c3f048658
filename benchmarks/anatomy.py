"""Take the compiled MAC update of an MLP apart: what each piece of the formulation costs.

Each probe below is a hand-written functional MAC update (momentum SGD on the preconditioned
gradient, new tensors out) for the MLP 784-W-W-10, compiled with
``torch.compile(fullgraph=True)`` and timed against ``torch.optim.SGD(foreach=True)`` in the
same interleaved run. The probes differ in one choice each:

* ``minimal``: ``c = G_w abar_w + g_b abar_b`` with ``torch.mv``, then
  ``Ghat = G - c abar^T`` as an elementwise expression that fuses into the momentum update;
  the bias correction divides by ``1 - power`` with ``power = stat_decay^k`` kept as a tensor;
* ``+pow``: the bias correction computes ``stat_decay^k`` with ``torch.pow`` from an int64
  count inside the expression for ``abar``, so inductor inlines the scalar ``pow`` into every
  loop that reads ``abar`` (macfn instead folds the correction into the per-layer denominator,
  see ``macfn._kernels.precondition_layer``);
* ``+finite check``: one ``torch.aminmax`` per gradient and a ``torch.where`` that keeps the
  old values on a non-finite step (macfn reads the row coefficients ``G abar`` instead of the
  gradients of its preconditioned layers, and keeps the ``torch.where``);
* ``+bias column``: the bias gradient is concatenated to the weight rows (a copy of ``G``),
  with the rest still elementwise;
* ``+bias column, bmm``: the same with ``torch.bmm`` and ``torch.baddbmm``, which inductor
  calls as external kernels that cannot fuse with the update (macfn uses them in eager mode only);
* ``all of the above``: the four costly choices at once.

Usage: ``python -m benchmarks.anatomy [--width 2048] [--repeats 9]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .models import build_workload
from .timing import summarize, time_interleaved
from .variants import build_variant

LAYERS = (("0.weight", "0.bias"), ("2.weight", "2.bias"), ("4.weight", "4.bias"))
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
STAT_DECAY = 0.95
DAMPING = 1.0

PROBES = {
    # name: (pow, finite check, bias column, bmm)
    "minimal": (False, False, False, False),
    "+pow": (True, False, False, False),
    "+finite check": (False, True, False, False),
    "+bias column": (False, False, True, False),
    "+bias column, bmm": (False, False, True, True),
    "all of the above": (True, True, True, True),
}

Step = Callable[..., tuple[dict[str, Tensor], dict[str, Tensor]]]


def _abar(mean: Tensor, count: Tensor, power: Tensor, use_pow: bool) -> Tensor:
    if use_pow:
        return mean / (1.0 - torch.pow(torch.tensor(STAT_DECAY), count.to(mean.dtype)))
    return mean / (1.0 - power)


def _preconditioned(grad_w: Tensor, grad_b: Tensor, abar: Tensor, bias_column: bool,
                    use_bmm: bool) -> tuple[Tensor, Tensor]:
    """Return ``(Ghat_w [d_out, d_in], ghat_b [d_out])`` for ``abar`` of length ``d_in + 1``."""
    scale = 1.0 / (DAMPING + (abar * abar).sum())
    if not bias_column:
        abar_w, abar_b = abar[:-1], abar[-1]
        coefficient = (torch.mv(grad_w, abar_w) + grad_b * abar_b) * scale
        return grad_w - coefficient[:, None] * abar_w[None, :], grad_b - coefficient * abar_b
    rows = torch.cat([grad_w, grad_b[:, None]], dim=1)
    if use_bmm:
        coefficient = torch.bmm(rows[None], abar[None, :, None]) * scale
        result = torch.baddbmm(rows[None], coefficient, abar[None, None, :], alpha=-1.0)[0]
    else:
        coefficient = (rows * abar).sum(dim=1, keepdim=True) * scale
        result = rows - coefficient * abar
    return result[:, :-1], result[:, -1]


def make_probe(use_pow: bool, check: bool, bias_column: bool, use_bmm: bool) -> Step:
    """Return the compiled probe ``(params, grads, buffers, means, count, power, lr) -> (params, buffers)``."""

    def update(params: dict[str, Tensor], grads: dict[str, Tensor], buffers: dict[str, Tensor],
               means: dict[str, Tensor], count: Tensor, power: Tensor,
               lr: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        finite = None
        if check:
            finite = torch.cat([torch.isfinite(torch.stack(torch.aminmax(g))) for g in grads.values()]).all()
        new_params: dict[str, Tensor] = {}
        new_buffers: dict[str, Tensor] = {}
        for weight, bias in LAYERS:
            abar = _abar(means[weight], count, power, use_pow)
            directions = _preconditioned(grads[weight], grads[bias], abar, bias_column, use_bmm)
            for name, direction in zip((weight, bias), directions):
                buffer = buffers[name] * MOMENTUM + (direction + WEIGHT_DECAY * params[name])
                param = params[name] - lr * buffer
                if finite is not None:
                    buffer = torch.where(finite, buffer, buffers[name])
                    param = torch.where(finite, param, params[name])
                new_buffers[name] = buffer
                new_params[name] = param
        return new_params, new_buffers

    compiled: Step = torch.compile(update, fullgraph=True)
    return compiled


def measure(width: int, repeats: int) -> dict[str, Any]:
    """Time every probe, macfn's compiled step and SGD side by side on the MLP of ``width``."""
    torch._dynamo.reset()
    workload = build_workload(f"mlp-{width}")
    params = {n: p.detach().clone() for n, p in workload.model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=generator) * 1e-3 for n, p in params.items()}
    means = {w: torch.rand(params[w].shape[1] + 1, generator=generator) for w, _ in LAYERS}
    count = torch.tensor(3, dtype=torch.int64)
    power = torch.tensor(STAT_DECAY**3)
    lr = torch.tensor(0.1)

    tasks: dict[str, Callable[[], object]] = {}
    sgd = build_variant("sgd", workload)
    sgd.prepare(workload.inputs, workload.targets)
    tasks["sgd"] = sgd.optimizer_step
    core = build_variant("macfn-compiled", workload)
    core.prepare(workload.inputs, workload.targets)
    tasks["macfn-compiled"] = core.optimizer_step
    for name, flags in PROBES.items():
        probe = make_probe(*flags)
        state = {"params": dict(params), "buffers": {n: torch.zeros_like(p) for n, p in params.items()}}

        def run(probe: Step = probe, state: dict[str, dict[str, Tensor]] = state) -> None:
            state["params"], state["buffers"] = probe(state["params"], grads, state["buffers"], means, count,
                                                      power, lr)

        tasks[name] = run
    for task in tasks.values():
        task()
    samples = time_interleaved(tasks, repeats=repeats, block=10)
    return {"width": width, "summary": summarize(samples, "sgd"), "samples": samples}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, time the probes and print one line per probe."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.anatomy", description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048, help="MLP width W (default: 2048)")
    parser.add_argument("--repeats", type=int, default=9, help="timed blocks per probe (default: 9)")
    args = parser.parse_args(argv)
    print(f"Compiled MAC updates of the MLP 784-{args.width}-{args.width}-10 against torch.optim.SGD, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} blocks of 10 steps:")
    result = measure(args.width, args.repeats)
    for name, item in result["summary"].items():
        print(f"{name:20s} {item['median_s'] * 1e3:8.2f} ms  {item['ratio']:5.2f}x SGD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
