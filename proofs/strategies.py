"""Hypothesis strategies for property tests of MAC: shapes, damping, dtypes, layers and inputs.

Each strategy draws a small frozen record (:class:`PreconditionCase`, :class:`LayerCase`)
that the checkers in :mod:`proofs.checks` take apart, so a user's test suite can combine
them with its own layers::

    @given(case=strategies.precondition_cases())
    def test_precondition(case):
        checks.check_precondition(case.grad, case.mean_activation, case.damping, case.damping_form).require()

Tensors are drawn entry by entry from hypothesis floats, so shrinking reaches zeros, ones
and mixed magnitudes. Layer inputs come from a seeded generator with a drawn scale and
offset, because their entries matter only through their means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
from hypothesis import reject
from hypothesis import strategies as st
from torch import Tensor, nn

import macfn

from .convergence import TwoLayerProblem, make_problem

DampingForm = Literal["decoupled", "exact"]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
DAMPING_FORMS: tuple[DampingForm, ...] = ("decoupled", "exact")
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
PADDING_MODES: tuple[PaddingMode, ...] = ("zeros", "reflect", "replicate", "circular")

# Least damping exponent for the exact form in 16-bit dtypes: for rows of up to 16 entries of
# magnitude <= 1e2, |G_row| / rho stays below float16's maximum 65504 when rho >= 1e-2.
HALF_EXACT_MIN_DAMPING_EXPONENT = -2.0


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype of the statistics macfn records for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class PreconditionCase:
    """Inputs of one call of the MAC preconditioner.

    Attributes:
        grad: Gradient rows ``[blocks, rows, d]``.
        mean_activation: ``[blocks, d]``, float32 (float64 with a float64 gradient).
        damping: rho > 0.
        damping_form: ``"decoupled"`` or ``"exact"``.
    """

    grad: Tensor
    mean_activation: Tensor
    damping: float
    damping_form: DampingForm


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """A real layer and an input batch for it.

    Attributes:
        layer: An ``nn.Linear`` or ``nn.Conv2d`` with deterministic weights.
        x: Its input.
    """

    layer: nn.Module
    x: Tensor

    def __repr__(self) -> str:
        """Show the layer and the input's shape, dtype, mean and scale (the entries are seeded)."""
        x64 = self.x.to(torch.float64)
        return (f"LayerCase(layer={self.layer!r}, x=<{tuple(self.x.shape)} {self.x.dtype}, "
                f"mean {float(x64.mean()):.3g}, std {float(x64.std()) if x64.numel() > 1 else 0.0:.3g}>)")


def dtypes(allowed: Sequence[torch.dtype] = DTYPES) -> st.SearchStrategy[torch.dtype]:
    """Draw a floating dtype from ``allowed`` (float32, float64, bfloat16, float16 by default)."""
    return st.sampled_from(tuple(allowed))


def dampings(min_exponent: float = -8.0, max_exponent: float = 8.0) -> st.SearchStrategy[float]:
    """Draw damping rho = 10^e with e uniform in ``[min_exponent, max_exponent]``."""
    return st.floats(min_exponent, max_exponent, allow_nan=False).map(lambda e: float(10.0**e))


def stat_decays(max_value: float = 0.999) -> st.SearchStrategy[float]:
    """Draw stat_decay beta in ``[0, max_value]``, with 0 and the authors' 0.95 and 0.99 pinned."""
    return st.one_of(st.sampled_from((0.0, 0.95, 0.99)), st.floats(0.0, max_value, allow_nan=False))


def tensors(
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    max_magnitude: float = 1.0,
    min_magnitude_exponent: float = -3.0,
) -> st.SearchStrategy[Tensor]:
    """Draw a tensor entry by entry, with a bound drawn between ``10^min_magnitude_exponent`` and ``max_magnitude``.

    Entries are float32-representable, so that float32 and float64 cases share values, and
    are rounded to ``dtype``. The bound is drawn first, so that whole tensors of small and of
    huge entries both occur.

    Args:
        shape: The tensor's shape.
        dtype: Its dtype.
        max_magnitude: Largest absolute entry.
        min_magnitude_exponent: log10 of the smallest bound drawn.
    """
    size = math.prod(shape)
    top = math.log10(max_magnitude)

    @st.composite
    def draw_tensor(draw: st.DrawFn) -> Tensor:
        exponent = draw(st.floats(min(min_magnitude_exponent, top), top))
        bound = _float32_at_most(min(float(10.0**exponent), max_magnitude))
        elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
        values = draw(st.lists(elements, min_size=size, max_size=size))
        return torch.tensor(values, dtype=torch.float64).reshape(tuple(shape)).to(dtype)

    return draw_tensor()


def _float32_at_most(value: float) -> float:
    """Return the largest float32 value <= ``value`` (hypothesis needs float32 bounds for width=32)."""
    rounded = torch.tensor(value, dtype=torch.float32)
    if float(rounded) > value:
        rounded = torch.nextafter(rounded, torch.tensor(0.0, dtype=torch.float32))
    return float(rounded)


@st.composite
def precondition_cases(
    draw: st.DrawFn,
    *,
    allowed_dtypes: Sequence[torch.dtype] = DTYPES,
    damping_forms: Sequence[DampingForm] = DAMPING_FORMS,
    max_blocks: int = 3,
    max_rows: int = 5,
    max_dim: int = 12,
    max_activation: float = 1e4,
    max_gradient: float = 1e2,
    min_damping_exponent: float = -8.0,
    max_damping_exponent: float = 8.0,
) -> PreconditionCase:
    """Draw gradient rows, mean activations, damping and damping form for the preconditioner.

    The gradient takes the drawn dtype; the mean activation takes the dtype macfn's
    statistics have for it. For the exact form in a 16-bit dtype the damping stays at or
    above ``10^HALF_EXACT_MIN_DAMPING_EXPONENT`` so that ``G / rho`` is representable.
    """
    dtype = draw(dtypes(allowed_dtypes))
    damping_form = draw(st.sampled_from(tuple(damping_forms)))
    blocks = draw(st.integers(1, max_blocks))
    rows = draw(st.integers(1, max_rows))
    dim = draw(st.integers(1, max_dim))
    low = min_damping_exponent
    if damping_form == "exact" and dtype in HALF_DTYPES:
        low = max(low, HALF_EXACT_MIN_DAMPING_EXPONENT)
    grad = draw(tensors((blocks, rows, dim), dtype=dtype, max_magnitude=max_gradient))
    mean = draw(tensors((blocks, dim), dtype=statistics_dtype(dtype), max_magnitude=max_activation))
    damping = draw(dampings(low, max(low, max_damping_exponent)))
    return PreconditionCase(grad, mean, damping, damping_form)


def _seeded_input(shape: tuple[int, ...], seed: int, scale: float, offset: float, dtype: torch.dtype) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
    return values.to(dtype)


def _seed_weights(layer: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) / math.sqrt(max(p[0].numel(), 1)))


@st.composite
def inputs_scale_and_offset(draw: st.DrawFn, max_activation: float = 1e4) -> tuple[int, float, float]:
    """Draw ``(seed, scale, offset)`` for a seeded input ``randn * scale + offset``.

    ``|offset| + 4 * scale`` stays below ``max_activation``, so entries reach that magnitude.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    top = math.log10(max_activation)
    scale = float(10.0 ** draw(st.floats(-3.0, top - 0.7)))
    offset_bound = max_activation - 4 * scale
    offset = draw(st.one_of(st.just(0.0), st.floats(-offset_bound, offset_bound, allow_nan=False)))
    return seed, scale, offset


@st.composite
def linear_cases(
    draw: st.DrawFn,
    *,
    allowed_dtypes: Sequence[torch.dtype] = DTYPES,
    max_batch: int = 4,
    max_tokens: int = 3,
    max_in: int = 12,
    max_out: int = 5,
    max_activation: float = 1e4,
) -> LayerCase:
    """Draw an ``nn.Linear`` (with or without bias) and a ``[batch, d_in]`` or ``[batch, tokens, d_in]`` input.

    The batch may be a single row.
    """
    dtype = draw(dtypes(allowed_dtypes))
    d_in = draw(st.integers(1, max_in))
    d_out = draw(st.integers(1, max_out))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, max_batch))
    tokens = draw(st.one_of(st.none(), st.integers(1, max_tokens)))
    seed, scale, offset = draw(inputs_scale_and_offset(max_activation))
    layer = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    _seed_weights(layer, seed)
    shape = (batch, d_in) if tokens is None else (batch, tokens, d_in)
    return LayerCase(layer, _seeded_input(shape, seed, scale, offset, dtype))


@st.composite
def conv2d_cases(
    draw: st.DrawFn,
    *,
    allowed_dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    max_batch: int = 3,
    max_size: int = 7,
    max_activation: float = 1e4,
) -> LayerCase:
    """Draw an ``nn.Conv2d`` with random geometry and a ``[N, C, H, W]`` input.

    Kernel 1-3, stride 1-2, dilation 1-2, groups 1-3, padding as integers 0-2, ``"same"``
    (stride 1, as torch requires) or ``"valid"``, every padding mode, with or without bias.
    Geometries that torch rejects (reflect padding wider than the input, empty outputs)
    are rejected by hypothesis and redrawn.
    """
    dtype = draw(dtypes(allowed_dtypes))
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_kind = draw(st.sampled_from(("integers", "same", "valid")))
    padding: str | tuple[int, int]
    if padding_kind == "integers":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    else:
        padding = padding_kind
        stride = (1, 1) if padding_kind == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, max_batch))
    height, width = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    seed, scale, offset = draw(inputs_scale_and_offset(max_activation))

    layer = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=bias, padding_mode=padding_mode, dtype=dtype)
    _seed_weights(layer, seed)
    x = _seeded_input((batch, in_channels, height, width), seed, scale, offset, dtype)
    try:
        with torch.no_grad():
            out = layer(x)
    except RuntimeError:
        reject()
    if out.numel() == 0:
        reject()
    return LayerCase(layer, x)


@st.composite
def mac_configs(
    draw: st.DrawFn,
    *,
    damping_forms: Sequence[DampingForm] = DAMPING_FORMS,
    min_damping_exponent: float = -4.0,
    max_damping_exponent: float = 4.0,
    max_stat_decay: float = 0.99,
) -> macfn.MACConfig:
    """Draw a ``macfn.MACConfig`` with random damping, damping form and stat_decay."""
    return macfn.MACConfig(
        damping=draw(dampings(min_damping_exponent, max_damping_exponent)),
        damping_form=draw(st.sampled_from(tuple(damping_forms))),
        stat_decay=draw(stat_decays(max_stat_decay)),
    )


@st.composite
def two_layer_problems(
    draw: st.DrawFn,
    *,
    min_samples: int = 2,
    max_samples: int = 8,
    min_dim: int = 2,
    max_dim: int = 6,
    min_width: int = 2,
    max_width: int = 2048,
) -> TwoLayerProblem:
    """Draw a two-layer ReLU problem: sample count, input dimension, even width, seed and mean offset.

    The width is drawn log-uniformly so that narrow and wide networks both occur.
    """
    samples = draw(st.integers(min_samples, max_samples))
    dim = draw(st.integers(min_dim, max_dim))
    exponent = draw(st.floats(math.log2(max(min_width, 2)), math.log2(max_width)))
    width = max(2, min(max_width, 2 * round(2.0**exponent / 2)))
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.floats(0.0, 2.0))
    return make_problem(samples, dim, width, seed, mean_offset=offset)
