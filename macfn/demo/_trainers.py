"""The optimizers a demo task compares, behind one small training-step interface."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

import macfn

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(model output, targets) -> scalar loss``."""


@dataclasses.dataclass(frozen=True)
class SGDSettings:
    """Settings of ``torch.optim.SGD``."""

    lr: float
    momentum: float
    weight_decay: float


@dataclasses.dataclass(frozen=True)
class AdamWSettings:
    """Settings of ``torch.optim.AdamW``."""

    lr: float
    weight_decay: float


class Trainer(Protocol):
    """One optimizer on one model: a training step and the parameters it has reached."""

    settings: str

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """Take one step on the batch ``(x, y)``; return its loss, detached."""
        ...

    def parameters(self) -> dict[str, Tensor]:
        """Return the current parameters keyed by ``model.named_parameters()`` names."""
        ...


class MACTrainer:
    """MAC through macfn's functional API, with the parameters kept in a dict outside the model."""

    def __init__(self, model: nn.Module, config: macfn.MACConfig, loss_fn: LossFn, *, notes: Sequence[str] = (),
                 **capture: Any) -> None:
        """Build the trainer.

        Args:
            model: The network; its parameters are copied, never updated in place.
            config: MAC's hyperparameters.
            loss_fn: ``(output, targets) -> loss``.
            notes: Extra phrases for :attr:`settings`, e.g. how the value rows are averaged.
            capture: Keyword arguments for :func:`macfn.grad_and_stats`, e.g. ``attention=``.
        """
        self.model = model
        self.config = config
        self.loss_fn = loss_fn
        self.params = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.compute = macfn.grad_and_stats(model, self._loss, **capture)
        self.state = macfn.init(self.params, config)
        self.settings = ", ".join([
            f"lr={config.lr}", f"momentum={config.momentum}", f"weight_decay={config.weight_decay} (L2)",
            f"damping={config.damping}", f"stat_decay={config.stat_decay}", *notes, "statistics every step",
        ])

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.model, params, (x,)), y)

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        grads, stats, loss = self.compute(self.params, x, y)
        self.params, self.state = macfn.step(self.params, grads, stats, self.state, self.config)
        detached: Tensor = loss.detach()
        return detached

    def parameters(self) -> dict[str, Tensor]:
        return self.params


class TorchOptimTrainer:
    """A torch.optim optimizer on the module's own parameters, in the usual backward-step loop."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, settings: str) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.settings = settings

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        torch.autograd.backward(loss)
        self.optimizer.step()
        return loss.detach()

    def parameters(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())


def sgd_trainer(model: nn.Module, settings: SGDSettings, loss_fn: LossFn, lr: float | None = None) -> TorchOptimTrainer:
    """Return ``torch.optim.SGD`` with ``settings`` (L2 weight decay), ``lr`` overriding theirs."""
    chosen = settings if lr is None else dataclasses.replace(settings, lr=lr)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=chosen.lr, momentum=chosen.momentum, weight_decay=chosen.weight_decay
    )
    return TorchOptimTrainer(model, optimizer, loss_fn, describe(chosen, "torch.optim.SGD, L2"))


def adamw_trainer(
    model: nn.Module, settings: AdamWSettings, loss_fn: LossFn, lr: float | None = None
) -> TorchOptimTrainer:
    """Return ``torch.optim.AdamW`` with ``settings`` (decoupled weight decay), ``lr`` overriding theirs."""
    chosen = settings if lr is None else dataclasses.replace(settings, lr=lr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=chosen.lr, weight_decay=chosen.weight_decay)
    return TorchOptimTrainer(model, optimizer, loss_fn, describe(chosen, "torch.optim.AdamW, decoupled decay"))


def describe(settings: SGDSettings | AdamWSettings, note: str) -> str:
    """Return ``"lr=0.1, momentum=0.9, ... (note)"`` for a results table."""
    fields = dataclasses.asdict(settings)
    return ", ".join(f"{key}={value:g}" for key, value in fields.items()) + f" ({note})"
