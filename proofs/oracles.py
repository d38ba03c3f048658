"""Compare MAC's direction with curvlinops (curvlinops-for-pytorch) where MAC's curvature is exact.

MAC approximates a layer's Fisher block by ``(abar abar^T + rho I) kron I``. Forward-only KFAC
(FOOF, Benzing 2022, arXiv 2201.12250; ``FisherType.FORWARD_ONLY`` in curvlinops) uses
``(E[a a^T] + rho I) kron I``. The two are the same matrix whenever ``E[a a^T] = abar abar^T``,
that is whenever every row a of a layer's input is the same vector:

- one data point through Linear layers (every layer, also behind a nonlinearity);
- a data set whose rows are all identical, in any number of mini-batches;
- a Conv2d layer with "valid" padding on a spatially constant image, whose patches are all
  equal.

A fourth case compares with an exact curvature instead of another approximation. For a
Linear model ``f(a) = W a + b`` with ``MSELoss(reduction="sum")`` on one data point, the loss's
output Hessian is ``2 I``, so the generalised Gauss-Newton matrix is exactly
``2 (a a^T kron I)`` and ``(GGN / 2 + rho I)^-1 g`` is MAC's exact-form direction.

curvlinops damps the input factor and the gradient factor separately.
``KFACInverseLinearOperator(damping=(rho, 0))`` inverts ``(A + rho I) kron (I + 0 I)``, which is
MAC's exact form. ``use_exact_damping=True`` inverts ``A kron I + rho I``, the same matrix when
the gradient factor is I. MAC's decoupled form is rho times either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from curvlinops import FisherType, GGNLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
from torch import Tensor, nn

import macfn

from .checks import UNIT_ROUNDOFF, Comparison, mac_direction

# Relative error of the curvlinops direction, in units of cond(A + rho I) * u64 * d, because its
# Cholesky inverse of the damped factor is backward stable. Observed at most 0.8 on the cases
# below with rho in {0.01, 1, 100} (d <= 13, cond <= 1e4).
CHOLESKY_ERROR_FACTOR = 16.0


@dataclasses.dataclass(frozen=True)
class OracleCase:
    """A model and the data of one case where MAC's curvature is exact.

    Attributes:
        name: What makes MAC exact here.
        model: A float64 model of nn.Linear / nn.Conv2d layers (and parameter-free layers).
        batches: ``[(inputs, targets), ...]`` for curvlinops; macfn gets their concatenation
            as one batch.
    """

    name: str
    model: nn.Module
    batches: tuple[tuple[Tensor, Tensor], ...]


def _seeded_linear(d_in: int, d_out: int, bias: bool, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return layer


def single_point_case(d_in: int, d_out: int, *, bias: bool, hidden: int | None = None, seed: int = 0,
                      scale: float = 1.0) -> OracleCase:
    """Build a Linear model (two Linear layers with tanh between them when ``hidden`` is set) and one data point."""
    generator = torch.Generator().manual_seed(seed)
    model: nn.Module
    if hidden is None:
        model = _seeded_linear(d_in, d_out, bias, generator)
    else:
        model = nn.Sequential(
            _seeded_linear(d_in, hidden, bias, generator), nn.Tanh(), _seeded_linear(hidden, d_out, bias, generator)
        )
    x = scale * torch.randn(1, d_in, generator=generator, dtype=torch.float64) + scale
    y = torch.randn(1, d_out, generator=generator, dtype=torch.float64)
    return OracleCase(f"one data point, {'MLP' if hidden else 'Linear'}, bias={bias}", model, ((x, y),))


def identical_rows_case(d_in: int, d_out: int, *, batch_sizes: Sequence[int], bias: bool, seed: int = 0) -> OracleCase:
    """Build a Linear model and a data set whose input rows are all one vector, split into mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    model = _seeded_linear(d_in, d_out, bias, generator)
    row = torch.randn(1, d_in, generator=generator, dtype=torch.float64) + 1.0
    batches = tuple(
        (row.expand(size, d_in).clone(), torch.randn(size, d_out, generator=generator, dtype=torch.float64))
        for size in batch_sizes
    )
    return OracleCase(f"identical rows in batches {tuple(batch_sizes)}, bias={bias}", model, batches)


def constant_image_case(channels: int, out_channels: int, kernel: int, size: int, *, batch: int, bias: bool,
                        seed: int = 0) -> OracleCase:
    """Build a Conv2d ("valid" padding) with Flatten and images constant over space, one value per channel."""
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(channels, out_channels, kernel, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    model = nn.Sequential(conv, nn.Flatten())
    values = torch.randn(1, channels, 1, 1, generator=generator, dtype=torch.float64) + 1.0
    x = values.expand(batch, channels, size, size).clone()
    out_size = size - kernel + 1
    y = torch.randn(batch, out_channels * out_size * out_size, generator=generator, dtype=torch.float64)
    return OracleCase(f"Conv2d on a spatially constant image, batch {batch}, bias={bias}", model, ((x, y),))


def mac_gradients_and_directions(case: OracleCase, config: macfn.MACConfig) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Compute macfn's gradients and step directions on the whole data set, treated as one batch.

    The loss is ``MSELoss(reduction="sum")``; the directions come from :func:`proofs.checks.mac_direction`.

    Returns:
        ``(grads, directions)``, both keyed by parameter name.
    """
    inputs = torch.cat([x for x, _ in case.batches])
    targets = torch.cat([y for _, y in case.batches])
    loss_fn = nn.MSELoss(reduction="sum")

    def objective(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        outputs: Tensor = torch.func.functional_call(case.model, params, (x,))
        loss: Tensor = loss_fn(outputs, y)
        return loss

    compute = macfn.grad_and_stats(case.model, objective)
    try:
        params = {name: p.detach() for name, p in case.model.named_parameters()}
        grads, stats, _ = compute(params, inputs, targets)
    finally:
        compute.remove()
    return grads, mac_direction(grads, stats, config)


def kfac_forward_only_direction(case: OracleCase, grads: dict[str, Tensor], damping: float, *,
                                exact_damping: bool = False) -> dict[str, Tensor]:
    """Apply curvlinops' inverse forward-only KFAC, damped by rho on the input factor, to ``grads``.

    Weights and biases share one Kronecker factor (``separate_weight_and_bias=False``), as
    they share MAC's preconditioner.

    Args:
        case: Model and data.
        grads: Gradients keyed by parameter name.
        damping: rho.
        exact_damping: Invert ``A kron I + rho I`` (``use_exact_damping=True``) instead of
            ``(A + rho I) kron I``.

    Returns:
        ``(E[a a^T] + rho I)^-1`` applied to every layer's gradient rows, keyed like ``grads``.
    """
    names = [name for name, _ in case.model.named_parameters()]
    params = [p for _, p in case.model.named_parameters()]
    kfac = KFACLinearOperator(
        case.model,
        nn.MSELoss(reduction="sum"),
        params,
        list(case.batches),
        fisher_type=FisherType.FORWARD_ONLY,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    if exact_damping:
        inverse = KFACInverseLinearOperator(kfac, damping=damping, use_exact_damping=True)
    else:
        inverse = KFACInverseLinearOperator(kfac, damping=(damping, 0.0))
    result = inverse @ [grads[name].detach() for name in names]
    return dict(zip(names, result, strict=True))


def exact_ggn_direction(case: OracleCase, grads: dict[str, Tensor], damping: float) -> dict[str, Tensor]:
    """Solve ``(GGN / 2 + rho I) v = g`` with curvlinops' exact GGN of ``MSELoss(reduction="sum")`` as a dense matrix.

    Returns:
        ``v`` keyed like ``grads``, for the parameters in ``model.named_parameters()`` order.
    """
    names = [name for name, _ in case.model.named_parameters()]
    params = [p for _, p in case.model.named_parameters()]
    ggn = GGNLinearOperator(case.model, nn.MSELoss(reduction="sum"), params, list(case.batches),
                            check_deterministic=False)
    size = sum(p.numel() for p in params)
    dense = ggn @ torch.eye(size, dtype=torch.float64)
    flat = torch.cat([grads[name].reshape(-1) for name in names])
    solution = torch.linalg.solve(dense / 2 + damping * torch.eye(size, dtype=torch.float64), flat)
    pieces = solution.split([p.numel() for p in params])
    return {name: piece.reshape(p.shape) for name, piece, p in zip(names, pieces, params, strict=True)}


def _max_condition(case: OracleCase, damping: float) -> tuple[float, int]:
    """Return the largest ``1 + |a|^2 / rho`` and row length over the model's layers (rows are identical)."""
    stats = _stats(case)
    worst, dim = 1.0, 1
    for mean in stats.values():
        worst = max(worst, 1.0 + float(mean.pow(2).sum(-1).max()) / damping)
        dim = max(dim, mean.shape[-1])
    return worst, dim


def _stats(case: OracleCase) -> dict[str, Tensor]:
    inputs = torch.cat([x for x, _ in case.batches])
    recorder = macfn.StatsRecorder(case.model)
    try:
        recorder.start()
        with torch.no_grad():
            case.model(inputs)
        stats = recorder.stop()
    finally:
        recorder.remove()
    return stats


def _relative_error(name: str, actual: dict[str, Tensor], expected: dict[str, Tensor], tolerance: float,
                    scale: float = 1.0) -> Comparison:
    diff = torch.cat([(actual[k].to(torch.float64) * scale - expected[k]).reshape(-1) for k in expected])
    norm = torch.cat([expected[k].reshape(-1) for k in expected]).norm()
    return Comparison(name, float(diff.norm() / norm), tolerance)


def compare_with_forward_only_kfac(case: OracleCase, damping: float) -> list[Comparison]:
    """Compare MAC's exact and decoupled directions with forward-only KFAC, both damping styles.

    Returns:
        Four comparisons: exact form and decoupled form divided by rho, each against
        ``damping=(rho, 0)`` and against ``use_exact_damping=True``.
    """
    condition, dim = _max_condition(case, damping)
    tolerance = CHOLESKY_ERROR_FACTOR * condition * dim * UNIT_ROUNDOFF[torch.float64]
    grads, exact = mac_gradients_and_directions(case, macfn.MACConfig(damping=damping, damping_form="exact"))
    _, decoupled = mac_gradients_and_directions(case, macfn.MACConfig(damping=damping, damping_form="decoupled"))
    comparisons = []
    for exact_damping in (False, True):
        style = "A kron I + rho I" if exact_damping else "(A + rho I) kron I"
        reference = kfac_forward_only_direction(case, grads, damping, exact_damping=exact_damping)
        comparisons.append(_relative_error(f"{case.name}: exact form vs KFAC {style}", exact, reference, tolerance))
        comparisons.append(_relative_error(f"{case.name}: decoupled / rho vs KFAC {style}", decoupled, reference,
                                           tolerance, scale=1.0 / damping))
    return comparisons


def compare_with_exact_ggn(case: OracleCase, damping: float) -> Comparison:
    """Compare MAC's exact-form direction with the damped exact GGN of a one-point Linear model."""
    condition, dim = _max_condition(case, damping)
    size = sum(p.numel() for p in case.model.parameters())
    tolerance = CHOLESKY_ERROR_FACTOR * condition * size * UNIT_ROUNDOFF[torch.float64]
    grads, exact = mac_gradients_and_directions(case, macfn.MACConfig(damping=damping, damping_form="exact"))
    reference = exact_ggn_direction(case, grads, damping)
    return _relative_error(f"{case.name}: exact form vs exact GGN / 2", exact, reference, tolerance)


def standard_cases() -> list[OracleCase]:
    """Return the exact cases the test suite and ``python -m proofs`` compare."""
    return [
        single_point_case(5, 3, bias=True),
        single_point_case(4, 2, bias=False, seed=1),
        single_point_case(4, 2, bias=True, hidden=6, seed=2),
        identical_rows_case(5, 3, batch_sizes=(3, 4), bias=True, seed=3),
        constant_image_case(2, 3, 2, 4, batch=2, bias=True, seed=4),
    ]
