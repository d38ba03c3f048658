"""The property-tested claims, their pinned edge cases, and a runner that counts examples.

Each :class:`PropertyClaim` pairs a hypothesis strategy with a checker from
:mod:`proofs.checks` or :mod:`proofs.convergence`. The test suite states the same laws as
``@given`` tests with these pinned ``@example`` cases. ``python -m proofs`` runs the
registry through :func:`run_claim` with a bounded, derandomized settings object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import macfn

from . import checks, convergence, strategies
from .strategies import LayerCase, PreconditionCase

Source = Literal["paper", "authors' code", "derived"]

# ---------------------------------------------------------------------------
# Pinned edge cases
# ---------------------------------------------------------------------------


def _rows(shape: tuple[int, ...], seed: int, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def _nearly_parallel(mean: Tensor, rows: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Rows equal to multiples of ``mean`` plus 1e-3 relative noise: the cancelling case."""
    mean64 = mean.to(torch.float64)
    coefficients = _rows((mean.shape[0], rows, 1), seed, torch.float64)
    noise = _rows((mean.shape[0], rows, mean.shape[1]), seed + 1, torch.float64, 1e-3)
    return (coefficients * mean64[:, None, :] * (1 + noise)).to(dtype)


# Dimension 1: abar and every gradient row are scalars.
DIMENSION_ONE = PreconditionCase(_rows((1, 3, 1), 0, torch.float32), torch.tensor([[5.0]]), 1.0, "decoupled")
DIMENSION_ONE_EXACT = PreconditionCase(_rows((2, 2, 1), 1, torch.float64), torch.tensor([[-3.0], [0.5]],
                                       dtype=torch.float64), 0.1, "exact")

# |abar| huge: every entry 1e4, so |abar|^2 = 1.6e9 against rho = 1.
HUGE_MEAN = PreconditionCase(_rows((2, 4, 16), 2, torch.float32, 10.0), torch.full((2, 16), 1e4), 1.0, "decoupled")
HUGE_MEAN_HALF = PreconditionCase(_rows((1, 4, 16), 3, torch.float16, 10.0), torch.full((1, 16), -1e4), 1.0,
                                  "decoupled")
HUGE_MEAN_BFLOAT16 = PreconditionCase(_rows((1, 4, 16), 4, torch.bfloat16, 10.0), torch.full((1, 16), 1e4), 3.0,
                                      "exact")

# rho tiny with rows nearly parallel to abar: G - c abar^T cancels almost completely.
TINY_DAMPING = PreconditionCase(_nearly_parallel(torch.ones(1, 8), 4, 5, torch.float32), torch.ones(1, 8), 1e-8,
                                "decoupled")
TINY_DAMPING_EXACT = PreconditionCase(_nearly_parallel(torch.ones(1, 8, dtype=torch.float64), 4, 6, torch.float64),
                                      torch.ones(1, 8, dtype=torch.float64), 1e-8, "exact")

# Both at once: cond(abar abar^T + rho I) = 1.2e17, beyond a float64 dense solve.
HUGE_MEAN_TINY_DAMPING = PreconditionCase(_rows((1, 3, 12), 7, torch.float64), torch.full((1, 12), 1e4,
                                          dtype=torch.float64), 1e-8, "decoupled")

PINNED_PRECONDITION_CASES: tuple[PreconditionCase, ...] = (
    DIMENSION_ONE, DIMENSION_ONE_EXACT, HUGE_MEAN, HUGE_MEAN_HALF, HUGE_MEAN_BFLOAT16, TINY_DAMPING,
    TINY_DAMPING_EXACT, HUGE_MEAN_TINY_DAMPING,
)


def _seeded(layer: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return layer


# A batch of one row, and one image.
SINGLE_ROW_LINEAR = LayerCase(_seeded(nn.Linear(6, 3), 8), _rows((1, 6), 9, torch.float32) + 2.0)
SINGLE_IMAGE_CONV = LayerCase(_seeded(nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect", groups=2), 10),
                              _rows((1, 2, 5, 5), 11, torch.float32) + 1.0)
# Activations of 1e4 in bfloat16 through a real Linear layer.
HUGE_INPUT_LINEAR = LayerCase(_seeded(nn.Linear(4, 2, dtype=torch.bfloat16), 12),
                              _rows((3, 4), 13, torch.bfloat16, 10.0) + 1e4)
# A single input pixel: the kernel reads mostly zero padding.
SINGLE_PIXEL_CONV = LayerCase(_seeded(nn.Conv2d(1, 2, 3, padding=1, dtype=torch.float64), 14),
                              torch.tensor([[[[3.0]]]], dtype=torch.float64))

# float16 activations of about 2e3: with the exact form and rho = 1e-3, G / rho overflows float16.
HALF_OVERFLOW_LINEAR = LayerCase(_seeded(nn.Linear(2, 1, bias=False, dtype=torch.float16), 15),
                                 torch.tensor([[1541.0, -293.5], [-2178.0, 568.5]], dtype=torch.float16))

PINNED_LAYER_CASES: tuple[LayerCase, ...] = (SINGLE_ROW_LINEAR, SINGLE_IMAGE_CONV, HUGE_INPUT_LINEAR,
                                             SINGLE_PIXEL_CONV, HALF_OVERFLOW_LINEAR)

# ---------------------------------------------------------------------------
# Checks in the form the registry runs (one drawn value in, AssertionError out)
# ---------------------------------------------------------------------------


def check_precondition_case(case: PreconditionCase) -> None:
    """Require the preconditioner to match the dense reference on ``case``."""
    checks.check_precondition(case.grad, case.mean_activation, case.damping, case.damping_form).require()


def check_zero_mean_case(case: PreconditionCase) -> None:
    """Require ``abar = 0`` to give the identity (decoupled) or ``G / rho`` (exact)."""
    checks.check_zero_mean_is_identity(case.grad, case.damping, case.damping_form).require()


def check_large_damping_case(case: PreconditionCase) -> None:
    """Require the decoupled update to stay within ``|abar|^2 / (rho + |abar|^2)`` of G."""
    checks.check_large_damping_limit(case.grad, case.mean_activation, case.damping).require()


def check_orthogonal_case(case: PreconditionCase) -> None:
    """Require rows orthogonal to abar to pass the decoupled preconditioner unchanged."""
    checks.check_orthogonal_rows_unchanged(case.grad, case.mean_activation, case.damping).require()


def check_mean_direction_case(value: tuple[Tensor, Tensor, float]) -> None:
    """Require rows along abar to be scaled by ``rho / (rho + |abar|^2)``."""
    mean, coefficients, damping = value
    checks.check_mean_direction_scaled(mean, coefficients, damping).require()


def check_linearity_case(value: tuple[PreconditionCase, Tensor, float, float]) -> None:
    """Require the preconditioner to be linear in G."""
    case, second, alpha, beta = value
    checks.check_linearity(case.grad, second, alpha, beta, case.mean_activation, case.damping,
                           case.damping_form).require()


def check_constant_statistic_case(value: tuple[Tensor, float, int]) -> None:
    """Require the bias-corrected running mean of a constant statistic to equal it."""
    statistic, stat_decay, updates = value
    checks.check_constant_statistic(statistic, stat_decay, updates).require()


def check_step_constant_statistic_case(value: tuple[Tensor, Tensor, macfn.MACConfig, int]) -> None:
    """Require ``macfn.step`` with a repeated statistic to precondition with that statistic."""
    grad, statistic, config, steps = value
    checks.check_step_constant_statistic(grad, statistic, config, steps).require()


def check_conv2d_mean_case(case: LayerCase) -> None:
    """Require the recorded Conv2d mean activation to equal the im2col patch mean."""
    assert isinstance(case.layer, nn.Conv2d)
    checks.require_all(checks.check_conv2d_patch_mean(case.layer, case.x))


def check_layer_case(value: tuple[LayerCase, macfn.MACConfig]) -> None:
    """Require the statistics and the step direction on a real layer to match the references."""
    case, config = value
    checks.require_all(checks.check_layer(case.layer, case.x, config))


def check_gram_bounds_case(value: tuple[convergence.TwoLayerProblem, float]) -> None:
    """Require ``lambda_min(H) >= rho/(rho + |abar|^2) lambda_0`` and ``lambda_max(H) <= lambda_max(J J^T)``."""
    problem, damping = value
    bounds = convergence.gram_bounds(problem, damping)
    assert bounds.lower_bound_holds, f"lower bound fails: {bounds}"
    assert bounds.upper_bound_holds, f"upper bound fails: {bounds}"


def check_rate_case(value: tuple[convergence.TwoLayerProblem, float]) -> None:
    """Require the loss to beat ``(1 - eta lambda_min(H_0)/2)^k`` while the Jacobian drift is under the threshold."""
    problem, damping = value
    trajectory = convergence.run_mac(problem, damping, RATE_STEPS)
    assert trajectory.rate_holds(), (
        f"loss above the predicted rate within {trajectory.stable_steps} stable steps: "
        f"max L_k / (r^k L_0) = {max(trajectory.bound_ratios()):.6g}, r = {trajectory.predicted_rate:.6g}"
    )


RATE_STEPS = 30

# ---------------------------------------------------------------------------
# Strategies of the registry's composite values
# ---------------------------------------------------------------------------


def mean_direction_values() -> st.SearchStrategy[tuple[Tensor, Tensor, float]]:
    """Draw ``(abar [blocks, d], coefficients [blocks, rows], rho)`` in float64."""
    return st.integers(1, 3).flatmap(lambda blocks: st.integers(1, 10).flatmap(lambda dim: st.tuples(
        strategies.tensors((blocks, dim), max_magnitude=1e4),
        strategies.tensors((blocks, 4), max_magnitude=1e2),
        strategies.dampings(),
    )))


def linearity_values() -> st.SearchStrategy[tuple[PreconditionCase, Tensor, float, float]]:
    """Draw a float64 case, a second gradient of its shape and two coefficients."""
    coefficient = st.floats(-1e3, 1e3, allow_nan=False)
    return strategies.precondition_cases(allowed_dtypes=(torch.float64,)).flatmap(lambda case: st.tuples(
        st.just(case),
        strategies.tensors(tuple(case.grad.shape), max_magnitude=1e2),
        coefficient,
        coefficient,
    ))


def constant_statistic_values() -> st.SearchStrategy[tuple[Tensor, float, int]]:
    """Draw a statistic (float32 or float64), a stat_decay up to 0.999 and 1 to 30 updates."""
    return st.tuples(
        strategies.dtypes((torch.float32, torch.float64)).flatmap(
            lambda dtype: strategies.tensors((2, 5), dtype=dtype, max_magnitude=1e4)),
        strategies.stat_decays(),
        st.integers(1, 30),
    )


def step_constant_statistic_values() -> st.SearchStrategy[tuple[Tensor, Tensor, macfn.MACConfig, int]]:
    """Draw a weight gradient, a statistic of the same dtype family, a config and 1 to 8 steps."""

    def for_dtype(dtype: torch.dtype) -> st.SearchStrategy[tuple[Tensor, Tensor, macfn.MACConfig, int]]:
        return st.integers(1, 10).flatmap(lambda dim: st.tuples(
            strategies.tensors((3, dim), dtype=dtype, max_magnitude=1e2),
            strategies.tensors((1, dim), dtype=strategies.statistics_dtype(dtype), max_magnitude=1e4),
            strategies.mac_configs(),
            st.integers(1, 8),
        ))

    return strategies.dtypes((torch.float32, torch.float64)).flatmap(for_dtype)


def rate_problems() -> st.SearchStrategy[tuple[convergence.TwoLayerProblem, float]]:
    """Draw wide problems (m in [256, 4096], n in [2, 5]) with damping in [0.1, 10]."""
    return st.tuples(
        strategies.two_layer_problems(max_samples=5, min_dim=3, min_width=256, max_width=4096),
        strategies.dampings(-1.0, 1.0),
    )


# ---------------------------------------------------------------------------
# Registry and runner
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PropertyClaim:
    """A claim checked on drawn examples.

    Attributes:
        claim: The statement, in plain notation.
        source: ``"paper"`` (Seung, Lee and Ko, 2025, arXiv 2506.08464), ``"authors' code"``
            (their public implementation), or ``"derived"`` (derived for macfn).
        strategy: Draws one value for ``check``.
        check: Raises AssertionError when the claim fails on the value.
        pinned: Values always run before the drawn ones.
        cost: Relative cost of one example, used to scale the example budget (1 = cheap).
    """

    claim: str
    source: Source
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    pinned: tuple[Any, ...] = ()
    cost: int = 1


def claims() -> list[PropertyClaim]:
    """Return every property-tested claim, in report order."""
    return [
        PropertyClaim("macfn's exact form equals G (abar abar^T + rho I)^-1 from a dense 50-digit solve "
                      "(float32/float64/bfloat16/float16, rho in [1e-8, 1e8], |abar_i| <= 1e4)", "paper",
                      strategies.precondition_cases(damping_forms=("exact",)), check_precondition_case,
                      tuple(c for c in PINNED_PRECONDITION_CASES if c.damping_form == "exact")),
        PropertyClaim("macfn's decoupled form equals rho G (abar abar^T + rho I)^-1 from the same dense solve",
                      "authors' code", strategies.precondition_cases(damping_forms=("decoupled",)),
                      check_precondition_case,
                      tuple(c for c in PINNED_PRECONDITION_CASES if c.damping_form == "decoupled")),
        PropertyClaim("abar = 0 gives the identity (decoupled) or G / rho (exact)", "derived",
                      strategies.precondition_cases(), check_zero_mean_case, (DIMENSION_ONE,)),
        PropertyClaim("the decoupled update is within |G_row| |abar|^2 / (rho + |abar|^2) of G, so it tends to G "
                      "as rho -> infinity", "derived",
                      strategies.precondition_cases(damping_forms=("decoupled",), max_damping_exponent=30.0),
                      check_large_damping_case, (HUGE_MEAN,)),
        PropertyClaim("gradient rows orthogonal to abar pass the decoupled preconditioner unchanged", "derived",
                      strategies.precondition_cases(damping_forms=("decoupled",)), check_orthogonal_case,
                      (HUGE_MEAN, DIMENSION_ONE)),
        PropertyClaim("gradient rows along abar are scaled by rho / (rho + |abar|^2)", "derived",
                      mean_direction_values(), check_mean_direction_case),
        PropertyClaim("the preconditioned gradient is linear in G", "derived", linearity_values(),
                      check_linearity_case),
        PropertyClaim("the bias-corrected running mean of a constant statistic equals the statistic "
                      "(m <- beta m + (1 - beta) s, used as m / (1 - beta^k))", "authors' code",
                      constant_statistic_values(), check_constant_statistic_case),
        PropertyClaim("macfn.step fed one statistic k times preconditions with exactly that statistic",
                      "authors' code", step_constant_statistic_values(), check_step_constant_statistic_case),
        PropertyClaim("the Conv2d mean activation from macfn.grad_and_stats equals the im2col patch mean "
                      "(F.unfold and a one-hot nn.Conv2d probe; stride, padding incl. 'same', padding modes, "
                      "dilation, groups)", "paper", strategies.conv2d_cases(), check_conv2d_mean_case,
                      (SINGLE_IMAGE_CONV, SINGLE_PIXEL_CONV), cost=3),
        PropertyClaim("on real nn.Linear and nn.Conv2d layers, macfn.grad_and_stats records the mean input row "
                      "and macfn.step applies the dense-reference direction", "paper",
                      st.tuples(st.one_of(strategies.linear_cases(), strategies.conv2d_cases()),
                                strategies.mac_configs()), check_layer_case,
                      tuple((case, macfn.MACConfig()) for case in PINNED_LAYER_CASES), cost=3),
        PropertyClaim("two-layer ReLU net: lambda_min(H) >= rho/(rho + |abar|^2) lambda_0 and "
                      "lambda_max(H) <= lambda_max(J J^T) for H = J (I kron P) J^T at initialisation", "derived",
                      st.tuples(strategies.two_layer_problems(), strategies.dampings(-3.0, 3.0)),
                      check_gram_bounds_case, cost=2),
        PropertyClaim("two-layer ReLU net, full-batch macfn.step: while |J_k - J_0|_2 <= (1 - 1/sqrt 2) "
                      "sqrt(lambda_min(H_0)), L_k <= (1 - eta lambda_min(H_0)/2)^k L_0", "derived",
                      rate_problems(), check_rate_case, cost=5),
    ]


@dataclasses.dataclass(frozen=True)
class PropertyOutcome:
    """Result of running one claim.

    Attributes:
        claim: The claim that ran.
        examples: Examples executed, pinned ones included (while passing; a failure stops the count).
        passed: Whether every example passed.
        detail: The first failure's message, or "".
    """

    claim: PropertyClaim
    examples: int
    passed: bool
    detail: str


def run_claim(claim: PropertyClaim, max_examples: int) -> PropertyOutcome:
    """Run ``claim`` on its pinned values and up to ``max_examples`` drawn ones, derandomized.

    Hypothesis shrinks a failure before it is reported, so a failing run takes longer.
    """
    count = 0

    def body(value: Any) -> None:
        nonlocal count
        claim.check(value)
        count += 1

    test: Callable[[], None] = given(claim.strategy)(body)
    for value in claim.pinned:
        test = example(value)(test)
    bounded = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    try:
        bounded(test)()
    except Exception as error:  # noqa: BLE001 - any failure of the claim is reported, not raised
        return PropertyOutcome(claim, count, False, f"{type(error).__name__}: {error}".splitlines()[0][:400])
    return PropertyOutcome(claim, count, True, "")
