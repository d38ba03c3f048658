"""The pure MAC step: running statistics, preconditioning and the momentum-SGD base update."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NotRequired, TypedDict, cast

import torch
from torch import Tensor

from . import _finite, _kernels
from ._capture import bias_name_for
from ._config import BaseUpdate, MACConfig


class MACState(TypedDict):
    """Optimiser state: a plain dict of tensors, so ``torch.save`` and
    ``torch.load(weights_only=True)`` round-trip it.

    Keys:
        step: int64 scalar, the number of steps applied; a skipped step leaves it unchanged.
        skipped: int64 scalar, the number of steps skipped because a gradient, a statistic or
            the learning rate was non-finite (``MACConfig.nonfinite == "skip"``).
        momentum: ``{param_name: buffer}``, shape and dtype of the parameter; empty when
            ``momentum == 0``.
        mean_activation: ``{weight_name: [blocks, d]}`` running mean activation ``m`` before
            bias correction, float32 (float64 for float64 parameters).
        stat_count: ``{weight_name: int64 scalar}``, the statistics updates ``k`` folded into
            ``m``; the preconditioner uses ``m / (1 - stat_decay^k)``.
        exp_avg, exp_avg_sq: ``{param_name: moment}``, AdamW's first and second moments of the
            parameters in ``"adamw"`` groups (:class:`macfn.BaseUpdate`), shape and dtype of the
            parameter. Present only when the config has such a group; those parameters then
            have no momentum buffer.
    """

    step: Tensor
    skipped: Tensor
    momentum: dict[str, Tensor]
    mean_activation: dict[str, Tensor]
    stat_count: dict[str, Tensor]
    exp_avg: NotRequired[dict[str, Tensor]]
    exp_avg_sq: NotRequired[dict[str, Tensor]]


def init(
    params: Mapping[str, Tensor],
    config: MACConfig | None = None,
    stats: Mapping[str, Tensor] | None = None,
) -> MACState:
    """Create the optimiser state for ``params``.

    Args:
        params: Parameters keyed by ``model.named_parameters()`` names.
        config: Hyperparameters; ``MACConfig()`` when None.
        stats: Optional statistics from :func:`macfn.grad_and_stats` (any batch). Their keys
            and shapes create zero running averages up front, so the state keeps one structure
            from the first step on and a compiled step is not recompiled when the first
            statistics arrive. Their values are not used.

    Returns:
        A :class:`MACState` on the parameters' devices.
    """
    config = MACConfig() if config is None else config
    _check_config(config)
    first = next(iter(params.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    state: MACState = {
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "skipped": torch.zeros((), dtype=torch.int64, device=device),
        "momentum": {},
        "mean_activation": {},
        "stat_count": {},
    }
    _check_groups(params, config)
    adamw = set(config.adamw_params())
    if config.momentum > 0:
        state["momentum"] = {name: torch.zeros_like(p) for name, p in params.items() if name not in adamw}
    if adamw:
        state["exp_avg"] = {name: torch.zeros_like(p) for name, p in params.items() if name in adamw}
        state["exp_avg_sq"] = {name: torch.zeros_like(p) for name, p in params.items() if name in adamw}
    if stats is not None:
        _check_stats(params, stats)
        for name, batch_mean in stats.items():
            state["mean_activation"][name] = torch.zeros_like(batch_mean)
            state["stat_count"][name] = torch.zeros((), dtype=torch.int64, device=batch_mean.device)
    return state


def step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor | None],
    stats: Mapping[str, Tensor] | None = None,
    state: MACState | None = None,
    config: MACConfig | None = None,
    *,
    lr: float | Tensor | None = None,
    finite: Tensor | None = None,
) -> tuple[dict[str, Tensor], MACState]:
    """Take one MAC step; a pure function of its inputs.

    For a preconditioned layer with gradient ``G`` (``[d_out, d]``, bias gradient as last
    column), running mean activation ``abar`` (bias corrected) and ``rho = damping``:

        Ghat  = G - (G abar) abar^T / (rho + |abar|^2)      ("exact": Ghat / rho)
        d     = Ghat + wd * theta                           (L2 after preconditioning)
        buf   = mu * buf + d;  d = buf  (Nesterov: d = d + mu * buf)
        theta = theta - lr * d

    Every other parameter takes the same update with ``Ghat = G`` (momentum SGD). This is
    MAC as stated by Seung, Lee and Ko (2025, arXiv 2506.08464); L2 after preconditioning
    and the decoupled damping are the authors' code. Parameters named in
    ``config.base_updates`` take their group's rule instead (:class:`macfn.BaseUpdate`),
    with learning rate ``lr * lr_scale``.

    Args:
        params: Parameters keyed by name. Never modified.
        grads: A gradient for every key of ``params``; ``None`` leaves that parameter and
            its momentum unchanged. Never modified.
        stats: New batch mean activations from :func:`macfn.grad_and_stats`, or None to
            reuse the running averages (refresh statistics every ``T_cov`` steps this way).
        state: From :func:`init` or a previous step; None creates it.
        config: Hyperparameters; ``MACConfig()`` when None.
        lr: Learning rate for this step, overriding ``config.lr``. Pass a 0-dim tensor in
            compiled code so that a changing value does not trigger recompilation.
        finite: Optional 0-dim bool tensor from the caller, False when inputs this call does
            not see are non-finite (another parameter group, another rank's shard). The
            non-finite policy then treats this step as non-finite too, so that every group
            and rank skips together. Ignored with ``nonfinite="ignore"``.

    Returns:
        ``(new_params, new_state)``; the inputs are left as they were.

    Raises:
        ValueError: Unknown or missing parameter names, shapes or dtypes that do not match,
            an invalid ``lr``, or ``nonfinite="raise"`` inside torch.compile.
        FloatingPointError: With ``nonfinite="raise"``, a gradient, statistic or ``lr``
            contains NaN or infinity, or a layer's row products ``G abar`` overflow.
    """
    config = MACConfig() if config is None else config
    _check_config(config)
    _check_grads(params, grads)
    if stats is not None:
        _check_stats(params, stats)
    if state is None:
        state = init(params, config, stats)
    _check_state(params, state, config)
    rate = config.lr if lr is None else lr
    _check_lr(rate)
    if finite is not None and (finite.dim() != 0 or finite.dtype != torch.bool):
        raise ValueError(
            f"Invalid finite tensor of shape {tuple(finite.shape)} and dtype {finite.dtype}: expected a 0-dim bool "
            "tensor, e.g. the result of a finiteness check over other parameter groups."
        )
    mean_activation, stat_count = _update_statistics(state, stats, config.stat_decay)
    directions, coefficients, covered = _precondition_all(params, grads, mean_activation, stat_count, config)
    finite = _finite_flag(grads, stats, state, rate, config, finite, coefficients, covered)

    new_params: dict[str, Tensor] = {}
    new_momentum = dict(state["momentum"])
    groups = config.groups_by_param()
    moments = _AdamWMoments(state)
    for name, theta in params.items():
        direction = directions.get(name)
        if direction is None:
            new_params[name] = theta
            continue
        group = groups.get(name)
        group_rate = rate if group is None or group.lr_scale == 1.0 else rate * group.lr_scale
        if group is not None and group.rule == "adamw":
            new_params[name] = moments.update(name, theta, direction, group, group_rate, config)
            continue
        weight_decay = config.weight_decay if group is None or group.weight_decay is None else group.weight_decay
        # Each line is one out-of-place kernel in eager mode, as few as the update allows.
        if weight_decay and not config.decoupled_weight_decay:
            direction = torch.add(direction, theta, alpha=weight_decay)
        if config.momentum > 0:
            buffer = torch.add(direction, state["momentum"][name], alpha=config.momentum)
            new_momentum[name] = buffer
            direction = torch.add(direction, buffer, alpha=config.momentum) if config.nesterov else buffer
        if weight_decay and config.decoupled_weight_decay:
            theta = theta - (group_rate * weight_decay) * theta
        new_params[name] = _descend(theta, direction, group_rate)

    new_state: MACState = {
        "step": state["step"] + 1,
        "skipped": state["skipped"],
        "momentum": new_momentum,
        "mean_activation": mean_activation,
        "stat_count": stat_count,
    }
    moments.store(new_state)
    if finite is not None:
        new_params, kept_state = _finite.keep_unless_finite(finite, new_params, params, new_state, state)
        new_state = cast(MACState, kept_state)
        if not torch.compiler.is_compiling():
            report = _finite.describe_nonfinite(grads, stats, rate, coefficients)
            _finite.warn_skipped(report, int(new_state["skipped"]))
    return new_params, new_state


def _descend(theta: Tensor, direction: Tensor, rate: float | Tensor) -> Tensor:
    """Return ``theta - rate * direction`` in one kernel; a tensor rate stays a tensor."""
    if isinstance(rate, Tensor):
        return torch.addcmul(theta, direction, rate.to(theta.device), value=-1)
    return torch.add(theta, direction, alpha=-rate)


def _finite_flag(
    grads: Mapping[str, Tensor | None],
    stats: Mapping[str, Tensor] | None,
    state: MACState,
    rate: float | Tensor,
    config: MACConfig,
    external: Tensor | None,
    coefficients: Mapping[str, Tensor],
    covered: set[str],
) -> Tensor | None:
    """Apply the non-finite policy before the update; return the flag to select with, or None.

    ``external`` is the caller's flag for inputs this call does not see (other parameter
    groups or ranks); it is combined with the flag of this call's own inputs.

    A preconditioned layer is checked through its row coefficients ``G abar``, which are NaN
    or infinite whenever an entry of its weight or bias gradient is (``0 * inf`` is NaN). That
    reads ``[blocks, rows]`` numbers instead of the whole gradient, and also catches row
    products that overflow, which would otherwise write non-finite parameters.

    Eagerly the flag is read at once, so a finite step runs without any selection and a
    non-finite one raises (``"raise"``) or is selected away after the update (``"skip"``).
    """
    if config.nonfinite == "ignore":
        return None
    checked = [g for name, g in grads.items() if g is not None and name not in covered]
    checked += list(coefficients.values()) + list((stats or {}).values())
    if isinstance(rate, Tensor):
        checked.append(rate)
    if torch.compiler.is_compiling():
        if config.nonfinite == "raise":
            raise ValueError(
                "Invalid nonfinite='raise' inside torch.compile: raising needs the value of the finite flag, "
                "which a compiled graph cannot read. Compile the step with nonfinite='skip' and watch "
                "state['skipped'], or call macfn.step eagerly."
            )
        # NOTE: a compiled graph cannot branch on a tensor value, so the update always runs and
        # torch.where keeps the old values when the flag is False.
        flag = _finite.all_finite(checked)
        return flag if external is None else flag & external.to(flag.device)
    # NOTE: reading the flag synchronises with the device once per step, as torch.amp.GradScaler does.
    finite = _finite.all_finite(checked)
    if external is not None:
        finite = finite & external.to(finite.device)
    if bool(finite):
        return None
    if config.nonfinite == "raise":
        report = _finite.describe_nonfinite(grads, stats, rate, coefficients)
        _finite.raise_nonfinite(report, int(state["step"]))
    return finite


class _AdamWMoments:
    """The AdamW moments of one step: read from the old state, written to the new one."""

    def __init__(self, state: MACState) -> None:
        self.exp_avg = dict(state.get("exp_avg", {}))
        self.exp_avg_sq = dict(state.get("exp_avg_sq", {}))
        self.present = "exp_avg" in state
        self.count = state["step"] + 1 if self.present else state["step"]

    def update(
        self, name: str, theta: Tensor, grad: Tensor, group: BaseUpdate, rate: float | Tensor, config: MACConfig
    ) -> Tensor:
        """Return the parameter after one AdamW update; keep the new moments."""
        beta1, beta2 = group.betas
        weight_decay = config.weight_decay if group.weight_decay is None else group.weight_decay
        exp_avg = self.exp_avg[name] * beta1 + grad * (1.0 - beta1)
        exp_avg_sq = self.exp_avg_sq[name] * beta2 + grad * grad * (1.0 - beta2)
        self.exp_avg[name], self.exp_avg_sq[name] = exp_avg, exp_avg_sq

        count = self.count.to(theta.dtype)
        correction1 = 1.0 - torch.pow(torch.full_like(count, beta1), count)
        correction2 = 1.0 - torch.pow(torch.full_like(count, beta2), count)
        denominator = (exp_avg_sq / correction2).sqrt() + group.eps
        if weight_decay:
            theta = theta - (rate * weight_decay) * theta
        return theta - (rate / correction1) * exp_avg / denominator

    def store(self, new_state: MACState) -> None:
        if self.present:
            new_state["exp_avg"] = self.exp_avg
            new_state["exp_avg_sq"] = self.exp_avg_sq


def _update_statistics(
    state: MACState, stats: Mapping[str, Tensor] | None, stat_decay: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    mean_activation = dict(state["mean_activation"])
    stat_count = dict(state["stat_count"])
    for name, batch_mean in (stats or {}).items():
        running = mean_activation.get(name)
        if running is None:
            running = torch.zeros_like(batch_mean)
            stat_count[name] = torch.zeros((), dtype=torch.int64, device=batch_mean.device)
        elif running.shape != batch_mean.shape:
            raise ValueError(
                f"Invalid stats['{name}'] of shape {tuple(batch_mean.shape)}: the running mean activation in "
                f"the state has shape {tuple(running.shape)}; pass statistics from the same model."
            )
        mean_activation[name] = _kernels.update_running_mean(running, batch_mean, stat_decay)
        stat_count[name] = stat_count[name] + 1
    return mean_activation, stat_count


def _precondition_all(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor | None],
    mean_activation: Mapping[str, Tensor],
    stat_count: Mapping[str, Tensor],
    config: MACConfig,
) -> tuple[dict[str, Tensor], dict[str, Tensor], set[str]]:
    """Return the preconditioned gradient of every parameter that has a gradient.

    Also returns the row coefficients ``{weight_name: [blocks, rows, 1]}`` of every
    preconditioned layer, and the names of the gradients that went into them (weights and
    folded-in biases). A coefficient is non-finite when any entry of those gradients is, or
    when its row products overflow.
    """
    directions = {name: g for name, g in grads.items() if g is not None}
    coefficients: dict[str, Tensor] = {}
    covered: set[str] = set()
    for weight_name, running in mean_activation.items():
        grad_weight = grads.get(weight_name)
        if grad_weight is None:
            continue
        blocks, d = running.shape
        out_rows = grad_weight.shape[0]
        weight_columns = math.prod(grad_weight.shape[1:])
        weight_rows = grad_weight.reshape(blocks, out_rows // blocks, weight_columns)
        bias_name = bias_name_for(weight_name) if d == weight_columns + 1 else None
        grad_bias = grads.get(bias_name) if bias_name is not None else None
        bias_rows = None if grad_bias is None else grad_bias.reshape(blocks, out_rows // blocks)

        correction = _kernels.bias_correction(
            stat_count[weight_name], config.stat_decay, _kernels.accumulation_dtype(grad_weight.dtype)
        )
        layer = _kernels.precondition_layer(
            weight_rows, bias_rows, running, config.damping, config.damping_form, correction
        )
        directions[weight_name] = layer.weight.reshape(grad_weight.shape)
        coefficients[weight_name] = layer.coefficient
        covered.add(weight_name)
        if bias_name is not None and layer.bias is not None:
            directions[bias_name] = layer.bias.reshape(params[bias_name].shape)
            covered.add(bias_name)
    return directions, coefficients, covered


# Checks at the public boundary. They read only names and shapes, so in compiled code they
# run while tracing and add nothing to the graph.


def _check_config(config: object) -> None:
    if not isinstance(config, MACConfig):
        raise TypeError(f"Invalid config of type {type(config).__name__}: expected macfn.MACConfig.")


def _check_groups(params: Mapping[str, Tensor], config: MACConfig) -> None:
    unknown = sorted(name for group in config.base_updates for name in group.params if name not in params)
    if unknown:
        raise ValueError(
            f"Invalid base_updates: no parameter named {', '.join(map(repr, unknown))}; groups name keys of params "
            "(model.named_parameters() names)."
        )


def _check_lr(rate: object) -> None:
    if isinstance(rate, Tensor):
        if rate.dim() != 0 or not rate.is_floating_point():
            raise ValueError(
                f"Invalid lr tensor of shape {tuple(rate.shape)} and dtype {rate.dtype}: expected a 0-dim floating "
                "tensor, e.g. torch.tensor(0.1)."
            )
        return
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"Invalid lr={rate!r}: the learning rate must be a finite number >= 0, e.g. 0.1.")


def _check_grads(params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None]) -> None:
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise ValueError(
            f"Invalid grads: no parameter named {', '.join(map(repr, unknown))}; valid names are the keys of "
            "params (model.named_parameters() names)."
        )
    missing = sorted(set(params) - set(grads))
    if missing:
        raise ValueError(
            f"Missing grads for {', '.join(map(repr, missing))}: pass a gradient for every parameter, or None to "
            "leave a parameter unchanged."
        )
    for name, g in grads.items():
        if g is not None and g.shape != params[name].shape:
            raise ValueError(
                f"Invalid grads['{name}'] of shape {tuple(g.shape)}: the parameter has shape "
                f"{tuple(params[name].shape)}."
            )
        if g is not None and g.dtype != params[name].dtype:
            raise ValueError(
                f"Invalid grads['{name}'] of dtype {g.dtype}: the parameter has dtype {params[name].dtype}; cast "
                "the gradient with .to(param.dtype) so that the update keeps the parameter's dtype."
            )


def _check_stats(params: Mapping[str, Tensor], stats: Mapping[str, Tensor]) -> None:
    for name, batch_mean in stats.items():
        weight = params.get(name)
        if weight is None:
            raise ValueError(
                f"Invalid stats: no parameter named '{name}'; statistics are keyed by the weight names that "
                "macfn.grad_and_stats returns, which must be keys of params. For a frozen layer, keep its "
                "parameters in params with a None gradient, or drop its statistics."
            )
        if batch_mean.dim() != 2 or weight.dim() < 2:
            raise ValueError(
                f"Invalid stats['{name}'] of shape {tuple(batch_mean.shape)} for a parameter of shape "
                f"{tuple(weight.shape)}: expected [blocks, d] statistics for a weight with at least 2 dimensions."
            )
        blocks, d = batch_mean.shape
        row_length = weight[0].numel() if weight.shape[0] else 0
        if blocks == 0 or weight.shape[0] % blocks:
            raise ValueError(
                f"Invalid stats['{name}'] with {blocks} blocks: the weight's {weight.shape[0]} output rows must "
                "split into that many equal blocks."
            )
        if d == row_length + 1:
            bias_name = bias_name_for(name)
            bias = params.get(bias_name)
            if bias is None or bias.numel() != weight.shape[0]:
                raise ValueError(
                    f"Invalid stats['{name}'] of shape {tuple(batch_mean.shape)}: its last column is a bias input, "
                    f"but params has no bias '{bias_name}' with {weight.shape[0]} entries."
                )
        elif d != row_length:
            raise ValueError(
                f"Invalid stats['{name}'] of shape {tuple(batch_mean.shape)}: a weight of shape "
                f"{tuple(weight.shape)} needs {row_length} columns ({row_length + 1} with a bias)."
            )


def _check_state(params: Mapping[str, Tensor], state: MACState, config: MACConfig) -> None:
    expected_keys = {"step", "skipped", "momentum", "mean_activation", "stat_count"}
    _check_groups(params, config)
    adamw = set(config.adamw_params())
    if adamw:
        expected_keys |= {"exp_avg", "exp_avg_sq"}
    if not isinstance(state, Mapping) or set(state) != expected_keys:
        found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"Invalid state with keys {found}: expected the dict made by macfn.init with the same config "
            f"(keys {sorted(expected_keys)})."
        )
    for key in ("exp_avg", "exp_avg_sq") if adamw else ():
        moments = state[key]  # type: ignore[literal-required]
        if set(moments) != adamw:
            raise ValueError(
                f"Invalid state['{key}'] for {sorted(moments)}: the config's AdamW groups hold {sorted(adamw)}; "
                "build the state with macfn.init from the same params and config."
            )
    if config.momentum > 0:
        missing = sorted(set(params) - adamw - set(state["momentum"]))
        unexpected = sorted(set(state["momentum"]) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"Invalid state: momentum buffers are missing for {missing} and unexpected for {unexpected}; "
                "build the state with macfn.init from the same params."
            )
        for name, buffer in state["momentum"].items():
            if not isinstance(buffer, Tensor) or buffer.shape != params[name].shape:
                buffer_shape = tuple(buffer.shape) if isinstance(buffer, Tensor) else type(buffer).__name__
                raise ValueError(
                    f"Invalid state['momentum']['{name}'] of shape {buffer_shape}: the parameter has shape "
                    f"{tuple(params[name].shape)}; the state belongs to another model."
                )
    for key in ("step", "skipped"):
        if not isinstance(state[key], Tensor) or state[key].dim() != 0:  # type: ignore[literal-required]
            raise ValueError(f"Invalid state['{key}']: expected a 0-dim int64 tensor as macfn.init makes it.")
    if set(state["stat_count"]) != set(state["mean_activation"]):
        raise ValueError(
            f"Invalid state: stat_count has layers {sorted(state['stat_count'])} but mean_activation has "
            f"{sorted(state['mean_activation'])}; build the state with macfn.init."
        )
    _check_stats(params, state["mean_activation"])
