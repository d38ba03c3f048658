"""Time to a training-loss target on two small real tasks: digits and character-level text.

Digits: scikit-learn's 8x8 handwritten digits with the demo's MLP and CNN
(``macfn.demo.digits``). Text: next-character prediction on the help texts that ship with
CPython (``pydoc_data.topics``) with a small GPT. For each optimizer and seed, the clock runs
only during training steps. It starts at the end of the first step, which compiles where a
variant compiles, and stops at the first evaluation of the training loss at or below the
target. The evaluations themselves are not timed.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import macfn

from . import models
from .models import Workload
from .variants import build_variant

TEXT_CONTEXT = 32
TEXT_BATCH = 32
TEXT_EVAL_WINDOWS = 128


@dataclasses.dataclass
class Task:
    """A training set, a model builder and the loss target.

    Attributes:
        name: Task name.
        train_x, train_y: The whole training set, ``[n, ...]``.
        eval_x, eval_y: The rows on which the training loss is evaluated.
        build_model: Builds a fresh model; seeded by the caller.
        config: MAC hyperparameters (SGD shares lr, momentum and weight decay).
        target: Training-loss target, in nats.
        batch: Batch size.
        eval_every: Training steps between evaluations.
        max_seconds: Training time after which a run counts as not reaching the target.
        lrs: Learning rate per variant; variants not listed use ``config.lr``.
        kfac_damping: Damping of the KFAC variant.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor
    build_model: Callable[[], torch.nn.Module]
    config: macfn.MACConfig
    target: float
    batch: int
    eval_every: int
    max_seconds: float
    lrs: dict[str, float]
    kfac_damping: float


def digits_task(model_name: str, device: torch.device) -> Task:
    """Build the digits task with the demo's ``"MLP"`` or ``"CNN"``."""
    from macfn.demo import digits

    data = digits.load_data(0, device)
    return Task(
        name=f"digits-{model_name.lower()}",
        train_x=data.train_x, train_y=data.train_y, eval_x=data.train_x, eval_y=data.train_y,
        build_model=lambda: digits.build_model(model_name),
        config=models.CNN_CONFIG,
        target=0.05,
        batch=64,
        eval_every=5,
        max_seconds=20.0,
        lrs={"adamw": 1e-3, "kfac": 0.01},
        kfac_damping=0.1,
    )


def text_corpus() -> str:
    """Return the help texts of ``pydoc_data.topics``, joined in key order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def text_task(device: torch.device) -> Task:
    """Build next-character prediction on ``pydoc_data.topics`` with a small GPT.

    Every training sample is a window of ``TEXT_CONTEXT`` characters starting at a multiple
    of ``TEXT_CONTEXT``; the training loss is evaluated on ``TEXT_EVAL_WINDOWS`` fixed windows.
    """
    text = text_corpus()
    vocabulary = sorted(set(text))
    index = {char: i for i, char in enumerate(vocabulary)}
    ids = torch.tensor([index[char] for char in text], dtype=torch.int64)
    windows = (len(ids) - 1) // TEXT_CONTEXT
    starts = torch.arange(windows) * TEXT_CONTEXT
    offsets = torch.arange(TEXT_CONTEXT)
    inputs = ids[starts[:, None] + offsets]
    targets = ids[starts[:, None] + offsets + 1]
    picked = torch.randperm(windows, generator=torch.Generator().manual_seed(0))[:TEXT_EVAL_WINDOWS]
    vocab = len(vocabulary)
    return Task(
        name="text-gpt",
        train_x=inputs.to(device), train_y=targets.to(device),
        eval_x=inputs[picked].to(device), eval_y=targets[picked].to(device),
        build_model=lambda: models.GPT(vocab=vocab, context=TEXT_CONTEXT, dim=64, depth=2, heads=4),
        config=models.TRANSFORMER_CONFIG,
        target=2.3,
        batch=TEXT_BATCH,
        eval_every=10,
        max_seconds=30.0,
        lrs={"adamw": 3e-3, "kfac": 0.01},
        kfac_damping=0.1,
    )


def run_to_target(task: Task, variant_name: str, seed: int) -> dict[str, Any]:
    """Train one variant from seed ``seed`` until the training loss reaches ``task.target``.

    Returns:
        ``{"seconds", "steps", "reached", "final_loss", "history": [(seconds, step, loss)]}``, plus
        ``"error"`` when a step raised because the run diverged; ``seconds`` is the training
        time to the first evaluation at or below the target (or to the time limit when it was
        not reached).
    """
    torch.manual_seed(seed)
    model = task.build_model().to(task.train_x.device)
    workload = Workload(task.name, model, task.train_x[: task.batch], task.train_y[: task.batch], task.config,
                        classes=0)
    variant = build_variant(variant_name, workload, lr=task.lrs.get(variant_name, task.config.lr),
                            kfac_damping=task.kfac_damping)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(task.train_x.shape[0], generator=generator)
    position = 0
    seconds = 0.0
    history: list[tuple[float, int, float]] = []
    steps = 0
    loss = math.inf
    while seconds < task.max_seconds:
        if position + task.batch > order.numel():
            order = torch.randperm(task.train_x.shape[0], generator=generator)
            position = 0
        rows = order[position: position + task.batch].to(task.train_x.device)
        position += task.batch
        x, y = task.train_x[rows], task.train_y[rows]
        start = time.perf_counter()
        try:
            variant.train_step(x, y)
        except RuntimeError as error:
            # A diverged run ends here: KFAC cannot sample labels from NaN logits, nor
            # factorise a non-finite Kronecker factor.
            history.append((seconds, steps, math.nan))
            return {"seconds": seconds, "steps": steps, "reached": False, "final_loss": math.nan,
                    "history": history, "error": str(error).splitlines()[0]}
        elapsed = time.perf_counter() - start
        steps += 1
        if steps > 1:
            seconds += elapsed
        if steps % task.eval_every == 0:
            loss = float(variant.loss_on(task.eval_x, task.eval_y))
            history.append((seconds, steps, loss))
            if loss <= task.target or not math.isfinite(loss):
                break
    reached = loss <= task.target
    return {"seconds": seconds, "steps": steps, "reached": reached, "final_loss": loss, "history": history}


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the median seconds and steps over seeds, and how many seeds reached the target."""
    reached = [run for run in runs if run["reached"]]
    return {
        "median_seconds": statistics.median(run["seconds"] for run in runs) if len(reached) == len(runs) else None,
        "median_steps": statistics.median(run["steps"] for run in runs) if len(reached) == len(runs) else None,
        "reached": len(reached),
        "seeds": len(runs),
    }
