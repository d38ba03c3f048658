"""Pure tensor kernels of MAC: mean activations, the rank-one preconditioner, running averages.

Shapes use one notation throughout: ``blocks`` is the number of row blocks of a weight
that have their own mean activation (the groups of a grouped convolution, or 1),
``rows`` the output rows per block, and ``d`` the length of one input row, including
the trailing 1 for a bias. No kernel here forms a ``d x d`` matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._config import DampingForm


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype in which statistics and row products are accumulated.

    float64 stays float64; every narrower floating dtype (float32, bfloat16, float16)
    accumulates in float32 so that sums of activations up to 1e4 do not overflow.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_input_sum(x: Tensor) -> tuple[Tensor, int]:
    """Sum the rows of a Linear layer's input.

    Args:
        x: Input of any leading shape, ``[..., d_in]``.

    Returns:
        The row sum ``[1, d_in]`` in the accumulation dtype and the number of rows.
    """
    d_in = x.shape[-1]
    rows = x.numel() // d_in if d_in else 0
    leading = tuple(range(x.dim() - 1))
    total = x.sum(dim=leading, dtype=accumulation_dtype(x.dtype)) if leading else x.to(accumulation_dtype(x.dtype))
    return total.reshape(1, d_in), rows


def conv2d_padding(
    padding: str | tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[int, int, int, int]:
    """Return the explicit ``(left, right, top, bottom)`` padding of a Conv2d layer.

    ``"same"`` puts ``total // 2`` before and the rest after, as ``torch.nn.Conv2d`` does.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total_h = dilation[0] * (kernel_size[0] - 1)
        total_w = dilation[1] * (kernel_size[1] - 1)
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    if isinstance(padding, str):
        raise ValueError(f"Invalid Conv2d padding={padding!r}: expected 'same', 'valid' or a pair of integers.")
    pad_h, pad_w = padding[0], padding[1]
    return (pad_w, pad_w, pad_h, pad_h)


def _offset_selector(kernel: int, dilation: int, stride: int, outputs: int, padded: int, dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """Return ``[kernel, padded]`` with a 1 where kernel offset ``i`` reads padded index ``r``.

    Offset ``i`` reads the indices ``i * dilation + o * stride`` for every output position ``o``.
    """
    offsets = torch.arange(kernel, device=device) * dilation
    positions = torch.arange(outputs, device=device) * stride
    indices = offsets[:, None] + positions[None, :]
    return F.one_hot(indices, padded).to(dtype).sum(dim=1)


def conv2d_patch_sum(
    x: Tensor,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    padding_mode: str,
) -> tuple[Tensor, int]:
    """Sum the im2col patches of a Conv2d input over the batch and every output position.

    The unfolded ``[N, C * kh * kw, L]`` tensor is never built: the batch is summed first
    (padding is linear and acts on each image alone, so it commutes with that sum), and the
    patch sums follow from two contractions with 0/1 offset selectors, at a cost of about
    ``C * kh * H_pad * W_pad`` multiply-adds.

    Args:
        x: Input ``[N, C, H, W]`` or unbatched ``[C, H, W]``, any memory format.
        kernel_size, stride, dilation: The layer's ``(h, w)`` settings.
        padding: Explicit ``(left, right, top, bottom)`` padding from :func:`conv2d_padding`.
        groups: The layer's groups; each group gets its own patch sum.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        The patch sum ``[groups, C / groups * kh * kw]`` in the accumulation dtype, ordered as
        ``weight.reshape(C_out, -1)`` orders its columns, and the number of patches summed.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    batch = x.shape[0]
    channels = x.shape[1]

    # Step 1: sum over the batch and pad -> [C, H_pad, W_pad].
    image = x.sum(dim=0, dtype=accumulation_dtype(x.dtype))
    mode = "constant" if padding_mode == "zeros" else padding_mode
    if any(padding):
        image = F.pad(image.unsqueeze(0), padding, mode=mode).squeeze(0)
    padded_h, padded_w = image.shape[-2], image.shape[-1]

    # Step 2: output size, as torch.nn.Conv2d computes it.
    out_h = (padded_h - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_w = (padded_w - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1

    # Step 3: contract rows, then columns -> [C, kh, kw].
    rows = _offset_selector(kernel_size[0], dilation[0], stride[0], out_h, padded_h, image.dtype, image.device)
    cols = _offset_selector(kernel_size[1], dilation[1], stride[1], out_w, padded_w, image.dtype, image.device)
    by_row = torch.einsum("ir,crw->ciw", rows, image)
    patch = torch.einsum("ciw,jw->cij", by_row, cols)

    return patch.reshape(groups, channels // groups * kernel_size[0] * kernel_size[1]), batch * out_h * out_w


def append_bias_column(mean: Tensor) -> Tensor:
    """Append the constant input 1 of a bias: ``[blocks, d] -> [blocks, d + 1]``."""
    return torch.cat([mean, mean.new_ones(mean.shape[0], 1)], dim=1)


def precondition(grad: Tensor, mean_activation: Tensor, damping: float, damping_form: DampingForm) -> Tensor:
    """Apply the MAC preconditioner to gradient rows.

    With ``abar`` a row of ``mean_activation`` and ``rho = damping``, each block computes

        decoupled:  Ghat = G - (G abar) abar^T / (rho + |abar|^2)
        exact:      Ghat = G (rho I + abar abar^T)^-1 = decoupled / rho

    (Sherman–Morrison; Seung, Lee and Ko, 2025, arXiv 2506.08464). The decoupled form is
    the authors' code. Cost: two passes over ``G``, memory ``O(d)`` per block.

    Args:
        grad: Gradient rows ``[blocks, rows, d]`` in any floating dtype.
        mean_activation: ``[blocks, d]``, already bias corrected.
        damping: rho > 0.
        damping_form: ``"decoupled"`` or ``"exact"``.

    Returns:
        ``[blocks, rows, d]`` in ``grad``'s dtype. Row products and ``|abar|^2`` are
        accumulated in float32 (float64 for float64 input).
    """
    return precondition_layer(grad, None, mean_activation, damping, damping_form).weight


class PreconditionedLayer(NamedTuple):
    """The result of :func:`precondition_layer`."""

    weight: Tensor
    """Preconditioned weight rows ``[blocks, rows, d_w]`` in the gradient's dtype."""
    bias: Tensor | None
    """Preconditioned bias ``[blocks, rows]``, or None without a bias gradient."""
    coefficient: Tensor
    """Row coefficients ``(G abar) / (rho + |abar|^2)``, ``[blocks, rows, 1]`` in the accumulation dtype.
    For a finite ``abar`` a row's coefficient is NaN or infinite when any entry of that row of ``G``
    is, so the coefficients double as the layer's finite check."""


def precondition_layer(
    weight_rows: Tensor,
    bias_rows: Tensor | None,
    mean_activation: Tensor,
    damping: float,
    damping_form: DampingForm,
    correction: Tensor | None = None,
) -> PreconditionedLayer:
    """Apply the MAC preconditioner to a layer whose bias gradient is the last column of ``G``.

    Computes the same as :func:`precondition` on ``G = [G_w, g_b]`` without building that
    concatenation, so the weight gradient is read twice and written once, as the update needs.

    With a running mean ``m`` and its bias correction ``c = 1 - stat_decay^k``, the mean
    activation is ``abar = m / c``, and

        (G abar) abar^T / (rho + |abar|^2) = (G m) m^T / (rho c^2 + |m|^2),

    so the correction enters once per block, in the denominator, and never in the loop over
    the entries of ``G``.

    Args:
        weight_rows: Weight gradient rows ``[blocks, rows, d_w]``.
        bias_rows: Bias gradient ``[blocks, rows]``, or None. When ``mean_activation`` has a
            bias column but the bias has no gradient, its column of ``G`` counts as zero.
        mean_activation: ``[blocks, d_w]``, or ``[blocks, d_w + 1]`` with the bias input last.
        damping: rho > 0.
        damping_form: ``"decoupled"`` or ``"exact"``.
        correction: 0-dim ``c`` from :func:`bias_correction` when ``mean_activation`` is a
            running mean before bias correction; None when it is already corrected.

    Returns:
        The preconditioned weight and bias rows in the input dtypes, and the row coefficients.
    """
    compute_dtype = accumulation_dtype(weight_rows.dtype)
    g = weight_rows.to(compute_dtype)
    abar = mean_activation.to(compute_dtype)
    weight_columns = g.shape[-1]
    abar_weight = abar[:, :weight_columns]
    abar_bias = abar[:, weight_columns:]  # [blocks, 0 or 1]

    # Step 1: coefficient of abar in each row, (G abar) / (rho + |abar|^2) -> [blocks, rows, 1].
    squared_norm = (abar * abar).sum(dim=-1)
    if correction is None:
        scale = 1.0 / (damping + squared_norm)
    else:
        damping_term = (damping * correction * correction).to(compute_dtype)
        # NOTE: a layer without statistics has m = 0 and c = 0; the clamp keeps its scale finite,
        # so its coefficient is 0 and its preconditioner the identity.
        scale = 1.0 / (damping_term + squared_norm).clamp_min(torch.finfo(compute_dtype).tiny)
    compiling = torch.compiler.is_compiling()
    if compiling:
        # NOTE: inductor lowers bmm and baddbmm to library calls that it cannot fuse. As a reduction
        # and a broadcast product, they fuse with the base update into one pass over G.
        coefficient = (g * abar_weight.unsqueeze(1)).sum(dim=-1, keepdim=True)
    else:
        coefficient = torch.bmm(g, abar_weight.unsqueeze(-1))
    bias = None
    if bias_rows is not None:
        bias = bias_rows.to(compute_dtype).unsqueeze(-1)
        coefficient = coefficient + bias * abar_bias.unsqueeze(1)
    coefficient = coefficient * scale[:, None, None]

    # Step 2: remove that multiple of abar; the exact form also divides by rho.
    inverse = 1.0 / damping if damping_form == "exact" else 1.0
    if compiling:
        weight = (g - coefficient * abar_weight.unsqueeze(1)) * inverse
    else:
        weight = torch.baddbmm(g, coefficient, abar_weight.unsqueeze(1), beta=inverse, alpha=-inverse)
    if bias is None or bias_rows is None:
        return PreconditionedLayer(weight.to(weight_rows.dtype), None, coefficient)
    bias = (bias - coefficient * abar_bias.unsqueeze(1)) * inverse
    return PreconditionedLayer(weight.to(weight_rows.dtype), bias.squeeze(-1).to(bias_rows.dtype), coefficient)


def update_running_mean(running: Tensor, batch_mean: Tensor, stat_decay: float) -> Tensor:
    """Return ``stat_decay * running + (1 - stat_decay) * batch_mean``."""
    return running * stat_decay + batch_mean.to(running.dtype) * (1.0 - stat_decay)


def bias_correction(count: Tensor, stat_decay: float, dtype: torch.dtype) -> Tensor:
    """Return Adam's bias correction ``1 - stat_decay^count`` as a 0-dim tensor of ``dtype``."""
    # NOTE: the correction is computed in float64 because 1 - beta^k cancels badly near beta = 1:
    # with beta rounded to float32, beta = 0.99999 gave a correction off by 1.4e-3 at k = 1.
    # MPS has no float64, so it keeps the requested dtype.
    work_dtype = dtype if count.device.type == "mps" else torch.float64
    decay = torch.tensor(stat_decay, dtype=work_dtype, device=count.device)
    return (1.0 - torch.pow(decay, count.to(work_dtype))).to(dtype)


def bias_corrected_mean(running: Tensor, count: Tensor, stat_decay: float) -> Tensor:
    """Divide the running mean by ``1 - stat_decay^count``, as Adam corrects its moments.

    A layer with no statistics yet (``count == 0``) has ``running == 0`` and gets 0, so its
    preconditioner is the identity.
    """
    correction = bias_correction(count, stat_decay, running.dtype)
    return running / correction.clamp_min(torch.finfo(running.dtype).tiny)
