"""Hyperparameters of the MAC update as an immutable, validated record."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

DampingForm = Literal["decoupled", "exact"]
DAMPING_FORMS: tuple[DampingForm, ...] = ("decoupled", "exact")


@dataclasses.dataclass(frozen=True)
class MACConfig:
    """Hyperparameters of one MAC optimiser, checked when the record is built.

    The defaults are the authors' CIFAR settings (Seung, Lee and Ko, 2025,
    arXiv 2506.08464): ``lr=0.1, momentum=0.9, weight_decay=5e-4, damping=1.0,
    stat_decay=0.95``.

    Attributes:
        lr: Learning rate, a finite number >= 0. A schedule passes the current
            value to :func:`macfn.step` as a 0-dim tensor instead, so that a
            compiled step is not recompiled when the value changes.
        momentum: Heavy-ball coefficient mu in [0, 1).
        nesterov: Use the Nesterov form ``d + mu * buf`` of the momentum update.
        weight_decay: Coefficient wd >= 0. By default it is added as L2 after
            preconditioning, ``d = Ghat + wd * theta``, as the authors' code does.
        decoupled_weight_decay: Shrink the parameters by ``1 - lr * wd`` instead
            of adding ``wd * theta`` to the update (AdamW-style decay).
        damping: Damping rho > 0 of the Kronecker factor ``abar abar^T + rho I``.
        stat_decay: Weight beta in [0, 1) that the running mean activation keeps
            on its old value: ``m <- beta * m + (1 - beta) * abar``.
        damping_form: ``"decoupled"`` applies ``I - abar abar^T / (rho + |abar|^2)``
            (the authors' code, rho does not rescale the step); ``"exact"``
            applies the Sherman–Morrison inverse ``(rho I + abar abar^T)^-1``,
            which is the decoupled form divided by rho.
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decoupled_weight_decay: bool = False
    damping: float = 1.0
    stat_decay: float = 0.95
    damping_form: DampingForm = "decoupled"

    def __post_init__(self) -> None:
        _check_real("lr", self.lr, "a finite number >= 0, e.g. 0.1")
        if self.lr < 0:
            raise ValueError(f"Invalid lr={self.lr!r}: the learning rate must be >= 0, e.g. 0.1.")
        _check_real("momentum", self.momentum, "a number in [0, 1), e.g. 0.9")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(
                f"Invalid momentum={self.momentum!r}: it must lie in [0, 1); use 0.0 to turn momentum off."
            )
        _check_bool("nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("Invalid nesterov=True with momentum=0.0: Nesterov momentum needs momentum > 0.")
        _check_real("weight_decay", self.weight_decay, "a finite number >= 0, e.g. 5e-4")
        if self.weight_decay < 0:
            raise ValueError(
                f"Invalid weight_decay={self.weight_decay!r}: it must be >= 0; use 0.0 to turn it off."
            )
        _check_bool("decoupled_weight_decay", self.decoupled_weight_decay)
        _check_real("damping", self.damping, "a finite number > 0, e.g. 1.0")
        if self.damping <= 0:
            raise ValueError(
                f"Invalid damping={self.damping!r}: the damping rho must be > 0 (the authors use 1.0 for CNNs "
                "and 3.0 for vision transformers)."
            )
        _check_real("stat_decay", self.stat_decay, "a number in [0, 1), e.g. 0.95")
        if not 0.0 <= self.stat_decay < 1.0:
            raise ValueError(
                f"Invalid stat_decay={self.stat_decay!r}: it must lie in [0, 1); 0.0 keeps only the latest "
                "batch, 0.95 is the authors' CNN setting."
            )
        if self.damping_form not in DAMPING_FORMS:
            raise ValueError(
                f"Invalid damping_form={self.damping_form!r}: expected one of {', '.join(map(repr, DAMPING_FORMS))}."
            )

    def replace(self, **changes: object) -> MACConfig:
        """Return a copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _check_real(name: str, value: object, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}={value!r}: expected {valid}.")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r}: expected True or False.")
