"""Hyperparameters of the MAC update as an immutable, validated record."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

DampingForm = Literal["decoupled", "exact"]
DAMPING_FORMS: tuple[DampingForm, ...] = ("decoupled", "exact")
NonfinitePolicy = Literal["skip", "raise", "ignore"]
NONFINITE_POLICIES: tuple[NonfinitePolicy, ...] = ("skip", "raise", "ignore")
BaseRule = Literal["sgd", "adamw"]
BASE_RULES: tuple[BaseRule, ...] = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class BaseUpdate:
    """The base update of one parameter group: the rule that turns its gradient into a step.

    MAC preconditions the nn.Linear and nn.Conv2d weights (and their biases) and then applies a
    base update. Every other parameter (embeddings, normalisation layers, positional tables,
    standalone biases) gets the base update alone. Without groups that is the config's momentum
    SGD, as in the paper. A group names its parameters explicitly; a preconditioned weight put in
    a group gets the group's rule applied to its preconditioned gradient.

    ``"adamw"`` is torch.optim.AdamW's update (Loshchilov and Hutter, 2019, arXiv 1711.05101) with
    ``t = state["step"] + 1``::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        theta = theta (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Attributes:
        params: Names of the group's parameters, as in ``model.named_parameters()``.
        rule: ``"sgd"`` (the config's momentum, Nesterov and weight decay settings) or ``"adamw"``.
        lr_scale: The group's learning rate is ``lr_scale`` times the step's, so one schedule
            drives every group; e.g. 0.01 gives AdamW 1e-3 next to MAC's 0.1.
        weight_decay: The group's decay coefficient >= 0; None takes ``MACConfig.weight_decay``.
            AdamW always decays decoupled; SGD follows ``MACConfig.decoupled_weight_decay``.
        betas: AdamW's ``(b1, b2)``, each in [0, 1).
        eps: AdamW's ``eps`` > 0, added to the root of the second moment.
    """

    params: tuple[str, ...]
    rule: BaseRule = "sgd"
    lr_scale: float = 1.0
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        names = self.params
        if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(
            isinstance(name, str) for name in names
        ):
            raise ValueError(
                f"Invalid BaseUpdate params={names!r}: expected a tuple of parameter names, e.g. "
                "('tok.weight', 'ln.weight')."
            )
        # NOTE: a list is stored as a tuple so that the frozen record stays hashable.
        object.__setattr__(self, "params", tuple(names))
        if len(set(self.params)) != len(self.params):
            raise ValueError(f"Invalid BaseUpdate params={self.params!r}: a name appears twice.")
        if self.rule not in BASE_RULES:
            raise ValueError(f"Invalid BaseUpdate rule={self.rule!r}: expected one of {', '.join(map(repr, BASE_RULES))}.")

        _check_real("lr_scale", self.lr_scale, "a finite number >= 0, e.g. 1.0")
        if self.lr_scale < 0:
            raise ValueError(f"Invalid lr_scale={self.lr_scale!r}: it must be >= 0.")
        if self.weight_decay is not None:
            _check_real("weight_decay", self.weight_decay, "a finite number >= 0, or None for the config's")
            if self.weight_decay < 0:
                raise ValueError(f"Invalid BaseUpdate weight_decay={self.weight_decay!r}: it must be >= 0.")

        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"Invalid betas={self.betas!r}: expected a pair (b1, b2), e.g. (0.9, 0.999).")
        object.__setattr__(self, "betas", tuple(self.betas))
        for index, beta in enumerate(self.betas):
            _check_real(f"betas[{index}]", beta, "a number in [0, 1), e.g. 0.9")
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid betas[{index}]={beta!r}: it must lie in [0, 1).")

        _check_real("eps", self.eps, "a finite number > 0, e.g. 1e-8")
        if self.eps <= 0:
            raise ValueError(f"Invalid eps={self.eps!r}: it must be > 0, e.g. 1e-8.")


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
        nonfinite: What a step does when a gradient, a statistic or a tensor ``lr``
            contains NaN or infinity, or a layer's row products ``G abar`` overflow
            from finite inputs. ``"skip"`` returns the parameters, momentum
            and running statistics unchanged, leaves ``state["step"]`` where it
            was, adds 1 to ``state["skipped"]`` and warns (eagerly, on the 1st,
            10th, 100th, ... skipped step). ``"raise"`` raises FloatingPointError
            naming the offending tensors (it needs eager mode). ``"ignore"``
            checks nothing and applies the update, saving the check and, in
            compiled code, the selection of the old values.
        base_updates: Parameter groups with their own base update (:class:`BaseUpdate`);
            parameters in no group get the momentum SGD set by the fields above.
    """

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decoupled_weight_decay: bool = False
    damping: float = 1.0
    stat_decay: float = 0.95
    damping_form: DampingForm = "decoupled"
    nonfinite: NonfinitePolicy = "skip"
    base_updates: tuple[BaseUpdate, ...] = ()

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
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid nonfinite={self.nonfinite!r}: expected one of {', '.join(map(repr, NONFINITE_POLICIES))}."
            )
        self._check_base_updates()

    def _check_base_updates(self) -> None:
        groups = self.base_updates
        if not isinstance(groups, (tuple, list)) or not all(isinstance(group, BaseUpdate) for group in groups):
            raise ValueError(
                f"Invalid base_updates={groups!r}: expected a tuple of macfn.BaseUpdate, e.g. "
                "(macfn.BaseUpdate(('tok.weight',), rule='adamw', lr_scale=0.01),)."
            )
        # NOTE: a list is stored as a tuple so that the frozen record stays hashable.
        object.__setattr__(self, "base_updates", tuple(groups))
        seen: set[str] = set()
        for group in self.base_updates:
            twice = sorted(seen.intersection(group.params))
            if twice:
                raise ValueError(
                    f"Invalid base_updates: {', '.join(map(repr, twice))} belong to more than one group; put each "
                    "parameter in at most one BaseUpdate."
                )
            seen.update(group.params)

    def groups_by_param(self) -> dict[str, BaseUpdate]:
        """Return the group of every parameter named in ``base_updates``, keyed by name."""
        return {name: group for group in self.base_updates for name in group.params}

    def adamw_params(self) -> tuple[str, ...]:
        """Return the names of the parameters in ``"adamw"`` groups, in group order."""
        return tuple(name for group in self.base_updates if group.rule == "adamw" for name in group.params)

    def replace(self, **changes: object) -> MACConfig:
        """Return a copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _check_real(name: str, value: object, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}={value!r}: expected {valid}.")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r}: expected True or False.")
