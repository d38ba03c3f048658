"""The optimizers under test, each behind one small interface.

Every variant trains its own deep copy of a workload's model and offers:

* ``train_step(x, y)``: one whole training step (forward, backward, statistics, update);
* ``prepare(x, y)`` then ``optimizer_step()``: the update alone, applied again and again to
  gradients (and statistics) computed once by ``prepare``;
* ``state_tensors()``: every tensor the optimizer keeps between steps;
* ``loss_on(x, y)``: the loss of the current parameters, without a gradient.

The MAC variants declare every :class:`SelfAttention` of the model, so that the value rows
of its fused ``qkv`` layer get the attention-weighted mean activation. All variants share
the base update of MAC: heavy-ball momentum SGD with L2 weight decay
added to the (preconditioned) gradient, which is what ``torch.optim.SGD`` computes with
``dampening=0``. They differ only in the preconditioner:

* ``sgd``, ``sgd-compiled``: none (``torch.optim.SGD(foreach=True)``; the second also runs a
  ``torch.compile``'d model and ``optimizer.step``);
* ``adamw``: ``torch.optim.AdamW(foreach=True)`` instead of the base update;
* ``macfn-eager``, ``macfn-compiled``: the functional MAC step; the compiled variant runs
  ``torch.compile(macfn.step, fullgraph=True)`` as its optimizer step and one compiled
  graph for the whole training step; ``macfn-compiled-nocheck`` is the compiled variant
  with ``nonfinite="ignore"``, which skips the check for NaN and infinity;
* ``macfn-optim``, ``macfn-optim-compiled``: the ``torch.optim`` adapter ``macfn.optim.MAC``
  (``compile=False`` and ``compile=True``), when it is installed;
* ``dense-mac``: MAC with the explicit ``d x d`` matrix ``I - abar abar^T / (rho + |abar|^2)``
  multiplied into every gradient, as the authors' code does;
* ``kfac``: KFAC from curvlinops-for-pytorch, factors and inverses refreshed every
  ``refresh_period`` steps.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

import macfn

from .models import SelfAttention, Workload, cross_entropy

REFRESH_PERIOD = 10
"""Steps between KFAC factor and inverse refreshes; every timed block spans this many steps."""

KFAC_DAMPING = 0.1
KFAC_FACTOR_DECAY = 0.95
KFAC_LR = 0.01
ADAMW_LR = 1e-3
ADAMW_WEIGHT_DECAY = 1e-2


class Variant(Protocol):
    """The interface every optimizer under test implements."""

    name: str

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """Run one training step on ``(x, y)`` and return the detached loss."""
        ...

    def prepare(self, x: Tensor, y: Tensor) -> None:
        """Compute the gradients (and statistics) that :meth:`optimizer_step` applies."""
        ...

    def optimizer_step(self) -> None:
        """Apply one update with the gradients from :meth:`prepare`."""
        ...

    def state_tensors(self) -> list[Tensor]:
        """Return every tensor the optimizer keeps between steps."""
        ...

    def loss_on(self, x: Tensor, y: Tensor) -> Tensor:
        """Return the loss of the current parameters on ``(x, y)``."""
        ...


def macfn_optim_available() -> bool:
    """Return whether the ``torch.optim`` adapter ``macfn.optim`` is installed."""
    return importlib.util.find_spec("macfn.optim") is not None


def variant_names() -> list[str]:
    """Return every variant name that :func:`build_variant` accepts here."""
    names = ["sgd", "sgd-compiled", "adamw", "macfn-eager", "macfn-compiled", "macfn-compiled-nocheck",
             "macfn-compiled-plain"]
    if macfn_optim_available():
        names += ["macfn-optim", "macfn-optim-compiled"]
    return names + ["dense-mac", "kfac"]


def attention_declarations(model: nn.Module) -> list[macfn.AttentionDeclaration]:
    """Declare every :class:`SelfAttention` of ``model`` so that MAC gives its value rows vbar."""
    return [
        macfn.declare_attention(module, qkv=module.qkv, heads=module.heads, causal=module.causal)
        for module in model.modules() if isinstance(module, SelfAttention)
    ]


def build_variant(name: str, workload: Workload, *, lr: float | None = None,
                  kfac_damping: float = KFAC_DAMPING) -> Variant:
    """Build the named optimizer variant on a fresh copy of ``workload.model``.

    Args:
        name: One of :func:`variant_names`.
        workload: Model, batch and MAC hyperparameters.
        lr: Learning rate; when None, ``workload.config.lr`` (``ADAMW_LR`` for AdamW and
            ``KFAC_LR`` for KFAC, whose steps with the MAC learning rate diverge).
        kfac_damping: Damping of the KFAC variant.

    Returns:
        The variant.

    Raises:
        ValueError: Unknown ``name``.
    """
    model = copy.deepcopy(workload.model)
    config = workload.config if lr is None else workload.config.replace(lr=lr)
    if name in ("sgd", "sgd-compiled"):
        sgd = _sgd(model.parameters(), config)
        return TorchOptimizer(name, model, sgd, compiled=name == "sgd-compiled")
    if name == "adamw":
        adamw = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR if lr is None else lr,
                                  weight_decay=ADAMW_WEIGHT_DECAY, foreach=True)
        return TorchOptimizer(name, model, adamw, compiled=False)
    if name in ("macfn-eager", "macfn-compiled"):
        return FunctionalMAC(name, model, config, compiled=name == "macfn-compiled")
    if name == "macfn-compiled-nocheck":
        return FunctionalMAC(name, model, config.replace(nonfinite="ignore"), compiled=True)
    if name == "macfn-compiled-plain":
        return FunctionalMAC(name, model, config, compiled=True, statistics=False)
    if name in ("macfn-optim", "macfn-optim-compiled"):
        return AdapterMAC(name, model, config, compiled=name == "macfn-optim-compiled")
    if name == "dense-mac":
        return DenseMAC(name, model, config)
    if name == "kfac":
        config = workload.config.replace(lr=KFAC_LR if lr is None else lr)
        return CurvlinopsKFAC(name, model, config, sequence_length=_sequence_length(workload), damping=kfac_damping)
    raise ValueError(f"Unknown variant {name!r}: expected one of {', '.join(variant_names())}.")


_Function = TypeVar("_Function", bound=Callable[..., Any])


def own_code(function: _Function) -> _Function:
    """Return a copy of ``function`` with a code object of its own.

    Dynamo keeps every graph it compiles for one code object in one cache and, on each call,
    evaluates the guards of those graphs one after another until one passes. Three variants
    compile ``macfn.step`` with different configurations. With one shared cache, each call of
    one of them also evaluated the failing guards of the others: about 0.1 ms per call on the
    small GPT, an eighth of SGD's step there. A program that compiles the step with one
    configuration never pays this, so each variant compiles its own copy.
    """
    copied = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                                function.__defaults__, function.__closure__)
    copied.__kwdefaults__ = function.__kwdefaults__
    copied.__qualname__ = function.__qualname__
    copied.__doc__ = function.__doc__
    copied.__module__ = function.__module__
    return copied  # type: ignore[return-value]


def _sgd(params: Iterable[Tensor], config: macfn.MACConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, foreach=True)


def _sequence_length(workload: Workload) -> int:
    return workload.targets.shape[1] if workload.targets.dim() == 2 else 1


class TorchOptimizer:
    """A ``torch.optim`` optimizer driven by ``loss.backward()``."""

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, compiled: bool) -> None:
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.forward: Callable[[Tensor], Tensor] = model
        self.update: Callable[[], Any] = optimizer.step
        if compiled:
            # NOTE: the learning rate becomes a tensor so that a schedule does not recompile.
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(group["lr"])
            self.forward = torch.compile(model)
            self.update = torch.compile(optimizer.step)

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(self.forward(x), y)
        torch.autograd.backward(loss)
        self.update()
        return loss.detach()

    def prepare(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(cross_entropy(self.model(x), y))

    def optimizer_step(self) -> None:
        self.update()

    def state_tensors(self) -> list[Tensor]:
        return _tensors_in(self.optimizer.state_dict()["state"])

    def loss_on(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return cross_entropy(self.model(x), y)


class FunctionalMAC:
    """The pure functional API: ``macfn.grad_and_stats`` and ``macfn.step`` on a params dict.

    With ``statistics=False`` every step is a plain one: gradients from
    ``torch.func.grad_and_value`` and ``stats=None``, so the step reuses the running mean
    activations, as the steps between two statistics refreshes do.
    """

    def __init__(self, name: str, model: nn.Module, config: macfn.MACConfig, *, compiled: bool,
                 statistics: bool = True) -> None:
        self.name = name
        self.statistics = statistics
        self.model = model
        self.config = config
        self.lr = torch.tensor(config.lr)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.compute = macfn.grad_and_stats(model, self._loss, attention=attention_declarations(model))
        self.state: macfn.MACState | None = None
        self.prepared: tuple[dict[str, Tensor], macfn.Stats | None] | None = None
        step: Callable[..., tuple[dict[str, Tensor], macfn.MACState]] = macfn.step
        train: Callable[..., tuple[dict[str, Tensor], macfn.MACState, Tensor]] = self._train
        if compiled:
            step = torch.compile(own_code(macfn.step), fullgraph=True)
            train = torch.compile(own_code(FunctionalMAC._train).__get__(self), fullgraph=True)
        self.step = step
        self.train = train

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return cross_entropy(functional_call(self.model, params, (x,)), y)

    def _train(self, params: dict[str, Tensor], state: macfn.MACState, x: Tensor, y: Tensor,
               lr: Tensor) -> tuple[dict[str, Tensor], macfn.MACState, Tensor]:
        if self.statistics:
            grads, stats, loss = self.compute(params, x, y)
        else:
            grads, loss = torch.func.grad_and_value(self._loss)(params, x, y)
            stats = None
        new_params, new_state = macfn.step(params, grads, stats, state, self.config, lr=lr)
        return new_params, new_state, loss

    def _ensure_state(self, x: Tensor, y: Tensor) -> macfn.MACState:
        if self.state is None:
            stats = self.compute(self.params, x, y)[1]
            self.state = macfn.init(self.params, self.config, stats)
        return self.state

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        state = self._ensure_state(x, y)
        self.params, self.state, loss = self.train(self.params, state, x, y, self.lr)
        return loss

    def prepare(self, x: Tensor, y: Tensor) -> None:
        self._ensure_state(x, y)
        grads, stats, _ = self.compute(self.params, x, y)
        self.prepared = (grads, stats if self.statistics else None)

    def optimizer_step(self) -> None:
        assert self.prepared is not None, "call prepare before optimizer_step"
        grads, stats = self.prepared
        self.params, self.state = self.step(self.params, grads, stats, self.state, self.config, lr=self.lr)

    def state_tensors(self) -> list[Tensor]:
        return _tensors_in(self.state)

    def loss_on(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return self._loss(self.params, x, y)


class AdapterMAC:
    """``macfn.optim.MAC``, the ``torch.optim`` adapter, driven by ``loss.backward()``."""

    def __init__(self, name: str, model: nn.Module, config: macfn.MACConfig, *, compiled: bool) -> None:
        from macfn import optim as macfn_optim

        self.name = name
        self.model = model
        self.optimizer = macfn_optim.MAC(
            model, compile=compiled, recorder_options={"attention": attention_declarations(model)},
            lr=torch.tensor(config.lr) if compiled else config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay, damping=config.damping, stat_decay=config.stat_decay,
        )

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(self.model(x), y)
        torch.autograd.backward(loss)
        self.optimizer.step()
        return loss.detach()

    def prepare(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(cross_entropy(self.model(x), y))

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def state_tensors(self) -> list[Tensor]:
        return _tensors_in(self.optimizer.state_dict()["state"])

    def loss_on(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return cross_entropy(self.model(x), y)


class DenseMAC:
    """MAC with an explicit ``d x d`` preconditioner per layer, the authors' formulation.

    The mean activations come from :class:`macfn.StatsRecorder`, with the same running
    average and bias correction as :func:`macfn.step`. Each step rebuilds, for every
    preconditioned layer, ``P = I - abar abar^T / (rho + |abar|^2)`` (``[blocks, d, d]``) and
    replaces the gradient rows ``G`` (``[blocks, rows, d]``) by ``G P``; then
    ``torch.optim.SGD`` takes the momentum step. This is the same update as macfn's, at
    ``O(rows * d^2)`` work and ``O(d^2)`` memory per layer.
    """

    def __init__(self, name: str, model: nn.Module, config: macfn.MACConfig) -> None:
        self.name = name
        self.model = model
        self.config = config
        self.recorder = macfn.StatsRecorder(model, training_only=True, attention=attention_declarations(model))
        self.params = dict(model.named_parameters())
        self.optimizer = _sgd(model.parameters(), config)
        self.running: dict[str, Tensor] = {}
        self.count = 0
        self.matrices: dict[str, Tensor] = {}
        self.prepared: tuple[dict[str, Tensor], macfn.Stats] | None = None

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, macfn.Stats]:
        self.optimizer.zero_grad(set_to_none=True)
        self.recorder.start()
        try:
            loss = cross_entropy(self.model(x), y)
        finally:
            stats = self.recorder.stop()
        torch.autograd.backward(loss)
        return loss.detach(), stats

    def _precondition(self, grads: dict[str, Tensor], stats: macfn.Stats) -> None:
        """Write ``G P`` into every ``.grad`` of a preconditioned layer."""
        decay = self.config.stat_decay
        self.count += 1
        correction = 1.0 - decay ** self.count
        for weight_name, spec in self.recorder.layers.items():
            batch_mean = stats[weight_name]
            running = self.running.get(weight_name, torch.zeros_like(batch_mean))
            running = running * decay + batch_mean * (1.0 - decay)
            self.running[weight_name] = running
            abar = running / correction

            # Step 1: P = I - abar abar^T / (rho + |abar|^2) -> [blocks, d, d].
            blocks, d = abar.shape
            scale = 1.0 / (self.config.damping + (abar * abar).sum(dim=1))
            outer = abar[:, :, None] * abar[:, None, :] * scale[:, None, None]
            matrix = torch.eye(d, dtype=abar.dtype, device=abar.device).expand(blocks, d, d) - outer
            self.matrices[weight_name] = matrix

            # Step 2: G P on the rows [weight | bias] -> [blocks, rows, d].
            weight_grad = grads[weight_name]
            out_rows = weight_grad.shape[0]
            rows = weight_grad.reshape(out_rows, -1)
            if spec.bias is not None:
                rows = torch.cat([rows, grads[spec.bias].reshape(out_rows, 1)], dim=1)
            result = torch.bmm(rows.reshape(blocks, out_rows // blocks, d), matrix).reshape(out_rows, d)
            if spec.bias is not None:
                self.params[spec.bias].grad = result[:, -1].reshape(self.params[spec.bias].shape)
                result = result[:, :-1]
            self.params[weight_name].grad = result.reshape(weight_grad.shape)

    def _raw_grads(self) -> dict[str, Tensor]:
        return {n: p.grad for n, p in self.params.items() if p.grad is not None}

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        loss, stats = self._forward_backward(x, y)
        self._precondition(self._raw_grads(), stats)
        self.optimizer.step()
        return loss

    def prepare(self, x: Tensor, y: Tensor) -> None:
        _, stats = self._forward_backward(x, y)
        self.prepared = (self._raw_grads(), stats)

    def optimizer_step(self) -> None:
        assert self.prepared is not None, "call prepare before optimizer_step"
        grads, stats = self.prepared
        self._precondition(grads, stats)
        self.optimizer.step()

    def state_tensors(self) -> list[Tensor]:
        return (_tensors_in(self.optimizer.state_dict()["state"]) + list(self.running.values())
                + list(self.matrices.values()))

    def loss_on(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return cross_entropy(self.model(x), y)


class _FlattenLogits(nn.Module):
    """Present ``[N, T, classes]`` logits as ``[N * T, classes]``, the layout curvlinops expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x)
        return out.reshape(-1, out.shape[-1])


class CurvlinopsKFAC:
    """KFAC built from curvlinops-for-pytorch's operators, applied before a momentum step.

    Every ``refresh_period`` steps, ``KFACLinearOperator`` computes the Kronecker factors
    ``A = E[a a^T]`` and ``P = E[g g^T]`` on the current batch. That costs one extra forward
    pass and one backward pass with labels sampled from the model (the Monte-Carlo Fisher).
    The factors enter a running average with weight ``KFAC_FACTOR_DECAY`` on the old value.
    ``KFACInverseLinearOperator`` then inverts them by damped Cholesky factorisation, with the
    damping split between the factors by the heuristic of Martens and Grosse (2015). Every
    step multiplies the nn.Linear and nn.Conv2d gradients by the cached inverse, then
    ``torch.optim.SGD`` takes the momentum step. Every other parameter gets plain SGD.
    """

    def __init__(self, name: str, model: nn.Module, config: macfn.MACConfig, *, sequence_length: int,
                 damping: float = KFAC_DAMPING, refresh_period: int = REFRESH_PERIOD) -> None:
        self.name = name
        self.model = model
        self.sequence_length = sequence_length
        self.damping = damping
        self.refresh_period = refresh_period
        self.optimizer = _sgd(model.parameters(), config)
        self.curvature_model = _FlattenLogits(model) if sequence_length > 1 else model
        self.kfac_params = [
            p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            for p in m.parameters(recurse=False) if p.requires_grad
        ]
        self.steps = 0
        self.operator: Any = None
        self.inverse: Any = None
        self.prepared: tuple[list[Tensor], Tensor, Tensor] | None = None

    def _refresh(self, x: Tensor, y: Tensor) -> None:
        """Recompute the Kronecker factors on ``(x, y)``, average them in and invert them."""
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

        operator = KFACLinearOperator(
            self.curvature_model, nn.CrossEntropyLoss(), self.kfac_params, [(x, y.reshape(-1))],
            check_deterministic=False, num_data=x.shape[0], num_per_example_loss_terms=self.sequence_length,
            separate_weight_and_bias=False,
        )
        operator.compute_kronecker_factors()
        if self.operator is not None:
            # NOTE: curvlinops keeps no running average of the factors, so this blends the
            # previous factors into the new operator's own dictionaries.
            decay = KFAC_FACTOR_DECAY
            for factors, old in ((operator._input_covariances, self.operator._input_covariances),
                                 (operator._gradient_covariances, self.operator._gradient_covariances)):
                for key in factors:
                    factors[key].mul_(1.0 - decay).add_(old[key], alpha=decay)
        self.operator = operator
        self.inverse = KFACInverseLinearOperator(operator, damping=self.damping, use_heuristic_damping=True)

    def _apply(self, grads: Sequence[Tensor], x: Tensor, y: Tensor) -> None:
        if self.steps % self.refresh_period == 0:
            self._refresh(x, y)
        self.steps += 1
        preconditioned = self.inverse @ list(grads)
        for param, direction in zip(self.kfac_params, preconditioned):
            param.grad = direction
        self.optimizer.step()

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(self.model(x), y)
        torch.autograd.backward(loss)
        self._apply([_grad_of(p) for p in self.kfac_params], x, y)
        return loss.detach()

    def prepare(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(cross_entropy(self.model(x), y))
        self.prepared = ([_grad_of(p) for p in self.kfac_params], x, y)

    def optimizer_step(self) -> None:
        assert self.prepared is not None, "call prepare before optimizer_step"
        grads, x, y = self.prepared
        self._apply(grads, x, y)

    def state_tensors(self) -> list[Tensor]:
        tensors = _tensors_in(self.optimizer.state_dict()["state"])
        if self.operator is not None:
            tensors += list(self.operator._input_covariances.values())
            tensors += list(self.operator._gradient_covariances.values())
            tensors += [t for t in self.inverse._inverse_input_covariances.values() if t is not None]
            tensors += [t for t in self.inverse._inverse_gradient_covariances.values() if t is not None]
        return tensors

    def loss_on(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return cross_entropy(self.model(x), y)


def _grad_of(param: Tensor) -> Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


def _tensors_in(tree: object) -> list[Tensor]:
    """Return the tensors in nested dicts, lists and tuples, each storage once."""
    found: dict[int, Tensor] = {}

    def visit(node: object) -> None:
        if isinstance(node, Tensor):
            found.setdefault(node.untyped_storage().data_ptr(), node)
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(tree)
    return list(found.values())


def state_bytes(variant: Variant) -> int:
    """Return the bytes of every tensor the variant's optimizer keeps between steps."""
    return sum(t.untyped_storage().nbytes() for t in variant.state_tensors())


def parameter_bytes(workload: Workload) -> int:
    """Return the bytes of the workload's parameters."""
    return sum(p.numel() * p.element_size() for p in workload.model.parameters())


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Return the cosine-decayed learning rate of ``step`` out of ``total``."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * step / total))
