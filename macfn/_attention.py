"""Attention-weighted mean activations for the value projections of attention blocks.

An attention head reads its values through the softmax probabilities ``S`` (``[Nq, Nk]`` per
sample and head): ``O = S X W_V^T`` for value-side inputs ``X`` (``[Nk, d]``), so the value
projection's weight gradient is ``dL/dW_V = (dL/dO)^T (S X)``. The rows of ``S X`` are the
inputs that ``W_V`` effectively multiplies, and MAC's mean activation for the value rows is
their mean,

    vbar = (1 / count) * sum over samples b, heads h and valid queries q of  sum_k S[b,h,q,k] X[b,k]

with ``count`` the number of (b, h, q) rows summed. Seung, Lee and Ko (2025, arXiv 2506.08464)
write it as ``vbar = Xbar^T sbar`` with ``Xbar`` the batch mean of ``X`` and ``sbar`` the
probability each key receives, averaged over batch, heads and queries. The two agree when the
batch has one sample or every sample has the same attention pattern. ``attention_mean="paired"``
(the default) pairs each sample's probabilities with that sample's tokens, and
``attention_mean="factored"`` averages first, as the paper writes it.

The query and key rows keep the ordinary mean activation. Probabilities are recomputed from the
captured projections only while statistics are recorded, in query chunks (see
:func:`attention_key_weights` for the memory bound), so models that call
``F.scaled_dot_product_attention`` and never materialise probabilities are covered.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _kernels

AttentionMean = Literal["paired", "factored"]
ATTENTION_MEANS: tuple[AttentionMean, ...] = ("paired", "factored")

MaskSource = str | Callable[[tuple[Any, ...], dict[str, Any]], Tensor | None]
"""The source of a declared module's mask at call time: the name of a keyword argument of the
module's ``forward``, or a function ``(args, kwargs) -> mask or None`` of its call arguments."""

Record = tuple[Tensor, "int | Tensor"]
"""One call's contribution to a weight's statistics: ``(row sum [blocks, d], row count)``."""


class _Sink(Protocol):
    def __call__(self, module: nn.Module) -> dict[str, list[Record]] | None: ...


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionDeclaration:
    """A custom attention module and the projections whose statistics it determines.

    Made by :func:`declare_attention`; see there for the fields.
    """

    module: nn.Module
    heads: int
    qkv: nn.Linear | None
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    causal: bool
    attn_mask: MaskSource | None
    key_padding_mask: MaskSource | None
    scale: float | None
    batch_first: bool

    @property
    def layout(self) -> Literal["fused", "separate"]:
        """``"fused"`` for one qkv layer, ``"separate"`` for three."""
        return "fused" if self.qkv is not None else "separate"


def declare_attention(
    module: nn.Module,
    *,
    heads: int,
    qkv: nn.Linear | None = None,
    q: nn.Linear | None = None,
    k: nn.Linear | None = None,
    v: nn.Linear | None = None,
    causal: bool = False,
    attn_mask: MaskSource | None = None,
    key_padding_mask: MaskSource | None = None,
    scale: float | None = None,
    batch_first: bool = True,
) -> AttentionDeclaration:
    """Declare a custom attention module so that its value projection gets the attention-weighted mean.

    nn.MultiheadAttention (alone or inside nn.TransformerEncoderLayer / DecoderLayer) is found
    by type and needs no declaration. Every other attention module is declared once and passed
    to :func:`macfn.grad_and_stats` (or :class:`macfn.StatsRecorder`) as ``attention=[...]``::

        attention = [macfn.declare_attention(b.attn, qkv=b.attn.qkv, heads=4, causal=True) for b in model.blocks]
        compute = macfn.grad_and_stats(model, loss_fn, attention=attention)

    The projections are nn.Linear layers called inside ``module.forward``, once per call of the
    module, on inputs of shape ``[B, N, d]`` (``[N, B, d]`` with ``batch_first=False``). Any
    further leading dimensions are flattened into the batch. A projection called outside the
    module's forward while statistics are recorded is attributed to the module's next call, or
    dropped when the recording stops. Their outputs are split into heads as
    ``out.view(B, N, heads, head_dim)``. A fused ``qkv`` layer has ``3 * E`` outputs ordered
    ``[q | k | v]`` (timm ViT, nanoGPT); its statistics are ``[3, d (+1)]`` with rows
    ``(abar, abar, vbar)``. Separate layers get ``[1, d (+1)]`` each, ``vbar`` for ``v``.

    Masks follow the torch conventions of the functions they usually feed: ``attn_mask`` as in
    ``F.scaled_dot_product_attention`` (bool True = may attend, or a float added to the scores,
    broadcastable to ``[B, heads, Nq, Nk]``), ``key_padding_mask`` as in nn.MultiheadAttention
    (``[B, Nk]``, bool True = padding). Padded tokens are left out of every mean of the block,
    and when the query and key sequences have the same length, padded positions are left out
    as queries too.

    Args:
        module: The attention module; its forward hook reads the call's masks.
        heads: Number of attention heads, >= 1.
        qkv: A fused projection with ``3 * E`` outputs; give either this or ``q``, ``k`` and ``v``.
        q, k, v: Separate projections (``q`` and ``k`` with equal outputs).
        causal: The module applies a causal mask (query i attends keys 0..i, as
            ``F.scaled_dot_product_attention(is_causal=True)`` does).
        attn_mask: Where the call's attention mask comes from, or None for no mask.
        key_padding_mask: Where the call's key padding mask comes from, or None.
        scale: Score scale; None uses ``1 / sqrt(head_dim)``.
        batch_first: The projections' inputs are ``[B, N, d]`` (else ``[N, B, d]``).

    Returns:
        An :class:`AttentionDeclaration`. Nothing is registered until a recorder is built with it.

    Raises:
        ValueError: A projection that is not an nn.Linear, a layout that is neither fused nor
            separate, output sizes that do not split into the heads, or an invalid option.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"Invalid module of type {type(module).__name__}: expected the attention nn.Module.")
    if isinstance(module, nn.MultiheadAttention):
        raise ValueError(
            "Invalid declaration of an nn.MultiheadAttention: macfn finds those by type and needs no declaration; "
            "remove it from attention=[...]."
        )
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"Invalid heads={heads!r}: expected the number of attention heads, an integer >= 1.")
    separate = (q, k, v)
    if qkv is not None and any(layer is not None for layer in separate):
        raise ValueError("Invalid projections: give either qkv= (fused layout) or q=, k= and v= (separate), not both.")
    if qkv is None and any(layer is None for layer in separate):
        raise ValueError(
            "Missing projections: give qkv= for a fused layer with 3 * E outputs, or all of q=, k= and v=."
        )
    for role, layer in (("qkv", qkv), ("q", q), ("k", k), ("v", v)):
        if layer is not None and not isinstance(layer, nn.Linear):
            raise ValueError(
                f"Invalid {role}= of type {type(layer).__name__}: expected the nn.Linear that computes that "
                "projection."
            )
    if qkv is not None:
        _check_heads("qkv", qkv.out_features, heads, parts=3)
    else:
        assert q is not None and k is not None and v is not None
        if q.out_features != k.out_features:
            raise ValueError(
                f"Invalid q= and k= with {q.out_features} and {k.out_features} outputs: query and key "
                "projections must have the same width."
            )
        _check_heads("q", q.out_features, heads, parts=1)
        _check_heads("v", v.out_features, heads, parts=1)
    if not isinstance(causal, bool):
        raise ValueError(f"Invalid causal={causal!r}: expected True or False.")
    if not isinstance(batch_first, bool):
        raise ValueError(f"Invalid batch_first={batch_first!r}: expected True or False.")
    for name, source in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if source is not None and not isinstance(source, str) and not callable(source):
            raise ValueError(
                f"Invalid {name}={source!r}: expected the name of a keyword argument of the module's forward, a "
                "function (args, kwargs) -> mask, or None."
            )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"Invalid scale={scale!r}: expected a finite number > 0, or None for 1 / sqrt(head_dim).")
    return AttentionDeclaration(
        module, heads, qkv, q, k, v, causal, attn_mask, key_padding_mask,
        None if scale is None else float(scale), batch_first,
    )


def _check_heads(role: str, out_features: int, heads: int, *, parts: int) -> None:
    if out_features % (parts * heads):
        split = f"3 * heads = {3 * heads}" if parts == 3 else f"heads = {heads}"
        raise ValueError(
            f"Invalid {role}= with {out_features} outputs: they must split into {split} equal parts; check heads=."
        )


def attention_key_weights(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    query_padding_mask: Tensor | None = None,
    query_chunk: int | None = None,
) -> Tensor:
    """Sum the softmax probability that each key receives over the valid queries.

    ``S = softmax(scale * q k^T + masks)`` is formed for ``query_chunk`` queries at a time and
    reduced over them at once. A query row counts when its position is not padded and at least
    one key is allowed. Each counted row sums to 1, so ``weights.sum()`` is the number of
    counted (sample, head, query) rows, and ``sbar = weights.sum((0, 1)) / weights.sum()``.

    Memory: besides its ``[B, H, Nk]`` result, a chunk keeps one ``[B, H, c, Nk]`` tensor in
    the accumulation dtype, ``c = query_chunk``, which the masks, the shift and the exponential
    overwrite in place. The default ``c = Nq`` makes that one ``B x H x Nq x Nk`` tensor, the
    size of the layer's probabilities; a smaller chunk lowers it proportionally.

    Args:
        q: Queries ``[B, H, Nq, head_dim]``.
        k: Keys ``[B, H, Nk, head_dim]``.
        scale: Score scale; None uses ``1 / sqrt(head_dim)``.
        causal: Query i attends keys 0..i (top-left aligned, as SDPA's ``is_causal``).
        attn_mask: bool (True = may attend) or float added to the scores, broadcastable to
            ``[B, H, Nq, Nk]``.
        key_padding_mask: ``[B, Nk]``, bool True = padding, or float added to the scores.
        query_padding_mask: ``[B, Nq]`` bool, True = padded query, left out of the sum.
        query_chunk: Queries per chunk, >= 1.

    Returns:
        ``[B, H, Nk]`` in the accumulation dtype (float64 for float64 input, else float32).
    """
    dtype = _kernels.accumulation_dtype(q.dtype)
    q = q.to(dtype)
    k = k.to(dtype)
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    factor = 1.0 / math.sqrt(head_dim) if scale is None else scale
    chunk = queries if query_chunk is None else query_chunk
    key_bias = _key_padding_bias(key_padding_mask, dtype)
    keys_t = k.transpose(-1, -2)
    weights = q.new_zeros(batch, heads, keys)

    for start in range(0, queries, chunk):
        stop = min(start + chunk, queries)

        # Step 1: masked scores -> [B, H, c, Nk]. NOTE: the in-place ops act on this chunk's own
        # scores and never on an input. They keep one [B, H, c, Nk] tensor alive at a time.
        scores = torch.matmul(q[:, :, start:stop], keys_t).mul_(factor)
        if causal:
            allowed = torch.ones(stop - start, keys, dtype=torch.bool, device=q.device).tril(diagonal=start)
            scores.masked_fill_(~allowed, -math.inf)
        if attn_mask is not None:
            _apply_attn_mask_(scores, attn_mask, start, stop)
        if key_bias is not None:
            scores.add_(key_bias)

        # Step 2: softmax with rows that allow no key set to 0 -> [B, H, c, Nk] and [B, H, c].
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
        exponentials = scores.sub_(row_max).exp_()
        row_sum = exponentials.sum(dim=-1)
        row_weight = torch.where(row_sum > 0, 1.0 / torch.where(row_sum > 0, row_sum, 1.0), 0.0)
        if query_padding_mask is not None:
            row_weight = row_weight * (~query_padding_mask[:, None, start:stop]).to(dtype)

        # Step 3: sum over the chunk's queries without forming the probabilities -> [B, H, Nk].
        weights = weights + torch.matmul(row_weight.unsqueeze(-2), exponentials).squeeze(-2)
        # NOTE: dropping the chunk here frees it before the next chunk's scores are allocated.
        del scores, exponentials
    return weights


def _key_padding_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Turn a ``[B, Nk]`` key padding mask into a ``[B, 1, 1, Nk]`` additive bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    else:
        bias = mask.to(dtype)
    return bias[:, None, None, :]


def _apply_attn_mask_(scores: Tensor, mask: Tensor, start: int, stop: int) -> None:
    """Apply the query rows ``start:stop`` of a mask broadcastable to ``[B, H, Nq, Nk]`` to ``scores`` in place."""
    if mask.dim() >= 2 and mask.shape[-2] != 1:
        mask = mask[..., start:stop, :]
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask, -math.inf)
    else:
        scores.add_(mask.to(scores.dtype))


def _padding_bool(mask: Tensor | None) -> Tensor | None:
    """Return the padded positions of a key padding mask: bool as is, float where it is -inf."""
    if mask is None:
        return None
    return mask if mask.dtype == torch.bool else mask == -math.inf


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, H * head_dim] -> [B, H, N, head_dim]``."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def _token_sum(x: Tensor, padding: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sum the unpadded token rows of ``x`` ``[B, N, d]`` -> ``([1, d], count [])``."""
    dtype = _kernels.accumulation_dtype(x.dtype)
    if padding is None:
        total, rows = _kernels.linear_input_sum(x)
        return total, torch.full((), float(rows), dtype=dtype, device=x.device)
    keep = (~padding).to(dtype)
    total = torch.einsum("bn,bnd->d", keep, x.to(dtype)).unsqueeze(0)
    return total, keep.sum()


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Options of the attention capture.

    Attributes:
        weighting: Use the attention-weighted mean for value rows; False gives them the
            ordinary mean of their inputs (an ablation of the weighting).
        mean: ``"paired"`` or ``"factored"``, see the module docstring.
        query_chunk: Queries per chunk when probabilities are recomputed; None takes all at once.
    """

    weighting: bool = True
    mean: AttentionMean = "paired"
    query_chunk: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weighting, bool):
            raise ValueError(f"Invalid attention_weighting={self.weighting!r}: expected True or False.")
        if self.mean not in ATTENTION_MEANS:
            raise ValueError(
                f"Invalid attention_mean={self.mean!r}: expected one of {', '.join(map(repr, ATTENTION_MEANS))}."
            )
        chunk = self.query_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(
                f"Invalid attention_query_chunk={chunk!r}: expected an integer >= 1, or None for all queries at once."
            )


def _value_sum(weights: Tensor, x: Tensor, options: AttentionOptions) -> tuple[Tensor, Tensor]:
    """Sum the rows of ``S X`` for value inputs ``x`` ``[B, Nk, d]`` -> ``([1, d], count [])``.

    Args:
        weights: ``[B, H, Nk_all]`` from :func:`attention_key_weights`. Keys past ``Nk`` (a
            learned bias key or a zero key) take probability but read no input row.
    """
    x = x.to(weights.dtype)
    per_key = weights.sum(dim=1)[:, : x.shape[1]]
    count = weights.sum()
    if options.mean == "paired":
        return torch.einsum("bk,bkd->d", per_key, x).unsqueeze(0), count
    key_mean = per_key.sum(dim=0) / count.clamp_min(torch.finfo(weights.dtype).tiny)
    return (count * (key_mean @ x.mean(dim=0))).unsqueeze(0), count


def _batched(x: Tensor, batch_first: bool) -> Tensor:
    """Bring a projection input or output to ``[B, N, d]``."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if not batch_first:
        x = x.transpose(0, 1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


@dataclasses.dataclass
class AttentionPlan:
    """The hooks and layer specs that a statistics recorder adds for the attention blocks of one model.

    Attributes:
        specs: ``{weight_name: (bias_name or None, blocks)}`` for nn.Linear-like weights whose
            statistics the attention capture records, replacing the plain layer specs.
        claimed: Modules whose plain nn.Linear hook must not record.
        hooks: ``(module, hook, with_kwargs)`` forward hooks to register.
        resets: Functions that drop captured projections no declared module consumed, called
            when a recording stops.
    """

    specs: dict[str, tuple[str | None, int]] = dataclasses.field(default_factory=dict)
    claimed: set[nn.Module] = dataclasses.field(default_factory=set)
    hooks: list[tuple[nn.Module, Callable[..., None], bool]] = dataclasses.field(default_factory=list)
    resets: list[Callable[[], None]] = dataclasses.field(default_factory=list)


def plan_attention(
    model: nn.Module,
    owners: Mapping[nn.Module, str],
    plain_bias: Mapping[str, str | None],
    declarations: Iterable[AttentionDeclaration],
    options: AttentionOptions,
    sink: _Sink,
    bias_name_for: Callable[[str], str],
) -> AttentionPlan:
    """Plan the capture of every nn.MultiheadAttention in ``model`` and every declared module.

    Args:
        model: The model.
        owners: ``{module: weight_name}`` of the plain nn.Linear and nn.Conv2d layers.
        plain_bias: ``{weight_name: bias_name or None}`` as the plain layer specs pair them.
        declarations: From :func:`declare_attention`.
        options: Capture options.
        sink: Returns the recording buffer for a module's call, or None when nothing is recorded.
        bias_name_for: The bias name that pairs with a weight name.

    Raises:
        ValueError: A declared module or projection outside ``model``, a module declared
            twice, or a projection weight that is also used by an undeclared layer.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    members = {id(m) for m in model.modules()}
    plan = AttentionPlan()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            _plan_multihead(module, names, options, sink, bias_name_for, plan)

    seen: set[int] = set()
    for declaration in _as_declarations(declarations):
        if id(declaration.module) in seen:
            raise ValueError(
                f"Invalid attention=[...]: the module {type(declaration.module).__name__} is declared twice; "
                "declare each attention module once."
            )
        seen.add(id(declaration.module))
        _plan_declared(declaration, members, owners, plain_bias, options, sink, plan)

    claimed_weights = {owners[m] for m in plan.claimed if m in owners}
    for module, weight_name in owners.items():
        if module not in plan.claimed and weight_name in claimed_weights and plan.specs[weight_name][1] != 1:
            raise ValueError(
                f"Invalid weight sharing for '{weight_name}': it is a declared fused qkv projection and is also "
                f"used by the undeclared layer {type(module).__name__}; the two need different statistics."
            )
    return plan


def _as_declarations(declarations: Iterable[AttentionDeclaration]) -> Sequence[AttentionDeclaration]:
    if isinstance(declarations, AttentionDeclaration):
        raise ValueError("Invalid attention=: expected a list of declarations; pass attention=[declaration].")
    result = list(declarations)
    for item in result:
        if not isinstance(item, AttentionDeclaration):
            raise ValueError(
                f"Invalid attention=[...] item of type {type(item).__name__}: build each item with "
                "macfn.declare_attention(module, ...)."
            )
    return result


def _plan_multihead(
    module: nn.MultiheadAttention,
    names: Mapping[int, str],
    options: AttentionOptions,
    sink: _Sink,
    bias_name_for: Callable[[str], str],
    plan: AttentionPlan,
) -> None:
    """Plan statistics for the input projections and the output projection of one nn.MultiheadAttention.

    The output projection is applied by ``F.multi_head_attention_forward`` without calling
    ``out_proj``, so its mean input, the mean attention output, is computed here as well.
    """
    packed = module._qkv_same_embed_dim
    in_bias = module.in_proj_bias
    if packed:
        weight_name = names.get(id(module.in_proj_weight))
        if weight_name is None:
            return
        bias_name = bias_name_for(weight_name)
        joint = in_bias is not None and names.get(id(in_bias)) == bias_name
        plan.specs[weight_name] = (bias_name if joint else None, 3)
        targets: tuple[str, ...] = (weight_name,)
    else:
        separate = tuple(names.get(id(w)) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
        if any(name is None for name in separate):
            return
        targets = tuple(name for name in separate if name is not None)
        for name in targets:
            plan.specs[name] = (None, 1)
    out_name = names.get(id(module.out_proj.weight))
    if out_name is not None:
        plan.claimed.add(module.out_proj)
        out_bias = module.out_proj.bias
        joint_out = out_bias is not None and names.get(id(out_bias)) == bias_name_for(out_name)
        plan.specs[out_name] = (bias_name_for(out_name) if joint_out else None, 1)

    def hook(mha: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        buffer = sink(mha)
        if buffer is None:
            return None
        for name, record in _multihead_records(module, args, kwargs, targets, out_name, options):
            buffer.setdefault(name, []).append(record)
        return None

    plan.hooks.append((module, hook, True))


_MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                  "average_attn_weights", "is_causal")


def _multihead_records(
    module: nn.MultiheadAttention,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    targets: tuple[str, ...],
    out_name: str | None,
    options: AttentionOptions,
) -> list[tuple[str, Record]]:
    """Compute one nn.MultiheadAttention call's statistics records."""
    bound: dict[str, Any] = dict(zip(_MHA_ARGUMENTS, args))
    bound.update(kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    self_attention = query is key
    batched = query.dim() == 3
    query, key, value = (_batched(t.detach(), module.batch_first) for t in (query, key, value))
    key_padding = bound.get("key_padding_mask")
    attn_mask = bound.get("attn_mask")
    if key_padding is not None and not batched:
        key_padding = key_padding.unsqueeze(0)
    causal = bool(bound.get("is_causal", False)) and key_padding is None and not bound.get("need_weights", True)
    if causal:
        attn_mask = None
    heads = module.num_heads
    batch = query.shape[0]

    # Step 1: projections as F.multi_head_attention_forward computes them -> [B, N, E].
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.detach().chunk(3)
    else:
        w_q, w_k, w_v = (w.detach() for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
    biases = (None, None, None) if module.in_proj_bias is None else module.in_proj_bias.detach().chunk(3)
    q = F.linear(query, w_q, biases[0])
    k = F.linear(key, w_k, biases[1])
    v = F.linear(value, w_v, biases[2])

    # Step 2: extra keys of add_bias_kv and add_zero_attn, and masks in SDPA form -> [B, H, Nq, Nk_all].
    extra = 0
    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, module.bias_k.detach().expand(batch, 1, -1)], dim=1)
        v = torch.cat([v, module.bias_v.detach().expand(batch, 1, -1)], dim=1)
        extra += 1
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, 1, k.shape[-1])], dim=1)
        v = torch.cat([v, v.new_zeros(batch, 1, v.shape[-1])], dim=1)
        extra += 1
    mask = _multihead_attn_mask(attn_mask, batch, heads, extra)
    padding = None if key_padding is None else F.pad(key_padding, (0, extra))
    real_padding = _padding_bool(key_padding)
    query_padding = real_padding if self_attention else None
    q_heads, k_heads, v_heads = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    weights = attention_key_weights(q_heads, k_heads, causal=causal, attn_mask=mask, key_padding_mask=padding,
                                    query_padding_mask=query_padding, query_chunk=options.query_chunk)

    # Step 3: input projection rows (q, k, v) and the output projection's mean input.
    q_total, q_count = _token_sum(query, query_padding)
    k_total, k_count = _token_sum(key, real_padding)
    if options.weighting:
        v_total, v_count = _value_sum(weights, value, options)
    else:
        v_total, v_count = _token_sum(value, real_padding)
    records: list[tuple[str, Record]] = []
    if len(targets) == 1:
        total = torch.cat([q_total, k_total, v_total.to(q_total.dtype)])
        count = torch.stack([q_count, k_count, v_count.to(q_count.dtype)]).unsqueeze(1)
        records.append((targets[0], (total, count)))
    else:
        for name, total, count in zip(targets, (q_total, k_total, v_total), (q_count, k_count, v_count)):
            records.append((name, (total, count)))
    if out_name is not None:
        # Each counted row of every head sums to 1, so the weights over H heads count H times the rows.
        head_sums = torch.einsum("bhk,bhkd->hd", weights, v_heads.to(weights.dtype))
        records.append((out_name, (head_sums.reshape(1, -1), weights.sum() / heads)))
    return records


def _multihead_attn_mask(mask: Tensor | None, batch: int, heads: int, extra: int) -> Tensor | None:
    """Turn an nn.MultiheadAttention ``attn_mask`` (bool True = blocked) into SDPA form ``[., ., Nq, Nk]``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = ~mask
        fill: bool | float = True
    else:
        fill = 0.0
    if extra:
        mask = F.pad(mask, (0, extra), value=fill)
    if mask.dim() == 3:
        return mask.reshape(batch, heads, mask.shape[-2], mask.shape[-1])
    return mask


def _plan_declared(
    declaration: AttentionDeclaration,
    members: set[int],
    owners: Mapping[nn.Module, str],
    plain_bias: Mapping[str, str | None],
    options: AttentionOptions,
    sink: _Sink,
    plan: AttentionPlan,
) -> None:
    """Plan the stash hooks on a declared module's projections and the hook on the module itself."""
    roles = {"qkv": declaration.qkv} if declaration.qkv is not None else {
        "q": declaration.q, "k": declaration.k, "v": declaration.v}
    if id(declaration.module) not in members:
        raise ValueError(
            f"Invalid declaration: the module {type(declaration.module).__name__} is not part of the model passed "
            "to macfn; declare the model's own attention modules."
        )
    weight_names: dict[str, str] = {}
    for role, layer in roles.items():
        if layer is None or id(layer) not in members or layer not in owners:
            raise ValueError(
                f"Invalid {role}= of the declared {type(declaration.module).__name__}: the nn.Linear is not part of "
                "the model or its weight is not a parameter of it."
            )
        if layer in plan.claimed:
            raise ValueError(
                f"Invalid {role}= of the declared {type(declaration.module).__name__}: the nn.Linear already belongs "
                "to another attention module."
            )
        plan.claimed.add(layer)
        weight_names[role] = owners[layer]

    for role, weight_name in weight_names.items():
        plan.specs[weight_name] = (plain_bias.get(weight_name), 3 if role == "qkv" else 1)

    pending: dict[str, list[tuple[Tensor, Tensor]]] = {role: [] for role in roles}

    for role, layer in roles.items():
        assert layer is not None
        plan.hooks.append((layer, _make_stash(role, pending, sink), False))

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        calls = {role: list(entries) for role, entries in pending.items()}
        for entries in pending.values():
            entries.clear()
        buffer = sink(module)
        if buffer is None:
            return None
        for index in range(min(len(entries) for entries in calls.values())):
            inputs = {role: entries[index] for role, entries in calls.items()}
            for name, record in _declared_records(declaration, inputs, weight_names, args, kwargs, options):
                buffer.setdefault(name, []).append(record)
        return None

    def reset() -> None:
        for entries in pending.values():
            entries.clear()

    plan.hooks.append((declaration.module, hook, True))
    plan.resets.append(reset)


def _make_stash(role: str, pending: dict[str, list[tuple[Tensor, Tensor]]], sink: _Sink) -> Callable[..., None]:
    def stash(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if sink(layer) is None:
            return None
        pending[role].append((args[0].detach(), output.detach()))
        return None

    return stash


def _resolve_mask(source: MaskSource | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    if source is None:
        return None
    if isinstance(source, str):
        value = kwargs.get(source)
        return value if isinstance(value, Tensor) else None
    return source(args, dict(kwargs))


def _declared_records(
    declaration: AttentionDeclaration,
    inputs: Mapping[str, tuple[Tensor, Tensor]],
    weight_names: Mapping[str, str],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    options: AttentionOptions,
) -> list[tuple[str, Record]]:
    """Compute one declared-module call's statistics records."""
    heads, first = declaration.heads, declaration.batch_first

    # Step 1: projection inputs and outputs -> [B, N, d] and [B, N, E].
    if declaration.layout == "fused":
        x, out = (_batched(t, first) for t in inputs["qkv"])
        width = out.shape[-1] // 3
        x_q = x_k = x_v = x
        q, k = out[..., :width], out[..., width : 2 * width]
    else:
        x_q, q = (_batched(t, first) for t in inputs["q"])
        x_k, k = (_batched(t, first) for t in inputs["k"])
        x_v = _batched(inputs["v"][0], first)

    # Step 2: masks of this call and the key weights -> [B, H, Nk].
    attn_mask = _resolve_mask(declaration.attn_mask, args, kwargs)
    key_padding = _resolve_mask(declaration.key_padding_mask, args, kwargs)
    real_padding = _padding_bool(key_padding)
    query_padding = real_padding if q.shape[1] == k.shape[1] else None
    weights = attention_key_weights(
        _split_heads(q, heads), _split_heads(k, heads), scale=declaration.scale, causal=declaration.causal,
        attn_mask=attn_mask, key_padding_mask=key_padding, query_padding_mask=query_padding,
        query_chunk=options.query_chunk,
    )

    # Step 3: mean-activation sums of the q, k and v rows.
    q_total, q_count = _token_sum(x_q, query_padding)
    k_total, k_count = _token_sum(x_k, real_padding)
    if options.weighting:
        v_total, v_count = _value_sum(weights, x_v, options)
    else:
        v_total, v_count = _token_sum(x_v, real_padding)
    if declaration.layout == "fused":
        total = torch.cat([q_total, k_total, v_total.to(q_total.dtype)])
        count = torch.stack([q_count, k_count, v_count.to(q_count.dtype)]).unsqueeze(1)
        return [(weight_names["qkv"], (total, count))]
    return [
        (weight_names["q"], (q_total, q_count)),
        (weight_names["k"], (k_total, k_count)),
        (weight_names["v"], (v_total, v_count)),
    ]
