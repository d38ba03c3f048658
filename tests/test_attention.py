"""Attention statistics against float64 references built from explicitly materialised probabilities."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import macfn
from tests import _reference as ref

# float64 end to end; the differences are summation order only (observed below 1e-15).
FLOAT64_TOLERANCE = 1e-10
# float32 capture against the float64 reference: rounding of the projections and softmax (observed ~1e-7).
FLOAT32_TOLERANCE = 1e-5

BATCH, TOKENS, WIDTH, HEADS = 3, 6, 8, 2
MASKS = ["none", "causal", "padding", "causal+padding"]


# References: probabilities are formed with torch.softmax on explicit scores, rows with no
# allowed key become NaN and are dropped together with padded queries.


def _explicit_probabilities(q: Tensor, k: Tensor, allowed: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) over allowed keys; ``[B, H, Nq, Nk]`` float64."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)


def _reference_means(probabilities: Tensor, x_value: Tensor, valid_queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(sbar [Nk], paired vbar [d], factored vbar [d])`` from explicit probabilities.

    Args:
        probabilities: ``[B, H, Nq, Nk]``.
        x_value: Value-side inputs ``[B, Nk, d]``.
        valid_queries: ``[B, Nq]`` bool, the query rows that count.
    """
    keep = valid_queries[:, None, :].expand(-1, probabilities.shape[1], -1) & ~probabilities.isnan().any(-1)
    rows_of_s = probabilities[keep]  # [rows, Nk]
    sbar = rows_of_s.mean(dim=0)
    rows_of_sx = torch.einsum("bhqk,bkd->bhqd", probabilities.nan_to_num(), x_value)[keep]  # [rows, d]
    return sbar, rows_of_sx.mean(dim=0), sbar @ x_value.mean(dim=0)


def _masks(kind: str) -> tuple[Tensor, Tensor | None, bool]:
    """Return ``(allowed [B, 1, N, N], padding [B, N] or None, causal)`` for a mask kind."""
    allowed = torch.ones(BATCH, 1, TOKENS, TOKENS, dtype=torch.bool)
    causal = "causal" in kind
    if causal:
        allowed = allowed & torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
    padding = None
    if "padding" in kind:
        lengths = torch.tensor([TOKENS, TOKENS - 2, TOKENS - 3])
        padding = torch.arange(TOKENS)[None, :] >= lengths[:, None]
        allowed = allowed & ~padding[:, None, None, :]
    return allowed, padding, causal


class FusedAttention(nn.Module):
    """timm/nanoGPT-style attention: one qkv layer, SDPA or explicit softmax, masks as keyword arguments."""

    def __init__(self, width: int, heads: int, *, explicit: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.explicit = explicit
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, allowed: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        mask = allowed
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]
            mask = keep if mask is None else mask & keep
        if self.explicit:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, -math.inf)
            y = torch.softmax(scores, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class SeparateAttention(nn.Module):
    """Attention with separate q, k and v layers; the value width differs from the query width."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, 2 * width)
        self.out = nn.Linear(2 * width, width)

    def forward(self, x: Tensor, allowed: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        mask = allowed
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]
            mask = keep if mask is None else mask & keep
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, -1))


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn = attention

    def forward(self, x: Tensor, allowed: Tensor | None = None, padding: Tensor | None = None) -> Tensor:
        return self.attn(x, allowed=allowed, key_padding_mask=padding)


def _capture(model: nn.Module, args: tuple, kwargs: dict, **options) -> dict[str, Tensor]:
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_fn(p):
        output = functional_call(model, p, args, kwargs)
        output = output[0] if isinstance(output, tuple) else output  # nn.MultiheadAttention returns a pair
        return output.nan_to_num().square().sum()

    compute = macfn.grad_and_stats(model, loss_fn, **options)
    _, stats, _ = compute(params)
    compute.remove()
    return stats


def _declared_case(layout: str, mask_kind: str, dtype: torch.dtype = torch.float64):
    """Build a declared model, its call, and the float64 reference ``(abar, sbar, vbar, vbar_factored)``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    attention = FusedAttention(WIDTH, HEADS) if layout == "fused" else SeparateAttention(WIDTH, HEADS)
    model = Block(attention).to(dtype)
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=generator, dtype=torch.float64)
    allowed, padding, causal = _masks(mask_kind)
    # The causal part is declared with causal=True; the padding reaches the capture as a keyword argument.
    call_kwargs = {"padding": padding}
    if layout == "fused":
        declaration = macfn.declare_attention(attention, qkv=attention.qkv, heads=HEADS, causal=causal,
                                              key_padding_mask="key_padding_mask")
    else:
        declaration = macfn.declare_attention(attention, q=attention.q, k=attention.k, v=attention.v, heads=HEADS,
                                              causal=causal,
                                              key_padding_mask=lambda args, kwargs: kwargs["key_padding_mask"])
    if causal:
        call_kwargs["allowed"] = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()

    # Reference from the float64 weights.
    with torch.no_grad():
        if layout == "fused":
            w = attention.qkv.weight.double()
            b = attention.qkv.bias.double()
            q = F.linear(x, w[:WIDTH], b[:WIDTH])
            k = F.linear(x, w[WIDTH : 2 * WIDTH], b[WIDTH : 2 * WIDTH])
        else:
            q = F.linear(x, attention.q.weight.double(), attention.q.bias.double())
            k = F.linear(x, attention.k.weight.double())
        split = lambda t: t.view(BATCH, TOKENS, HEADS, -1).transpose(1, 2)  # noqa: E731
        probabilities = _explicit_probabilities(split(q), split(k), allowed)
    valid = torch.ones(BATCH, TOKENS, dtype=torch.bool) if padding is None else ~padding
    sbar, vbar, vbar_factored = _reference_means(probabilities, x, valid)
    abar = x[valid].mean(dim=0)
    return model, (x.to(dtype),), call_kwargs, declaration, (abar, sbar, vbar, vbar_factored)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_declared_value_mean_matches_reference(layout, mask_kind):
    model, args, kwargs, declaration, (abar, _, vbar, vbar_factored) = _declared_case(layout, mask_kind)
    stats = _capture(model, args, kwargs, attention=[declaration])
    factored = _capture(model, args, kwargs, attention=[declaration], attention_mean="factored")

    if layout == "fused":
        fused = stats["attn.qkv.weight"]
        assert fused.shape == (3, WIDTH + 1)
        expected = torch.stack([abar, abar, vbar])
        torch.testing.assert_close(fused[:, :-1], expected, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
        assert torch.equal(fused[:, -1], torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(factored["attn.qkv.weight"][2, :-1], vbar_factored, rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE)
    else:
        torch.testing.assert_close(stats["attn.q.weight"][0, :-1], abar, rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE)
        torch.testing.assert_close(stats["attn.k.weight"][0], abar, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
        torch.testing.assert_close(stats["attn.v.weight"][0, :-1], vbar, rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE)
        torch.testing.assert_close(factored["attn.v.weight"][0, :-1], vbar_factored, rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE)
        # The output projection is an ordinary layer: its mean input is the attention output's mean.
        assert stats["attn.out.weight"].shape == (1, 2 * WIDTH + 1)


def test_paired_and_factored_differ_when_patterns_vary():
    model, args, kwargs, declaration, (_, _, vbar, vbar_factored) = _declared_case("fused", "causal+padding")
    assert (vbar - vbar_factored).abs().max() > 1e-3
    stats = _capture(model, args, kwargs, attention=[declaration])
    assert (stats["attn.qkv.weight"][2, :-1] - vbar_factored).abs().max() > 1e-3


def test_declared_float32_capture_close_to_reference():
    model, args, kwargs, declaration, (abar, _, vbar, _) = _declared_case("fused", "causal+padding", torch.float32)
    stats = _capture(model, args, kwargs, attention=[declaration])
    fused = stats["attn.qkv.weight"]
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused[:, :-1].double(), torch.stack([abar, abar, vbar]), rtol=FLOAT32_TOLERANCE,
                               atol=FLOAT32_TOLERANCE)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_explicit_softmax_model_matches_sdpa_model(mask_kind):
    model, args, kwargs, declaration, _ = _declared_case("fused", mask_kind)
    sdpa = _capture(model, args, kwargs, attention=[declaration])
    model.attn.explicit = True
    explicit = _capture(model, args, kwargs, attention=[declaration])
    # The qkv statistics depend only on the qkv layer's input and output, whichever kernel attends.
    assert torch.equal(explicit["attn.qkv.weight"], sdpa["attn.qkv.weight"])
    torch.testing.assert_close(explicit, sdpa, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_attn_mask_source_matches_causal_flag():
    model, args, kwargs, declaration, _ = _declared_case("fused", "causal+padding")
    by_flag = _capture(model, args, kwargs, attention=[declaration])
    attention = model.attn
    by_mask = macfn.declare_attention(attention, qkv=attention.qkv, heads=HEADS, attn_mask="allowed",
                                      key_padding_mask="key_padding_mask")
    torch.testing.assert_close(_capture(model, args, kwargs, attention=[by_mask]), by_flag, rtol=FLOAT64_TOLERANCE,
                               atol=FLOAT64_TOLERANCE)


def test_query_chunks_do_not_change_stats():
    model, args, kwargs, declaration, _ = _declared_case("fused", "causal+padding")
    whole = _capture(model, args, kwargs, attention=[declaration], attention_query_chunk=TOKENS)
    for chunk in (1, 4):
        chunked = _capture(model, args, kwargs, attention=[declaration], attention_query_chunk=chunk)
        torch.testing.assert_close(chunked, whole, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_weighting_off_gives_ordinary_mean(layout):
    model, args, kwargs, declaration, _ = _declared_case(layout, "causal")
    ablated = _capture(model, args, kwargs, attention=[declaration], attention_weighting=False)
    plain = _capture(model, args, kwargs)
    if layout == "fused":
        assert plain["attn.qkv.weight"].shape == (1, WIDTH + 1)
        torch.testing.assert_close(ablated["attn.qkv.weight"], plain["attn.qkv.weight"].expand(3, -1),
                                   rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
    else:
        torch.testing.assert_close(ablated, plain, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_weighting_off_step_equals_single_block_step():
    model, args, kwargs, declaration, _ = _declared_case("fused", "causal")
    params = {name: p.detach() for name, p in model.named_parameters()}
    config = macfn.MACConfig(lr=0.1, momentum=0.0, weight_decay=0.0, stat_decay=0.0, damping=0.7)

    def loss_fn(p):
        return functional_call(model, p, args, kwargs).square().sum()

    ablated = macfn.grad_and_stats(model, loss_fn, attention=[declaration], attention_weighting=False)
    plain = macfn.grad_and_stats(model, loss_fn)
    grads, ablated_stats, _ = ablated(params)
    _, plain_stats, _ = plain(params)
    ablated_params, _ = macfn.step(params, grads, ablated_stats, None, config)
    plain_params, _ = macfn.step(params, grads, plain_stats, None, config)
    torch.testing.assert_close(ablated_params, plain_params, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_undeclared_attention_gets_ordinary_mean():
    # Module and attribute names ("attn", "qkv") are never used to find attention.
    model, args, kwargs, _, _ = _declared_case("fused", "causal")
    stats = _capture(model, args, kwargs)
    assert stats["attn.qkv.weight"].shape == (1, WIDTH + 1)
    torch.testing.assert_close(stats["attn.qkv.weight"], ref.linear_mean(args[0], bias=True), rtol=FLOAT64_TOLERANCE,
                               atol=FLOAT64_TOLERANCE)


# nn.MultiheadAttention: the reference probabilities are the module's own (need_weights=True).


def _multihead_case(kind: str, mask_kind: str):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    batch_first = kind != "seq_first"
    if kind == "kdim":
        module = nn.MultiheadAttention(WIDTH, HEADS, kdim=5, vdim=7, batch_first=True)
    elif kind == "bias_kv":
        module = nn.MultiheadAttention(WIDTH, HEADS, add_bias_kv=True, add_zero_attn=True, batch_first=True)
    else:
        module = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first)
    module = module.double()
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=generator, dtype=torch.float64)
    if kind == "kdim":
        query = x
        key = torch.randn(BATCH, TOKENS, 5, generator=generator, dtype=torch.float64)
        value = torch.randn(BATCH, TOKENS, 7, generator=generator, dtype=torch.float64)
    elif kind == "cross":
        query, key = x, torch.randn(BATCH, TOKENS, WIDTH, generator=generator, dtype=torch.float64)
        value = key
    else:
        query = key = value = x
    allowed, padding, causal = _masks(mask_kind)
    kwargs: dict = {"need_weights": False}
    if causal:
        kwargs["attn_mask"] = ~torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()  # True = blocked
    if padding is not None:
        kwargs["key_padding_mask"] = padding
    call = (query, key, value) if batch_first else tuple(t.transpose(0, 1) for t in (query, key, value))
    if query is key:
        call = (call[0], call[0], call[0])
    elif key is value:
        call = (call[0], call[1], call[1])

    with torch.no_grad():
        output, probabilities = module(*call, **{**kwargs, "need_weights": True, "average_attn_weights": False})
    if not batch_first:
        output = output.transpose(0, 1)
    self_attention = kind in ("packed", "seq_first", "bias_kv")
    valid = ~padding if padding is not None and self_attention else torch.ones(BATCH, TOKENS, dtype=torch.bool)
    real_keys = value.shape[1]
    sbar, vbar, _ = _reference_means(probabilities[..., :real_keys], value, valid)
    key_valid = ~padding if padding is not None else torch.ones(BATCH, TOKENS, dtype=torch.bool)
    # The output projection's input, recovered by inverting out_proj: O = (output - b) W_o^-T.
    with torch.no_grad():
        attention_output = (output - module.out_proj.bias) @ torch.linalg.inv(module.out_proj.weight).T
    reference = {
        "abar_q": query[valid].mean(0),
        "abar_k": key[key_valid].mean(0),
        "vbar": vbar,
        "sbar": sbar,
        "obar": attention_output[valid].mean(0),
    }
    return module, call, kwargs, reference


MULTIHEAD_CASES = [(kind, mask) for kind in ("packed", "seq_first", "bias_kv") for mask in MASKS] + [
    (kind, mask) for kind in ("cross", "kdim") for mask in ("none", "padding")
]


@pytest.mark.parametrize(("kind", "mask_kind"), MULTIHEAD_CASES)
def test_multihead_value_mean_matches_reference(kind, mask_kind):
    module, call, kwargs, reference = _multihead_case(kind, mask_kind)
    stats = _capture(module, call, kwargs)

    if kind == "kdim":
        torch.testing.assert_close(stats["q_proj_weight"][0], reference["abar_q"], rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE)
        torch.testing.assert_close(stats["k_proj_weight"][0], reference["abar_k"], rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE)
        torch.testing.assert_close(stats["v_proj_weight"][0], reference["vbar"], rtol=FLOAT64_TOLERANCE,
                                   atol=FLOAT64_TOLERANCE)
    else:
        packed = stats["in_proj_weight"]
        assert packed.shape == (3, WIDTH + 1)
        expected = torch.stack([reference["abar_q"], reference["abar_k"], reference["vbar"]])
        if kind == "bias_kv":
            # NOTE: only the weight columns are compared: the value bias is read with the probability on the real
            # keys, but its column is the constant 1.
            expected = expected[:, :WIDTH]
        torch.testing.assert_close(packed[:, :WIDTH], expected, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
    out = stats["out_proj.weight"]
    assert out.shape == (1, WIDTH + 1)
    torch.testing.assert_close(out[0, :-1], reference["obar"], rtol=1e-9, atol=1e-9)


def test_multihead_float_masks_match_bool_masks():
    module, call, kwargs, _ = _multihead_case("packed", "causal+padding")
    as_float = dict(kwargs)
    as_float["attn_mask"] = torch.zeros(TOKENS, TOKENS, dtype=torch.float64).masked_fill(kwargs["attn_mask"], -math.inf)
    as_float["key_padding_mask"] = torch.zeros(BATCH, TOKENS, dtype=torch.float64).masked_fill(
        kwargs["key_padding_mask"], -math.inf)
    torch.testing.assert_close(_capture(module, call, as_float), _capture(module, call, kwargs),
                               rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_multihead_weighting_off_gives_ordinary_mean():
    module, call, kwargs, reference = _multihead_case("packed", "causal")
    stats = _capture(module, call, kwargs, attention_weighting=False)
    expected = reference["abar_q"].expand(3, -1)
    torch.testing.assert_close(stats["in_proj_weight"][:, :-1], expected, rtol=FLOAT64_TOLERANCE,
                               atol=FLOAT64_TOLERANCE)


def test_transformer_layers_capture_every_attention():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(WIDTH, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoderLayer(WIDTH, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.ModuleDict({"encoder": encoder, "decoder": decoder}).double()
    source = torch.randn(BATCH, TOKENS, WIDTH, dtype=torch.float64)
    target = torch.randn(BATCH, TOKENS - 1, WIDTH, dtype=torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_fn(p):
        memory = functional_call(model["encoder"], {k[8:]: v for k, v in p.items() if k.startswith("encoder.")},
                                 (source,))
        return functional_call(model["decoder"], {k[8:]: v for k, v in p.items() if k.startswith("decoder.")},
                               (target, memory)).square().sum()

    _, stats, _ = macfn.grad_and_stats(model, loss_fn)(params)
    for name in ("encoder.self_attn", "decoder.self_attn", "decoder.multihead_attn"):
        assert stats[f"{name}.in_proj_weight"].shape == (3, WIDTH + 1), name
        assert stats[f"{name}.out_proj.weight"].shape == (1, WIDTH + 1), name
    # Cross-attention reads the memory: its key rows are the memory's mean, its query rows the target's.
    cross = stats["decoder.multihead_attn.in_proj_weight"]
    assert not torch.allclose(cross[0], cross[1])


# Layers called several times and tied weights.


class TwiceCalled(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn = attention

    def forward(self, first: Tensor, second: Tensor | None = None) -> Tensor:
        total = self._call(first)
        return total if second is None else total + self._call(second)

    def _call(self, x: Tensor) -> Tensor:
        if isinstance(self.attn, nn.MultiheadAttention):
            return self.attn(x, x, x)[0].square().sum()
        return self.attn(x).square().sum()


@pytest.mark.parametrize("kind", ["declared", "multihead"])
def test_attention_called_twice_pools_both_calls(kind):
    torch.manual_seed(0)
    if kind == "declared":
        attention: nn.Module = FusedAttention(WIDTH, HEADS, explicit=True)
        declarations = [macfn.declare_attention(attention, qkv=attention.qkv, heads=HEADS)]
        name = "attn.qkv.weight"
    else:
        attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        declarations = []
        name = "attn.in_proj_weight"
    model = TwiceCalled(attention).double()
    first = torch.randn(2, TOKENS, WIDTH, dtype=torch.float64)
    second = torch.randn(3, TOKENS - 2, WIDTH, dtype=torch.float64) + 1.0
    stats = _capture(model, (first, second), {}, attention=declarations)

    one = _capture(model, (first,), {}, attention=declarations)
    two = _capture(model, (second,), {}, attention=declarations)
    # Pooled over rows: abar by token count, vbar by (head, query) count; both are proportional to tokens here.
    weights = torch.tensor([2.0 * TOKENS, 3.0 * (TOKENS - 2)], dtype=torch.float64)
    for key in (name, "attn.out_proj.weight" if kind == "multihead" else "attn.proj.weight"):
        expected = (weights[0] * one[key] + weights[1] * two[key]) / weights.sum()
        torch.testing.assert_close(stats[key], expected, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


class TinyLM(nn.Module):
    """Embedding, one layer, and an LM head that reuses the token embedding."""

    def __init__(self, vocab: int, width: int, *, head: str) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head_kind = head
        if head == "linear":
            self.head = nn.Linear(width, vocab, bias=False)
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.tok(idx)))
        if self.head_kind == "linear":
            return self.head(h)
        return F.linear(h, self.tok.weight)


@pytest.mark.parametrize("head", ["linear", "functional"])
def test_tied_embedding_head(head):
    torch.manual_seed(0)
    model = TinyLM(11, WIDTH, head=head).double()
    idx = torch.randint(0, 11, (BATCH, TOKENS))
    targets = torch.randint(0, 11, (BATCH, TOKENS))
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert "tok.weight" in params
    assert "head.weight" not in params

    def loss_fn(p):
        return F.cross_entropy(functional_call(model, p, (idx,)).reshape(-1, 11), targets.reshape(-1))

    grads, stats, _ = macfn.grad_and_stats(model, loss_fn)(params)
    # The gradient is the sum over both uses, as autograd on the module accumulates it.
    F.cross_entropy(model(idx).reshape(-1, 11), targets.reshape(-1)).backward()
    torch.testing.assert_close(grads["tok.weight"], model.tok.weight.grad, rtol=FLOAT64_TOLERANCE,
                               atol=FLOAT64_TOLERANCE)
    with torch.no_grad():
        hidden = torch.tanh(model.mix(model.tok(idx)))

    config = macfn.MACConfig(lr=0.1, momentum=0.0, weight_decay=0.0, stat_decay=0.0, damping=0.5)
    new_params, _ = macfn.step(params, grads, stats, None, config)
    update = params["tok.weight"] - new_params["tok.weight"]
    if head == "linear":
        # The head's input statistics precondition the whole tied gradient.
        abar = hidden.reshape(-1, WIDTH).mean(0, keepdim=True)
        torch.testing.assert_close(stats["tok.weight"], abar, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
        expected = 0.1 * ref.dense_decoupled(grads["tok.weight"], abar, 0.5)
    else:
        # F.linear is no module: the tied weight has no statistics and takes the base update.
        assert "tok.weight" not in stats
        expected = 0.1 * grads["tok.weight"]
    torch.testing.assert_close(update, expected, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


# The kernel and the declaration checks.


def test_key_weights_match_explicit_softmax():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 3, 7, 4, generator=generator, dtype=torch.float64)
    allowed = torch.rand(2, 1, 5, 7, generator=generator) > 0.3
    allowed[1, 0, 2] = False  # a query with no allowed key counts for nothing
    query_padding = torch.tensor([[False] * 5, [False, False, False, False, True]])
    weights = macfn.attention_key_weights(q, k, attn_mask=allowed, query_padding_mask=query_padding, query_chunk=2)

    probabilities = _explicit_probabilities(q, k, allowed)
    x = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)  # identity inputs make vbar equal sbar
    sbar, _, _ = _reference_means(probabilities, x, ~query_padding)
    assert weights.shape == (2, 3, 7)
    keep = ~query_padding[:, None, :] & ~probabilities.isnan().any(-1)
    assert weights.sum().item() == pytest.approx(keep.sum().item())
    torch.testing.assert_close(weights.sum((0, 1)) / weights.sum(), sbar, rtol=FLOAT64_TOLERANCE,
                               atol=FLOAT64_TOLERANCE)


def test_key_weights_float_mask_adds_to_scores():
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 4, 3, generator=generator, dtype=torch.float64)
    k = torch.randn(1, 2, 4, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(1, 2, 4, 4, generator=generator, dtype=torch.float64)
    weights = macfn.attention_key_weights(q, k, attn_mask=bias, scale=0.5)
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, dim=-1).sum(2)
    torch.testing.assert_close(weights, expected, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_declaration_rejects_bad_input():
    attention = FusedAttention(WIDTH, HEADS)
    with pytest.raises(ValueError, match="finds those by type"):
        macfn.declare_attention(nn.MultiheadAttention(WIDTH, HEADS), qkv=attention.qkv, heads=HEADS)
    with pytest.raises(ValueError, match=r"must split into 3 \* heads = 9"):
        macfn.declare_attention(attention, qkv=attention.qkv, heads=3)
    with pytest.raises(ValueError, match="Missing projections"):
        macfn.declare_attention(attention, q=attention.qkv, heads=HEADS)
    with pytest.raises(ValueError, match="not both"):
        macfn.declare_attention(attention, qkv=attention.qkv, q=attention.proj, heads=HEADS)
    with pytest.raises(ValueError, match="Invalid heads=0"):
        macfn.declare_attention(attention, qkv=attention.qkv, heads=0)
    with pytest.raises(ValueError, match="Invalid qkv= of type Conv1d"):
        macfn.declare_attention(attention, qkv=nn.Conv1d(2, 2, 1), heads=HEADS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid attn_mask=3"):
        macfn.declare_attention(attention, qkv=attention.qkv, heads=HEADS, attn_mask=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid scale=-1"):
        macfn.declare_attention(attention, qkv=attention.qkv, heads=HEADS, scale=-1.0)


def test_recorder_rejects_bad_declarations():
    attention = FusedAttention(WIDTH, HEADS)
    model = Block(attention)
    declaration = macfn.declare_attention(attention, qkv=attention.qkv, heads=HEADS)
    with pytest.raises(ValueError, match="declared twice"):
        macfn.StatsRecorder(model, attention=[declaration, declaration])
    outsider = FusedAttention(WIDTH, HEADS)
    with pytest.raises(ValueError, match="not part of the model"):
        macfn.StatsRecorder(model, attention=[macfn.declare_attention(outsider, qkv=outsider.qkv, heads=HEADS)])
    with pytest.raises(ValueError, match="macfn.declare_attention"):
        macfn.StatsRecorder(model, attention=[attention])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"pass attention=\[declaration\]"):
        macfn.StatsRecorder(model, attention=declaration)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid attention_mean='mean'"):
        macfn.StatsRecorder(model, attention_mean="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid attention_query_chunk=0"):
        macfn.StatsRecorder(model, attention_query_chunk=0)
    shared = Block(attention)
    shared.other = nn.Linear(WIDTH, 3 * WIDTH)
    shared.other.weight = attention.qkv.weight
    with pytest.raises(ValueError, match="Invalid weight sharing for 'attn.qkv.weight'"):
        macfn.StatsRecorder(shared, attention=[declaration])


# The guide's examples run as written.

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"
GUIDE_BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(GUIDE_BLOCKS)))
def test_transformers_guide_example_runs(index):
    assert len(GUIDE_BLOCKS) >= 2
    exec(compile(GUIDE_BLOCKS[index], f"transformers.md[{index}]", "exec"), {})


MEMORY_PROBE = """
import resource, sys, torch, macfn
torch.set_num_threads(1)
q = torch.randn(2, 4, 1024, 16)
k = torch.randn(2, 4, 1024, 16)
macfn.attention_key_weights(q[:, :, :8], k[:, :, :8], causal=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chunk = None if sys.argv[1] == "all" else int(sys.argv[1])
macfn.attention_key_weights(q, k, causal=True, query_chunk=chunk)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_key_weights_peak_memory_bounded():
    # One [2, 4, 1024, 1024] float32 tensor is 32 MiB. The causal masks, row sums and allocator add about
    # 4 MiB on top (observed 36.2 MiB for one chunk and 6.5 MiB for chunks of 128 queries).
    full = 32.0
    overhead = 8.0
    grown = {}
    for chunk in ("all", "128"):
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, chunk], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        grown[chunk] = float(result.stdout)
    assert grown["all"] <= full + overhead, grown
    assert grown["128"] <= full / 8 + overhead, grown
