"""Compare macfn's own functions with references that are computed without macfn.

Every reference here is built from the definition, never from macfn's formulas:

- the preconditioned gradient solves ``Ghat (rho I + abar abar^T) = G`` with the dense
  ``d x d`` factor. The solve runs in 50-digit arithmetic (mpmath) for
  ``d <= HIGH_PRECISION_MAX_DIM`` and with ``torch.linalg.solve`` in float64 above. The
  decoupled form is ``rho`` times that solution;
- the mean activation of a Linear layer is the float64 mean of its flattened input rows;
- the mean activation of a Conv2d layer is the float64 mean of the im2col patches. They are
  taken from ``F.unfold`` on the padded input and, independently, from the layer's own
  forward pass with one-hot kernels, which reads each patch entry into its own output channel.

A check returns :class:`Comparison` records (measured error, tolerance); ``require()``
raises ``AssertionError`` with both numbers. Errors are measured row by row, relative to
the norm of the gradient row, because the subtraction ``G - c abar^T`` cancels when a row is
almost parallel to ``abar`` and no elementwise relative bound can hold there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import mpmath  # type: ignore[import-untyped, unused-ignore]
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import macfn
from macfn import _kernels

DampingForm = Literal["decoupled", "exact"]

# ---------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------

# Unit roundoff of each dtype (half the machine epsilon): the error of rounding one value.
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}

# Spacing of the subnormal numbers of each dtype: the absolute error of rounding near zero.
SUBNORMAL_SPACING: dict[torch.dtype, float] = {
    dtype: torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}

# Row error of the preconditioner, in units of d * u(accumulation dtype) * |G_row|, because the
# dot product G abar and |abar|^2 each carry up to d roundings. Observed at most 1.9 (float32
# exact form with d = 1, where the division by rho adds a rounding) in 1,500 hypothesis cases.
DOT_PRODUCT_ERROR_FACTOR = 4.0

# Row error from rounding the result to the gradient's dtype, in units of u(dtype) * |G_row|,
# because each entry is rounded once and |Ghat_row| <= |G_row|. Observed at most 0.82 for
# bfloat16 and float16, float32 accumulation included, in the same 1,500 cases.
OUTPUT_ROUNDING_FACTOR = 1.5

# Error of a mean of n values relative to the mean of their absolute values, in units of
# u * log2(n), because torch sums in a cascade. Observed at most 1.1 on 600 hypothesis Linear and
# Conv2d cases, whose selector contractions add up to N * H_pad * W_pad terms.
MEAN_SUM_ERROR_FACTOR = 8.0

# Relative error of the bias-corrected running mean in units of u(dtype) / (1 - stat_decay),
# on top of k * u from rounding in k updates. The correction 1 - beta^k cancels when beta is close
# to 1, so its rounding error relative to the result grows like u / (k (1 - beta)); macfn computes
# it in float64. Observed at most 0.23 in 600 random cases (float32 and float64, beta up to 0.99999).
BIAS_CORRECTION_ERROR_FACTOR = 4.0

# Dimension up to which the dense reference is solved in 50-digit arithmetic. One LU and six
# solves took 16 ms for d = 12 and 1.2 s for d = 64 on the loaded 2-core development machine.
HIGH_PRECISION_MAX_DIM = 48
HIGH_PRECISION_DIGITS = 50


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One measured error against its tolerance.

    Attributes:
        name: What was compared, e.g. ``"precondition decoupled float32"``.
        error: The measured error, in the metric the tolerance uses.
        tolerance: The largest error accepted.
    """

    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """Whether the error is finite and within the tolerance."""
        return math.isfinite(self.error) and self.error <= self.tolerance

    def require(self) -> None:
        """Raise AssertionError with the numbers unless the comparison passed."""
        if not self.passed:
            raise AssertionError(f"{self.name}: error {self.error:.3e} exceeds tolerance {self.tolerance:.3e}")


def require_all(comparisons: Sequence[Comparison]) -> None:
    """Raise AssertionError naming every comparison that failed."""
    failed = [c for c in comparisons if not c.passed]
    if failed:
        lines = [f"{c.name}: error {c.error:.3e} > tolerance {c.tolerance:.3e}" for c in failed]
        raise AssertionError("; ".join(lines))


def accumulation_unit_roundoff(dtype: torch.dtype) -> float:
    """Return the unit roundoff of the dtype that macfn accumulates ``dtype`` values in.

    This is a statement about macfn's documented contract (float64 stays float64, narrower
    dtypes accumulate in float32), checked by the tolerances, not a copy of its code.
    """
    return UNIT_ROUNDOFF[torch.float64] if dtype == torch.float64 else UNIT_ROUNDOFF[torch.float32]


def precondition_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Return the accepted row error of the decoupled preconditioner, relative to ``|G_row|``.

    Args:
        dtype: The gradient's dtype.
        dim: The row length ``d``.
    """
    compute = DOT_PRODUCT_ERROR_FACTOR * max(dim, 1) * accumulation_unit_roundoff(dtype)
    # float32 and float64 results leave the accumulation dtype unrounded; 16-bit results are rounded once more.
    narrow = dtype in (torch.bfloat16, torch.float16)
    rounding = OUTPUT_ROUNDING_FACTOR * UNIT_ROUNDOFF[dtype] if narrow else 0.0
    return compute + rounding


# ---------------------------------------------------------------------------
# References (no macfn code)
# ---------------------------------------------------------------------------


def damped_factor(mean_activation: Tensor, damping: float) -> Tensor:
    """Build the dense Kronecker factor ``abar abar^T + rho I``.

    Args:
        mean_activation: ``[d]``.
        damping: rho > 0.

    Returns:
        ``[d, d]`` in float64.
    """
    abar = mean_activation.detach().to(torch.float64).cpu()
    return torch.outer(abar, abar) + damping * torch.eye(abar.numel(), dtype=torch.float64)


def _solve_high_precision(rows: Tensor, mean_activation: Tensor, damping: float) -> Tensor:
    """Solve ``X (abar abar^T + rho I) = rows`` by LU in 50-digit arithmetic.

    Every float64 input converts to an mpmath number exactly and the products ``a_i a_j``
    are exact. The diagonal sums and the LU round at about 1e-50 relative, so for condition
    numbers up to about 1e30 the final rounding to float64 is the only error that matters.
    """
    dim = mean_activation.numel()
    abar = [float(v) for v in mean_activation.tolist()]
    solutions = torch.empty_like(rows)
    with mpmath.workdps(HIGH_PRECISION_DIGITS):
        factor = mpmath.matrix(dim, dim)
        for i in range(dim):
            for j in range(dim):
                factor[i, j] = mpmath.mpf(abar[i]) * mpmath.mpf(abar[j])
            factor[i, i] += mpmath.mpf(damping)
        # The factor is symmetric, so X F = R is F X^T = R^T: one LU, one solve per row.
        lower_upper, pivots = mpmath.mp.LU_decomp(factor)
        for r, row in enumerate(rows.tolist()):
            rhs = mpmath.matrix([mpmath.mpf(v) for v in row])
            x = mpmath.mp.U_solve(lower_upper, mpmath.mp.L_solve(lower_upper, rhs, pivots))
            solutions[r] = torch.tensor([float(x[i]) for i in range(dim)], dtype=torch.float64)
    return solutions


def reference_precondition(grad: Tensor, mean_activation: Tensor, damping: float, damping_form: DampingForm) -> Tensor:
    """Apply ``((abar abar^T + rho I) kron I)^-1`` to gradient rows with the dense factor.

    The exact form solves ``Ghat (abar abar^T + rho I) = G``; the decoupled form, which the
    MAC authors' code uses, is ``rho`` times that solution.

    Args:
        grad: ``[blocks, rows, d]`` in any dtype; converted to float64 exactly.
        mean_activation: ``[blocks, d]``.
        damping: rho > 0.
        damping_form: ``"decoupled"`` or ``"exact"``.

    Returns:
        ``[blocks, rows, d]`` in float64. For ``d <= HIGH_PRECISION_MAX_DIM`` the error is
        one float64 rounding per entry; above, the float64 solve loses up to about
        ``cond(F) * d * u64`` with ``cond(F) = 1 + |abar|^2 / rho``.
    """
    g = grad.detach().to(torch.float64).cpu()
    means = mean_activation.detach().to(torch.float64).cpu()
    result = torch.empty_like(g)
    for block in range(g.shape[0]):
        if g.shape[2] <= HIGH_PRECISION_MAX_DIM:
            result[block] = _solve_high_precision(g[block], means[block], damping)
        else:
            factor = damped_factor(means[block], damping)
            result[block] = torch.linalg.solve(factor, g[block].T).T
    if damping_form == "decoupled":
        result = result * damping
    return result


def reference_solve_error(mean_activation: Tensor, damping: float) -> float:
    """Return the relative row error of :func:`reference_precondition` itself.

    Zero below ``HIGH_PRECISION_MAX_DIM`` (one float64 rounding, covered by the tolerances);
    above, about ``cond(F) * d * u64``, the bound for a backward-stable float64 solve.
    """
    dim = mean_activation.shape[-1]
    if dim <= HIGH_PRECISION_MAX_DIM:
        return 0.0
    squared = float(mean_activation.detach().to(torch.float64).pow(2).sum(-1).max())
    return 4.0 * (1.0 + squared / damping) * dim * UNIT_ROUNDOFF[torch.float64]


def reference_linear_mean(x: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """Average the flattened input rows of a Linear layer in float64.

    Args:
        x: ``[..., d_in]``.
        bias: Append the constant input 1 of a bias.

    Returns:
        ``(mean [1, d], mean_abs [1, d])``: the mean, and the mean of absolute values that
        bounds the summation error.
    """
    rows = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows.mean(dim=0, keepdim=True), rows.abs().mean(dim=0, keepdim=True)


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int, int, int] | None:
    """Return ``(left, right, top, bottom)`` for integer padding, None for string padding."""
    if isinstance(module.padding, str):
        return None
    pad_h, pad_w = int(module.padding[0]), int(module.padding[1])
    return (pad_w, pad_w, pad_h, pad_h)


def reference_conv2d_patches_unfold(module: nn.Conv2d, x: Tensor) -> Tensor | None:
    """Build the im2col patches of a Conv2d input with ``F.pad`` and ``F.unfold`` in float64.

    Args:
        module: The layer; only its geometry is read.
        x: ``[N, C, H, W]``.

    Returns:
        ``[groups, N * L, C / groups * kh * kw]`` with ``L`` output positions, or None when
        the layer pads with "same" or "valid" (see :func:`reference_conv2d_patches_probe`).
    """
    padding = _explicit_padding(module)
    if padding is None:
        return None
    image = x.detach().to(torch.float64)
    if any(padding):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        image = F.pad(image, padding, mode=mode)
    columns = F.unfold(image, module.kernel_size, dilation=module.dilation, stride=module.stride)
    batch, length = columns.shape[0], columns.shape[2]
    groups = module.groups
    per_group = columns.shape[1] // groups
    # [N, C * kh * kw, L] -> [groups, N * L, C / groups * kh * kw]; unfold orders channels first.
    grouped = columns.reshape(batch, groups, per_group, length).permute(1, 0, 3, 2)
    return grouped.reshape(groups, batch * length, per_group)


def reference_conv2d_patches_probe(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Read the im2col patches out of the layer's own forward pass with one-hot kernels.

    A copy of ``module`` in float64 gets ``C / groups * kh * kw`` output channels per group,
    one per patch entry, each with a one-hot kernel, and no bias. Its output at every
    position is then the patch itself, whatever the padding, padding mode, stride, dilation
    or groups, because nn.Conv2d computes exactly that contraction.

    Returns:
        ``[groups, N * L, C / groups * kh * kw]`` in float64.
    """
    groups = module.groups
    per_group = module.in_channels // groups * module.kernel_size[0] * module.kernel_size[1]
    probe = nn.Conv2d(
        module.in_channels,
        groups * per_group,
        module.kernel_size,  # type: ignore[arg-type]
        stride=module.stride,  # type: ignore[arg-type]
        padding=module.padding,  # type: ignore[arg-type]
        dilation=module.dilation,  # type: ignore[arg-type]
        groups=groups,
        bias=False,
        padding_mode=module.padding_mode,
        dtype=torch.float64,
    )
    one_hot = torch.eye(per_group, dtype=torch.float64).reshape(per_group, -1, *module.kernel_size)
    with torch.no_grad():
        probe.weight.copy_(one_hot.repeat(groups, 1, 1, 1))
        out: Tensor = probe(x.detach().to(torch.float64))
    batch, _, out_h, out_w = out.shape
    grouped = out.reshape(batch, groups, per_group, out_h * out_w).permute(1, 0, 3, 2)
    return grouped.reshape(groups, batch * out_h * out_w, per_group)


# ---------------------------------------------------------------------------
# Checks of macfn's kernels
# ---------------------------------------------------------------------------


def _row_errors(result: Tensor, reference: Tensor, grad: Tensor, allowance: Tensor | float = 0.0) -> Tensor:
    """Return ``max(|result_row - reference_row| - allowance, 0) / |G_row|``.

    ``allowance`` is an absolute error per row (see :func:`underflow_allowance`); a row whose
    error is within it, including a zero row matched exactly, gets 0.
    """
    diff = (result.to(torch.float64) - reference).norm(dim=-1)
    excess = (diff - allowance).clamp_min(0.0)
    scale = grad.to(torch.float64).norm(dim=-1)
    return torch.where(excess == 0, torch.zeros_like(excess), excess / scale)


def mask_overflow(result: Tensor, reference: Tensor) -> tuple[Tensor, Tensor] | None:
    """Zero the entries whose reference overflows ``result``'s dtype; None if ``result`` differs there.

    Rounding a float64 value beyond a dtype's range gives +-inf, so ``result`` must hold the
    same infinity exactly where ``reference.to(result.dtype)`` does (the exact form divides by
    rho, which overflows float16 for small rho). The remaining entries are compared as usual.

    Returns:
        ``(result, reference)`` in float64 with the overflowing entries set to 0, or None.
    """
    expected = reference.to(result.dtype)
    overflow = expected.isinf()
    if not torch.equal(result.isinf(), overflow) or not torch.equal(result[overflow], expected[overflow]):
        return None
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(overflow, zero, result.to(torch.float64)), torch.where(overflow, zero, reference)


def underflow_allowance(dtype: torch.dtype, mean_activation: Tensor, damping: float,
                        damping_form: DampingForm) -> Tensor:
    """Return the absolute row error that gradual underflow may add, per block ``[blocks, 1]``.

    Relative bounds fail once results reach the subnormal range, where the spacing of
    representable values is fixed: ``SUBNORMAL_SPACING`` of the output dtype for the final
    rounding, and of the accumulation dtype, times ``1 + |abar|``, for the coefficient of
    ``abar``. Each of the ``d`` entries may be off by that spacing.
    """
    dim = mean_activation.shape[-1]
    abar_norm = mean_activation.to(torch.float64).norm(dim=-1, keepdim=True)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    compute = SUBNORMAL_SPACING[accumulation] * (1.0 + abar_norm)
    if damping_form == "exact":
        compute = compute / damping
    allowance: Tensor = math.sqrt(dim) * (SUBNORMAL_SPACING[dtype] + compute)
    return allowance


def check_precondition(
    grad: Tensor, mean_activation: Tensor, damping: float, damping_form: DampingForm
) -> Comparison:
    """Compare ``macfn._kernels.precondition`` with the dense reference.

    The error is the largest row error ``|Ghat_row - ref_row| / |G_row|``, scaled by rho for
    the exact form so that both forms share one tolerance.

    Args:
        grad: ``[blocks, rows, d]`` in float32, float64, bfloat16 or float16.
        mean_activation: ``[blocks, d]`` (float32 or float64, as macfn's statistics are).
        damping: rho > 0.
        damping_form: ``"decoupled"`` or ``"exact"``.
    """
    result = _kernels.precondition(grad, mean_activation, damping, damping_form)
    reference = reference_precondition(grad, mean_activation, damping, damping_form)
    tolerance = precondition_tolerance(grad.dtype, grad.shape[-1]) + reference_solve_error(mean_activation, damping)
    name = f"precondition {damping_form} {str(grad.dtype).removeprefix('torch.')}"
    masked = mask_overflow(result, reference)
    if result.dtype != grad.dtype or result.shape != grad.shape or masked is None:
        return Comparison(name, math.inf, tolerance)

    allowance = underflow_allowance(grad.dtype, mean_activation, damping, damping_form)
    errors = _row_errors(masked[0], masked[1], grad, allowance)
    if damping_form == "exact":
        errors = errors * damping
    worst = float(errors.max()) if errors.numel() else 0.0
    if torch.isnan(errors).any():
        worst = math.inf
    return Comparison(name, worst, tolerance)


def check_zero_mean_is_identity(grad: Tensor, damping: float, damping_form: DampingForm) -> Comparison:
    """Check that ``abar = 0`` leaves G unchanged (decoupled) or scales it by 1/rho (exact)."""
    zeros = torch.zeros(grad.shape[0], grad.shape[2], dtype=torch.float32 if grad.dtype != torch.float64 else grad.dtype)
    result = _kernels.precondition(grad, zeros, damping, damping_form).to(torch.float64)
    expected = grad.to(torch.float64) / (damping if damping_form == "exact" else 1.0)
    errors = _row_errors(result, expected, grad, underflow_allowance(grad.dtype, zeros, damping, damping_form))
    if damping_form == "exact":
        errors = errors * damping
    # The decoupled result must be bit-identical; the exact one is G / rho rounded once.
    tolerance = 0.0 if damping_form == "decoupled" else OUTPUT_ROUNDING_FACTOR * UNIT_ROUNDOFF[grad.dtype] * 2
    worst = float(errors.max()) if errors.numel() else 0.0
    return Comparison(f"zero mean activation gives the identity ({damping_form})", worst, tolerance)


def check_large_damping_limit(grad: Tensor, mean_activation: Tensor, damping: float) -> Comparison:
    """Check the decoupled update's distance from G against its limit as damping grows.

    The decoupled preconditioner differs from the identity by ``abar abar^T / (rho + |abar|^2)``,
    so ``|Ghat_row - G_row| <= |G_row| |abar|^2 / (rho + |abar|^2)``, which tends to 0 as
    ``rho -> infinity``. The bound is evaluated in float64 from the inputs.
    """
    result = _kernels.precondition(grad, mean_activation, damping, "decoupled").to(torch.float64)
    squared = mean_activation.to(torch.float64).pow(2).sum(-1)
    bound = (squared / (damping + squared))[:, None]
    allowance = underflow_allowance(grad.dtype, mean_activation, damping, "decoupled")
    errors = _row_errors(result, grad.to(torch.float64), grad, allowance) - bound
    worst = float(errors.max()) if errors.numel() else 0.0
    tolerance = precondition_tolerance(grad.dtype, grad.shape[-1])
    return Comparison("large damping tends to the identity (excess over the bound)", max(worst, 0.0), tolerance)


def orthogonal_rows(grad: Tensor, mean_activation: Tensor) -> Tensor:
    """Project every gradient row onto the orthogonal complement of its block's ``abar`` in float64.

    Returns:
        ``[blocks, rows, d]`` in float64, orthogonal to ``abar`` up to one rounding.
    """
    g = grad.to(torch.float64)
    abar = mean_activation.to(torch.float64)
    squared = abar.pow(2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    coefficient = torch.einsum("brd,bd->br", g, abar) / squared[:, None]
    return g - coefficient[..., None] * abar[:, None, :]


def check_orthogonal_rows_unchanged(grad: Tensor, mean_activation: Tensor, damping: float) -> Comparison:
    """Check that rows orthogonal to ``abar`` pass the decoupled preconditioner unchanged.

    The rows of ``grad`` are projected off ``abar`` in float64 and rounded to ``grad.dtype``.
    The projection and the rounding leave a component along ``abar`` of up to about
    ``d * u * |G_row|``, which the preconditioner may shrink. Errors are therefore measured
    relative to the original row ``|G_row|``, because a row parallel to abar projects to
    rounding noise, and the tolerance adds that residue to the preconditioner's.
    """
    rows = orthogonal_rows(grad, mean_activation).to(grad.dtype)
    result = _kernels.precondition(rows, mean_activation, damping, "decoupled")
    allowance = underflow_allowance(grad.dtype, mean_activation, damping, "decoupled")
    errors = _row_errors(result, rows.to(torch.float64), grad, allowance)
    worst = float(errors.max()) if errors.numel() else 0.0
    tolerance = precondition_tolerance(grad.dtype, grad.shape[-1]) + 2 * UNIT_ROUNDOFF[grad.dtype] * grad.shape[-1]
    return Comparison("rows orthogonal to the mean activation pass unchanged", worst, tolerance)


def check_mean_direction_scaled(mean_activation: Tensor, coefficients: Tensor, damping: float) -> Comparison:
    """Check that rows ``c abar^T`` come out as ``c abar^T * rho / (rho + |abar|^2)``.

    Args:
        mean_activation: ``[blocks, d]`` in float64.
        coefficients: ``[blocks, rows]`` in float64.
        damping: rho > 0.
    """
    abar = mean_activation.to(torch.float64)
    rows = coefficients[..., None] * abar[:, None, :]
    result = _kernels.precondition(rows, abar, damping, "decoupled")
    squared = abar.pow(2).sum(-1)
    expected = rows * (damping / (damping + squared))[:, None, None]
    errors = _row_errors(result, expected, rows)
    worst = float(errors.max()) if errors.numel() else 0.0
    return Comparison("rows along abar are scaled by rho / (rho + |abar|^2)", worst,
                      precondition_tolerance(torch.float64, rows.shape[-1]))


def check_linearity(
    first: Tensor, second: Tensor, alpha: float, beta: float, mean_activation: Tensor, damping: float,
    damping_form: DampingForm,
) -> Comparison:
    """Check ``precondition(alpha G1 + beta G2) = alpha precondition(G1) + beta precondition(G2)`` in float64.

    The error is relative to ``|alpha| |G1_row| + |beta| |G2_row|``, the scale of every term.
    """
    g1, g2 = first.to(torch.float64), second.to(torch.float64)
    combined = _kernels.precondition(alpha * g1 + beta * g2, mean_activation, damping, damping_form)
    separate = (alpha * _kernels.precondition(g1, mean_activation, damping, damping_form)
                + beta * _kernels.precondition(g2, mean_activation, damping, damping_form))
    scale = abs(alpha) * g1.norm(dim=-1) + abs(beta) * g2.norm(dim=-1)
    diff = (combined - separate).norm(dim=-1)
    if damping_form == "exact":
        diff = diff * damping
    errors = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)
    worst = float(errors.max()) if errors.numel() else 0.0
    # Three preconditioner calls and two float64 sums each add one tolerance's worth.
    return Comparison("update is linear in G", worst, 4 * precondition_tolerance(torch.float64, g1.shape[-1]))


def check_constant_statistic(statistic: Tensor, stat_decay: float, updates: int) -> Comparison:
    """Check that a constant statistic averaged ``updates`` times comes back unchanged after bias correction.

    Runs ``macfn._kernels.update_running_mean`` from zero and ``bias_corrected_mean`` after
    every update; the error is the largest relative deviation from the statistic.

    Args:
        statistic: ``[blocks, d]`` in float32 or float64.
        stat_decay: beta in [0, 1).
        updates: Number of updates k >= 1.
    """
    running = torch.zeros_like(statistic)
    worst = 0.0
    for count in range(1, updates + 1):
        running = _kernels.update_running_mean(running, statistic, stat_decay)
        corrected = _kernels.bias_corrected_mean(running, torch.tensor(count), stat_decay)
        diff = (corrected.to(torch.float64) - statistic.to(torch.float64)).abs()
        scale = statistic.to(torch.float64).abs()
        errors = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)
        worst = max(worst, float(errors.max()) if errors.numel() else 0.0)
    unit = UNIT_ROUNDOFF[statistic.dtype]
    # Each update also rounds once, and the rounding errors of k updates add up.
    tolerance = BIAS_CORRECTION_ERROR_FACTOR * unit / (1.0 - stat_decay) + 4 * updates * unit
    return Comparison(f"bias-corrected mean of a constant statistic (beta={stat_decay:g}, k={updates})", worst, tolerance)


# ---------------------------------------------------------------------------
# Checks of the capture and the step on real layers
# ---------------------------------------------------------------------------


def _mean_tolerance(dtype: torch.dtype, count: int) -> float:
    return MEAN_SUM_ERROR_FACTOR * accumulation_unit_roundoff(dtype) * max(math.log2(max(count, 2)), 1.0)


def _compare_means(name: str, stats: Tensor, reference: Tensor, mean_abs: Tensor, dtype: torch.dtype,
                   count: int) -> Comparison:
    diff = (stats.to(torch.float64) - reference).abs()
    scale = mean_abs.clamp_min(torch.finfo(torch.float64).tiny)
    worst = float((diff / scale).max()) if diff.numel() else 0.0
    if stats.shape != reference.shape:
        worst = math.inf
    return Comparison(name, worst, _mean_tolerance(dtype, count))


def reference_mean_activation(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Compute a layer's mean activation from its definition in float64.

    Args:
        layer: An ``nn.Linear`` or ``nn.Conv2d``.
        x: Its input.

    Returns:
        ``(mean [blocks, d], mean_abs [blocks, d], count)``, with the bias input 1 appended
        when the layer has a bias, and the number of rows or patches averaged.

    Raises:
        TypeError: ``layer`` is neither nn.Linear nor nn.Conv2d.
    """
    if isinstance(layer, nn.Linear):
        mean, mean_abs = reference_linear_mean(x, layer.bias is not None)
        return mean, mean_abs, x.numel() // max(x.shape[-1], 1)
    if isinstance(layer, nn.Conv2d):
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        patches = reference_conv2d_patches_probe(layer, batched)
        if layer.bias is not None:
            patches = torch.cat([patches, patches.new_ones(*patches.shape[:2], 1)], dim=2)
        return patches.mean(dim=1), patches.abs().mean(dim=1), patches.shape[1]
    raise TypeError(f"Invalid layer of type {type(layer).__name__}: expected nn.Linear or nn.Conv2d.")


def check_conv2d_patch_mean(layer: nn.Conv2d, x: Tensor) -> list[Comparison]:
    """Compare the mean activation that ``macfn.grad_and_stats`` records for a Conv2d layer with im2col.

    Two references: ``F.unfold`` on the explicitly padded input (integer padding only) and the
    layer's own forward pass with one-hot kernels (every padding form).

    Args:
        layer: A real ``nn.Conv2d`` (any padding, padding mode, stride, dilation, groups).
        x: ``[N, C, H, W]`` input.
    """
    stats = _capture_stats(layer, x)
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    probe = reference_conv2d_patches_probe(layer, batched)
    if layer.bias is not None:
        probe = torch.cat([probe, probe.new_ones(*probe.shape[:2], 1)], dim=2)
    count = probe.shape[1]
    comparisons = [_compare_means("conv2d patch mean vs one-hot conv probe", stats, probe.mean(dim=1),
                                  probe.abs().mean(dim=1), x.dtype, count)]
    unfolded = reference_conv2d_patches_unfold(layer, batched)
    if unfolded is not None:
        if layer.bias is not None:
            unfolded = torch.cat([unfolded, unfolded.new_ones(*unfolded.shape[:2], 1)], dim=2)
        comparisons.append(_compare_means("conv2d patch mean vs F.unfold im2col", stats, unfolded.mean(dim=1),
                                          unfolded.abs().mean(dim=1), x.dtype, count))
    return comparisons


def _probe_loss(layer: nn.Module, seed: int) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """Build ``loss(params, x) = sum(layer(x) * R)`` with a fixed random R, so every output row has a gradient."""
    weights: dict[tuple[int, ...], Tensor] = {}

    def loss(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(layer, dict(params), (x,))
        key = tuple(out.shape)
        if key not in weights:
            generator = torch.Generator().manual_seed(seed)
            weights[key] = torch.randn(key, generator=generator, dtype=torch.float64).to(out.dtype)
        return (out * weights[key]).sum()

    return loss


def _capture_stats(layer: nn.Module, x: Tensor) -> Tensor:
    compute = macfn.grad_and_stats(layer, _probe_loss(layer, seed=0))
    try:
        params = {name: p.detach() for name, p in layer.named_parameters()}
        _, stats, _ = compute(params, x)
    finally:
        compute.remove()
    weight_stats: Tensor = stats["weight"]
    return weight_stats


def mac_direction(
    grads: Mapping[str, Tensor], stats: Mapping[str, Tensor], config: macfn.MACConfig
) -> dict[str, Tensor]:
    """Return the preconditioned gradient that one ``macfn.step`` from a fresh state applies.

    The step runs with ``config``'s damping, damping form and stat_decay, but with learning
    rate 1, no momentum and no weight decay, from all-zero parameters. Without weight decay
    the direction does not depend on the parameter values. ``0 - 1 * d`` is exactly ``-d``,
    so the returned tensors are macfn's directions without any rounding added.
    Parameter groups with their own base update are dropped, so every parameter takes the
    plain preconditioned gradient, and a non-finite input raises instead of skipping the step.

    Args:
        grads: A gradient for every parameter, keyed by name.
        stats: Mean activations from ``macfn.grad_and_stats``.
        config: The hyperparameters under test.

    Returns:
        The direction of every parameter, keyed like ``grads``.
    """
    directions, _ = _step_directions(grads, stats, config, None)
    return directions


def _step_directions(
    grads: Mapping[str, Tensor], stats: Mapping[str, Tensor], config: macfn.MACConfig, state: macfn.MACState | None
) -> tuple[dict[str, Tensor], macfn.MACState]:
    step_config = config.replace(lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, base_updates=(),
                                 nonfinite="raise")
    zeros = {name: torch.zeros_like(g) for name, g in grads.items()}
    new_params, new_state = macfn.step(zeros, dict(grads), dict(stats), state, step_config)
    return {name: -value for name, value in new_params.items()}, new_state


def check_layer(layer: nn.Module, x: Tensor, config: macfn.MACConfig | None = None, *, seed: int = 0) -> list[Comparison]:
    """Check macfn on one ``nn.Linear`` or ``nn.Conv2d``: its statistics and its step direction.

    Runs ``macfn.grad_and_stats`` with the loss ``sum(layer(x) * R)`` (R random, fixed by
    ``seed``), then one ``macfn.step`` from a fresh state, and compares

    1. the recorded mean activation with :func:`reference_mean_activation`;
    2. the step direction of the weight (and of the bias, which shares the preconditioner)
       with the dense reference built from the reference mean activation.

    The step uses ``config``'s damping, damping form and stat_decay, and returns the
    preconditioned gradient through :func:`mac_direction`.

    The direction's tolerance adds the sensitivity of the preconditioner to an error in
    ``abar``: ``|dP| <= 4 |abar| |d abar| / (rho + |abar|^2)``, with ``|d abar|`` bounded by
    the statistics' tolerance and the bias correction's rounding.

    Args:
        layer: The layer, in any floating dtype its input has.
        x: Its input (a batch of one is allowed).
        config: Hyperparameters; ``MACConfig()`` when None.
        seed: Seed of the random output weights R.

    Returns:
        One comparison for the statistics and one for the direction.

    Raises:
        TypeError: ``layer`` is neither nn.Linear nor nn.Conv2d.
    """
    config = macfn.MACConfig() if config is None else config
    mean, mean_abs, count = reference_mean_activation(layer, x)

    compute = macfn.grad_and_stats(layer, _probe_loss(layer, seed))
    try:
        params = {name: p.detach() for name, p in layer.named_parameters()}
        grads, stats, _ = compute(params, x)
    finally:
        compute.remove()
    weight_stats = stats["weight"]
    comparisons = [_compare_means(f"{type(layer).__name__} mean activation", weight_stats, mean, mean_abs, x.dtype,
                                  count)]

    direction = mac_direction(grads, stats, config)
    direction_name = f"{type(layer).__name__} step direction ({config.damping_form})"

    weight_grad = grads["weight"]
    out_rows = weight_grad.shape[0]
    rows = weight_grad.reshape(out_rows, -1)
    directions = direction["weight"].reshape(out_rows, -1)
    if "bias" in grads:
        rows = torch.cat([rows, grads["bias"].reshape(out_rows, 1)], dim=1)
        directions = torch.cat([directions, direction["bias"].reshape(out_rows, 1)], dim=1)
    blocks = mean.shape[0]
    shape = (blocks, out_rows // blocks, rows.shape[1])
    grad_blocks = rows.reshape(shape)
    reference = reference_precondition(grad_blocks, mean, config.damping, config.damping_form)
    masked = mask_overflow(directions.reshape(shape), reference)
    if masked is None:
        return [*comparisons, Comparison(direction_name, math.inf, 0.0)]
    allowance = underflow_allowance(weight_grad.dtype, mean, config.damping, config.damping_form)
    errors = _row_errors(masked[0], masked[1], grad_blocks, allowance)
    if config.damping_form == "exact":
        errors = errors * config.damping

    abar_norm = mean.norm(dim=-1)
    stats_error = _mean_tolerance(x.dtype, count) * mean_abs.norm(dim=-1)
    correction_error = (BIAS_CORRECTION_ERROR_FACTOR * UNIT_ROUNDOFF[weight_stats.dtype]
                        / (1.0 - config.stat_decay)) * abar_norm
    sensitivity = 4 * abar_norm * (stats_error + correction_error) / (config.damping + abar_norm**2)
    tolerance = (precondition_tolerance(weight_grad.dtype, rows.shape[1]) + float(sensitivity.max())
                 + reference_solve_error(mean, config.damping))
    worst = float(errors.max()) if errors.numel() else 0.0
    comparisons.append(Comparison(direction_name, worst, tolerance))
    return comparisons


def check_step_constant_statistic(case_grad: Tensor, statistic: Tensor, config: macfn.MACConfig,
                                  steps: int) -> Comparison:
    """Check that ``macfn.step`` fed one statistic ``steps`` times preconditions with that statistic.

    A ``[rows, d]`` weight gets the same gradient and the same ``[1, d]`` statistic at every
    step, carried through the state's running average and its bias correction. The direction
    of the last step is compared with the dense reference for ``abar = statistic``.

    Args:
        case_grad: Weight gradient ``[rows, d]``.
        statistic: ``[1, d]`` mean activation in float32 or float64.
        config: Hyperparameters (damping, damping form, stat_decay are used).
        steps: Number of steps k >= 1.
    """
    grads = {"weight": case_grad}
    stats = {"weight": statistic}
    state: macfn.MACState | None = None
    directions: dict[str, Tensor] = {}
    for _ in range(steps):
        directions, state = _step_directions(grads, stats, config, state)
    grad_blocks = case_grad.unsqueeze(0)
    reference = reference_precondition(grad_blocks, statistic, config.damping, config.damping_form)
    errors = _row_errors(directions["weight"].unsqueeze(0), reference, grad_blocks,
                         underflow_allowance(case_grad.dtype, statistic, config.damping, config.damping_form))
    if config.damping_form == "exact":
        errors = errors * config.damping
    abar_norm = float(statistic.to(torch.float64).norm())
    unit = UNIT_ROUNDOFF[statistic.dtype]
    relative = BIAS_CORRECTION_ERROR_FACTOR * unit / (1.0 - config.stat_decay) + 4 * steps * unit
    sensitivity = 4 * abar_norm * (relative * abar_norm) / (config.damping + abar_norm**2)
    tolerance = precondition_tolerance(case_grad.dtype, case_grad.shape[-1]) + sensitivity
    worst = float(errors.max()) if errors.numel() else 0.0
    return Comparison(f"step with a constant statistic over {steps} steps ({config.damping_form})", worst, tolerance)
