"""Capture of per-layer mean activations during a ``torch.func`` gradient computation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import _attention, _kernels

LayerKind = Literal["linear", "conv2d"]
Stats = dict[str, Tensor]
"""Mean activations keyed by weight name: ``{weight_name: [blocks, d]}`` in float32 (float64 for
float64 inputs), with a trailing 1 in each row when the layer's bias is preconditioned with it."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One preconditioned weight and how its mean activation is formed.

    Attributes:
        weight: Name of the weight in ``model.named_parameters()``; the key of its statistics.
        bias: Name of the bias that shares the weight's preconditioner, or None.
        kind: ``"linear"`` or ``"conv2d"``.
        blocks: Row blocks with their own mean activation (a convolution's groups, else 1).
    """

    weight: str
    bias: str | None
    kind: LayerKind
    blocks: int


def find_layers(model: nn.Module) -> tuple[dict[str, LayerSpec], dict[nn.Module, str]]:
    """Find the nn.Linear and nn.Conv2d layers of ``model`` that MAC preconditions.

    A weight shared by several modules gets one entry. Its bias joins the preconditioner only
    when every module that uses the weight has that same bias and the bias is named as
    :func:`bias_name_for` expects; otherwise biases get the base update.

    Returns:
        ``(layers, owners)``: the specs keyed by weight name, and the weight name of every
        module whose forward pass contributes statistics.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    uses: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        weight = module.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"Invalid layer {type(module).__name__}: its parameters are not initialised yet; run one "
                "forward pass before building the MAC statistics capture."
            )
        if id(weight) not in names:
            continue
        uses.setdefault(names[id(weight)], []).append(module)

    layers: dict[str, LayerSpec] = {}
    owners: dict[nn.Module, str] = {}
    for weight_name, modules in uses.items():
        kinds = {"conv2d" if isinstance(m, nn.Conv2d) else "linear" for m in modules}
        groups = {m.groups if isinstance(m, nn.Conv2d) else 1 for m in modules}
        if len(kinds) > 1 or len(groups) > 1:
            raise ValueError(
                f"Invalid weight sharing for '{weight_name}': it is used by layers of different kinds or "
                f"groups ({sorted(kinds)}, groups {sorted(groups)}); MAC needs one layout per weight."
            )
        biases = {id(m.bias) if m.bias is not None else None for m in modules}
        bias_name: str | None = None
        bias = modules[0].bias
        if len(biases) == 1 and bias is not None and names.get(id(bias)) == bias_name_for(weight_name):
            bias_name = bias_name_for(weight_name)
        layers[weight_name] = LayerSpec(weight_name, bias_name, kinds.pop(), groups.pop())  # type: ignore[arg-type]
        for module in modules:
            owners[module] = weight_name
    return layers, owners


def bias_name_for(weight_name: str) -> str:
    """Return the bias name that pairs with ``weight_name`` (the last "weight" becomes "bias").

    ``"fc.weight" -> "fc.bias"``, ``"attn.in_proj_weight" -> "attn.in_proj_bias"``.
    """
    head, sep, tail = weight_name.rpartition("weight")
    if not sep:
        return weight_name + ".bias"
    return head + "bias" + tail


def _conv2d_patch_sum(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, int]:
    kernel = (module.kernel_size[0], module.kernel_size[1])
    dilation = (module.dilation[0], module.dilation[1])
    padding = _kernels.conv2d_padding(module.padding, kernel, dilation)  # type: ignore[arg-type]
    return _kernels.conv2d_patch_sum(
        x,
        kernel_size=kernel,
        stride=(module.stride[0], module.stride[1]),
        padding=padding,
        dilation=dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
    )


def _reduce(layers: Mapping[str, LayerSpec], buffer: Mapping[str, list[tuple[Tensor, int | Tensor]]]) -> Stats:
    """Average every layer's sums over all its calls and append the bias input 1.

    A count is an int, or a tensor (``[]`` or ``[blocks, 1]``) where it depends on the data,
    as for attention rows left out by a mask.
    """
    stats: Stats = {}
    for weight_name, calls in buffer.items():
        count: int | Tensor = 0
        for _, partial_count in calls:
            count = count + partial_count
        total = calls[0][0]
        for partial, _ in calls[1:]:
            total = total + partial
        # NOTE: a tensor count is clamped with a tensor op, because max() would read its value and break the graph.
        mean = total / (count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1))
        if layers[weight_name].bias is not None:
            mean = _kernels.append_bias_column(mean)
        stats[weight_name] = mean
    return stats


class StatsRecorder:
    """Forward hooks that record mean activations of a model's preconditioned layers.

    The hooks are registered once, when the recorder is built, and record only between
    :meth:`start` and :meth:`stop`; every other forward pass runs them as no-ops and is
    otherwise untouched. The recorded tensors leave the recorder in :meth:`stop`, so none
    outlives a ``torch.func`` transform that wraps the forward pass.

    Every nn.MultiheadAttention, and every custom attention module declared with
    :func:`macfn.declare_attention`, gives its value projection the attention-weighted mean
    activation (see ``docs/transformers.md``): a packed ``in_proj_weight`` or fused qkv layer
    gets ``[3, d]`` statistics with rows ``(abar, abar, vbar)``.

    Args:
        model: The module whose nn.Linear and nn.Conv2d layers are preconditioned.
        training_only: Record only calls made in training mode with gradients enabled,
            so that evaluation passes inside a recording add nothing.
        attention: Declarations of custom attention modules.
        attention_weighting: Weight the value rows' mean by the attention probabilities;
            False gives them the ordinary mean (an ablation).
        attention_mean: ``"paired"`` (each sample's probabilities with its own tokens) or
            ``"factored"`` (the paper's ``Xbar^T sbar``, batch averaged first).
        attention_query_chunk: Queries per chunk when probabilities are recomputed; None
            takes all queries at once, one ``B x heads x N x N`` temporary per layer call.

    Raises:
        ValueError: An invalid attention option or declaration.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        training_only: bool = False,
        attention: Iterable[_attention.AttentionDeclaration] = (),
        attention_weighting: bool = True,
        attention_mean: _attention.AttentionMean = "paired",
        attention_query_chunk: int | None = None,
    ) -> None:
        self.layers, owners = find_layers(model)
        self.training_only = training_only
        self._buffer: dict[str, list[tuple[Tensor, int | Tensor]]] | None = None
        options = _attention.AttentionOptions(attention_weighting, attention_mean, attention_query_chunk)
        plan = _attention.plan_attention(
            model, owners, {name: spec.bias for name, spec in self.layers.items()}, attention, options,
            self._recording_buffer, bias_name_for,
        )
        for weight_name, (bias_name, blocks) in plan.specs.items():
            self.layers[weight_name] = LayerSpec(weight_name, bias_name, "linear", blocks)
        self._handles = [
            module.register_forward_hook(self._make_hook(weight_name))
            for module, weight_name in owners.items()
            if module not in plan.claimed
        ]
        self._handles += [
            module.register_forward_hook(hook, with_kwargs=with_kwargs) for module, hook, with_kwargs in plan.hooks
        ]
        self._attention_resets = plan.resets

    @property
    def recording(self) -> bool:
        """Whether the recorder is between :meth:`start` and :meth:`stop`."""
        return self._buffer is not None

    def start(self) -> None:
        """Begin recording; every call of a preconditioned layer adds to the statistics."""
        if self._buffer is not None:
            raise RuntimeError("StatsRecorder.start was called twice without stop; recordings cannot nest.")
        self._buffer = {}

    def stop(self) -> Stats:
        """End recording and return the mean activation of every layer called since :meth:`start`.

        A layer called several times is averaged over all rows of all calls.
        """
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            raise RuntimeError("StatsRecorder.stop was called without start.")
        for reset in self._attention_resets:
            reset()
        return _reduce(self.layers, buffer)

    def remove(self) -> None:
        """Detach the hooks from the model; later recordings return empty statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recording_buffer(self, module: nn.Module) -> dict[str, list[tuple[Tensor, int | Tensor]]] | None:
        """Return the buffer that a call of ``module`` records into, or None when it records nothing."""
        buffer = self._buffer
        if buffer is None:
            return None
        if self.training_only and not (module.training and torch.is_grad_enabled()):
            return None
        return buffer

    def _make_hook(self, weight_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            buffer = self._buffer
            if buffer is None:
                return None
            if self.training_only and not (module.training and torch.is_grad_enabled()):
                return None
            x = args[0].detach()
            if isinstance(module, nn.Conv2d):
                total, count = _conv2d_patch_sum(module, x)
            else:
                total, count = _kernels.linear_input_sum(x)
            buffer.setdefault(weight_name, []).append((total, count))
            return None

        return hook


class GradAndStats:
    """Callable ``(params, *args) -> (grads, stats, loss)`` made by :func:`grad_and_stats`.

    It owns a :class:`StatsRecorder`, whose hooks record only while this object is being
    called. :meth:`remove` detaches them. The keyword arguments after ``has_aux`` are passed
    to the :class:`StatsRecorder`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any],
        *,
        has_aux: bool = False,
        attention: Iterable[_attention.AttentionDeclaration] = (),
        attention_weighting: bool = True,
        attention_mean: _attention.AttentionMean = "paired",
        attention_query_chunk: int | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.has_aux = has_aux
        self.recorder = StatsRecorder(
            model,
            attention=attention,
            attention_weighting=attention_weighting,
            attention_mean=attention_mean,
            attention_query_chunk=attention_query_chunk,
        )

    @property
    def layers(self) -> dict[str, LayerSpec]:
        """The preconditioned layers, keyed by weight name."""
        return self.recorder.layers

    def __call__(self, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Compute gradients, mean activations and the loss in one forward and backward pass.

        Args:
            params: Parameters keyed by ``model.named_parameters()`` names.
            *args, **kwargs: Passed on to ``loss_fn(params, *args, **kwargs)``.

        Returns:
            ``(grads, stats, loss)``, or ``(grads, stats, loss, aux)`` when ``has_aux`` is set:
            ``grads`` keyed like ``params``, ``stats`` keyed by weight name (``[blocks, d]``),
            ``loss`` detached.
        """
        recorder = self.recorder

        def objective(p: dict[str, Tensor]) -> tuple[Tensor, tuple[Any, ...]]:
            recorder.start()
            try:
                result = self.loss_fn(p, *args, **kwargs)
            finally:
                stats = recorder.stop()
            loss, aux = result if self.has_aux else (result, None)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                hint = "as the first element of (loss, aux)" if self.has_aux else "or set has_aux=True for (loss, aux)"
                raise ValueError(
                    f"Invalid loss_fn output of type {type(loss).__name__}: expected a scalar loss tensor {hint}."
                )
            # torch.func unwraps only tensors in the auxiliary output, so aux joins it only when set.
            extra = (aux,) if self.has_aux else ()
            return loss, (loss.detach(), stats, *extra)

        try:
            grads, outputs = torch.func.grad(objective, has_aux=True)(dict(params))
        except RuntimeError as error:
            if "mutate a captured Tensor" not in str(error):
                raise
            raise RuntimeError(
                "The model updates a buffer in place during the forward pass (BatchNorm in training mode "
                "updates running_mean, running_var and num_batches_tracked), which torch.func.grad does not "
                "allow. Use batch statistics only with torch.func.replace_all_batch_norm_modules_(model), "
                "put the model in eval mode, or train with macfn.optim.MAC, which runs ordinary autograd."
            ) from error
        return (grads, outputs[1], outputs[0], *outputs[2:])

    def remove(self) -> None:
        """Detach the forward hooks from the model."""
        self.recorder.remove()


def grad_and_stats(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    attention: Iterable[_attention.AttentionDeclaration] = (),
    attention_weighting: bool = True,
    attention_mean: _attention.AttentionMean = "paired",
    attention_query_chunk: int | None = None,
) -> GradAndStats:
    """Build a function that returns gradients and MAC statistics of ``loss_fn``.

    ``loss_fn(params, *args)`` must run the model through
    ``torch.func.functional_call(model, params, ...)`` and return a scalar loss (or
    ``(loss, aux)`` with ``has_aux=True``).

    Example:
        >>> compute = macfn.grad_and_stats(model, loss_fn)
        >>> grads, stats, loss = compute(params, x, y)

    Args:
        model: The module whose nn.Linear and nn.Conv2d layers are preconditioned.
        loss_fn: The torch.func-style loss.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is returned last.
        attention: Custom attention modules from :func:`macfn.declare_attention`;
            nn.MultiheadAttention is covered without one.
        attention_weighting: Give value projections the attention-weighted mean activation
            (True), or the ordinary mean of their inputs (False, an ablation).
        attention_mean: ``"paired"`` or ``"factored"``, see :class:`StatsRecorder`.
        attention_query_chunk: Queries per chunk when attention probabilities are recomputed.

    Returns:
        A :class:`GradAndStats`, callable as ``(params, *args) -> (grads, stats, loss)``.
    """
    return GradAndStats(
        model,
        loss_fn,
        has_aux=has_aux,
        attention=attention,
        attention_weighting=attention_weighting,
        attention_mean=attention_mean,
        attention_query_chunk=attention_query_chunk,
    )
