"""Float64 references written independently of macfn's kernels: im2col means and dense preconditioners."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_mean(x: Tensor, bias: bool) -> Tensor:
    """Mean input row of a Linear layer as ``[1, d_in (+1)]``, from an explicit row matrix."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], dim=1)
    return rows.mean(dim=0, keepdim=True)


def conv2d_mean(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Mean im2col patch of ``conv`` on ``x`` as ``[groups, C/groups*kh*kw (+1)]``, built with F.unfold."""
    x = x.to(torch.float64)
    kh, kw = conv.kernel_size
    if conv.padding == "same":
        total_h = conv.dilation[0] * (kh - 1)
        total_w = conv.dilation[1] * (kw - 1)
        pads = (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    elif conv.padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        pads = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, pads, mode=mode)
    patches = F.unfold(x, (kh, kw), dilation=conv.dilation, stride=conv.stride)  # [N, C*kh*kw, L]
    groups = conv.groups
    n, _, positions = patches.shape
    per_group = patches.reshape(n, groups, -1, positions).permute(1, 0, 3, 2).reshape(groups, n * positions, -1)
    mean = per_group.mean(dim=1)
    if conv.bias is not None:
        mean = torch.cat([mean, torch.ones(groups, 1, dtype=torch.float64)], dim=1)
    return mean


def dense_decoupled(grad_rows: Tensor, abar: Tensor, damping: float) -> Tensor:
    """Apply ``G (I - abar abar^T / (rho + |abar|^2))`` with the explicit ``d x d`` matrix, per block.

    Args:
        grad_rows: ``[d_out, d]`` float64.
        abar: ``[blocks, d]`` float64.
    """
    blocks, d = abar.shape
    out = torch.empty_like(grad_rows)
    rows = grad_rows.shape[0] // blocks
    for b in range(blocks):
        a = abar[b]
        matrix = torch.eye(d, dtype=torch.float64) - torch.outer(a, a) / (damping + a @ a)
        out[b * rows : (b + 1) * rows] = grad_rows[b * rows : (b + 1) * rows] @ matrix
    return out


def dense_exact(grad_rows: Tensor, abar: Tensor, damping: float) -> Tensor:
    """Solve ``X (rho I + abar abar^T) = G`` per block with torch.linalg.solve."""
    blocks, d = abar.shape
    out = torch.empty_like(grad_rows)
    rows = grad_rows.shape[0] // blocks
    for b in range(blocks):
        a = abar[b]
        factor = damping * torch.eye(d, dtype=torch.float64) + torch.outer(a, a)
        block = grad_rows[b * rows : (b + 1) * rows]
        out[b * rows : (b + 1) * rows] = torch.linalg.solve(factor, block.T).T
    return out


def layer_grad_rows(weight: Tensor, bias: Tensor | None) -> Tensor:
    """Stack a layer's weight gradient rows with the bias gradient as the last column."""
    rows = weight.reshape(weight.shape[0], -1)
    if bias is not None:
        rows = torch.cat([rows, bias.reshape(-1, 1)], dim=1)
    return rows
