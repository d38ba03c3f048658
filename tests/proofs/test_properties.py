"""Property tests of macfn's kernels, capture and step against references built without macfn."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import macfn
from macfn import _kernels
from proofs import checks, properties, strategies
from proofs.strategies import LayerCase, PreconditionCase


# nn.Conv2d warns that even kernels with padding="same" copy the input; the cases draw them on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Run on one thread: every tensor is tiny and thread handoff dominates on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# The preconditioner against the dense solve
# ---------------------------------------------------------------------------


@given(case=strategies.precondition_cases())
@example(case=properties.DIMENSION_ONE)
@example(case=properties.DIMENSION_ONE_EXACT)
@example(case=properties.HUGE_MEAN)
@example(case=properties.HUGE_MEAN_HALF)
@example(case=properties.HUGE_MEAN_BFLOAT16)
@example(case=properties.TINY_DAMPING)
@example(case=properties.TINY_DAMPING_EXACT)
@example(case=properties.HUGE_MEAN_TINY_DAMPING)
def test_precondition_matches_dense_solve(case: PreconditionCase) -> None:
    checks.check_precondition(case.grad, case.mean_activation, case.damping, case.damping_form).require()


def test_precondition_keeps_dtype_and_shape() -> None:
    for dtype in strategies.DTYPES:
        grad = torch.ones(2, 3, 4, dtype=dtype)
        result = _kernels.precondition(grad, torch.ones(2, 4), 1.0, "decoupled")
        assert result.dtype == dtype
        assert result.shape == grad.shape


def test_dense_reference_detects_wrong_damping() -> None:
    case = properties.HUGE_MEAN
    result = _kernels.precondition(case.grad, torch.full((2, 16), 1.0), 1.0, "decoupled")
    reference = checks.reference_precondition(case.grad, torch.full((2, 16), 1.0), 2.0, "decoupled")
    error = float(((result.double() - reference).norm(dim=-1) / case.grad.double().norm(dim=-1)).max())
    assert error > 100 * checks.precondition_tolerance(torch.float32, 16)


def test_high_precision_reference_is_needed_for_ill_conditioning() -> None:
    # cond = 1.2e17: a float64 dense solve is wrong in the complement of abar, the 50-digit one is not.
    case = properties.HUGE_MEAN_TINY_DAMPING
    abar = case.mean_activation[0]
    factor = checks.damped_factor(abar, case.damping)
    float64_solve = torch.linalg.solve(factor, case.grad[0].T).T * case.damping
    reference = checks.reference_precondition(case.grad, case.mean_activation, case.damping, "decoupled")[0]
    float64_error = float(((float64_solve - reference).norm(dim=-1) / case.grad[0].norm(dim=-1)).max())
    assert float64_error > 1e-3
    checks.check_precondition(case.grad, case.mean_activation, case.damping, "decoupled").require()


# ---------------------------------------------------------------------------
# Laws
# ---------------------------------------------------------------------------


@given(case=strategies.precondition_cases())
@example(case=properties.DIMENSION_ONE)
@example(case=properties.HUGE_MEAN_HALF)
def test_zero_mean_is_identity(case: PreconditionCase) -> None:
    checks.check_zero_mean_is_identity(case.grad, case.damping, case.damping_form).require()


@given(case=strategies.precondition_cases(damping_forms=("decoupled",), max_damping_exponent=30.0))
@example(case=properties.HUGE_MEAN)
@example(case=PreconditionCase(properties.HUGE_MEAN.grad, properties.HUGE_MEAN.mean_activation, 1e30, "decoupled"))
def test_large_damping_approaches_identity(case: PreconditionCase) -> None:
    checks.check_large_damping_limit(case.grad, case.mean_activation, case.damping).require()


def test_huge_damping_returns_gradient() -> None:
    case = properties.HUGE_MEAN
    result = _kernels.precondition(case.grad, case.mean_activation, 1e30, "decoupled")
    # |abar|^2 / rho = 1.6e-21, far below float32's unit roundoff, so every entry is G's.
    torch.testing.assert_close(result, case.grad, rtol=0.0, atol=0.0)


@given(case=strategies.precondition_cases(damping_forms=("decoupled",)))
@example(case=properties.HUGE_MEAN)
@example(case=properties.TINY_DAMPING)
@example(case=properties.DIMENSION_ONE)
def test_orthogonal_rows_pass_unchanged(case: PreconditionCase) -> None:
    checks.check_orthogonal_rows_unchanged(case.grad, case.mean_activation, case.damping).require()


@given(value=properties.mean_direction_values())
@example(value=(torch.full((1, 12), 1e4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64), 1e-8))
def test_mean_direction_scaled(value: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    properties.check_mean_direction_case(value)


@given(value=properties.linearity_values())
def test_update_linear_in_gradient(value: tuple[PreconditionCase, torch.Tensor, float, float]) -> None:
    properties.check_linearity_case(value)


@given(value=properties.constant_statistic_values())
@example(value=(torch.full((2, 5), 3.0), 0.999, 1))
@example(value=(torch.full((2, 5), -1e4, dtype=torch.float64), 0.0, 30))
def test_constant_statistic_stays_constant(value: tuple[torch.Tensor, float, int]) -> None:
    properties.check_constant_statistic_case(value)


@given(value=properties.step_constant_statistic_values())
@example(value=(torch.ones(3, 1), torch.tensor([[1e4]]), macfn.MACConfig(damping=1e-4, stat_decay=0.99), 8))
def test_step_constant_statistic(value: tuple[torch.Tensor, torch.Tensor, macfn.MACConfig, int]) -> None:
    properties.check_step_constant_statistic_case(value)


# ---------------------------------------------------------------------------
# Capture and step on real layers
# ---------------------------------------------------------------------------


@given(case=strategies.conv2d_cases())
@example(case=properties.SINGLE_IMAGE_CONV)
@example(case=properties.SINGLE_PIXEL_CONV)
def test_conv2d_patch_mean_matches_im2col(case: LayerCase) -> None:
    properties.check_conv2d_mean_case(case)


def test_conv2d_references_detect_wrong_padding_mode() -> None:
    layer = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    zero_padded = nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)
    comparisons = checks.check_conv2d_patch_mean(layer, x)
    assert all(c.passed for c in comparisons)
    reflect_mean = checks.reference_conv2d_patches_probe(layer, x).mean(dim=1)
    zeros_mean = checks.reference_conv2d_patches_probe(zero_padded, x).mean(dim=1)
    assert float((reflect_mean - zeros_mean).abs().max()) > 1.0


def test_conv2d_references_agree_with_each_other() -> None:
    layer = nn.Conv2d(4, 2, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                      padding_mode="circular", dtype=torch.float64)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    unfolded = checks.reference_conv2d_patches_unfold(layer, x)
    assert unfolded is not None
    torch.testing.assert_close(unfolded, checks.reference_conv2d_patches_probe(layer, x), rtol=0.0, atol=1e-12)


@given(case=st.one_of(strategies.linear_cases(), strategies.conv2d_cases()), config=strategies.mac_configs())
@example(case=properties.SINGLE_ROW_LINEAR, config=macfn.MACConfig())
@example(case=properties.SINGLE_IMAGE_CONV, config=macfn.MACConfig(damping_form="exact", damping=1e-3))
@example(case=properties.HUGE_INPUT_LINEAR, config=macfn.MACConfig(damping=1e-4))
@example(case=properties.SINGLE_PIXEL_CONV, config=macfn.MACConfig(stat_decay=0.0))
@example(case=properties.HALF_OVERFLOW_LINEAR, config=macfn.MACConfig(damping=1e-3, damping_form="exact"))
def test_layer_step_matches_reference(case: LayerCase, config: macfn.MACConfig) -> None:
    properties.check_layer_case((case, config))


def test_overflow_must_match_reference() -> None:
    reference = torch.tensor([[1e6, 1.0]], dtype=torch.float64)
    infinity = float("inf")
    assert checks.mask_overflow(torch.tensor([[infinity, 1.0]], dtype=torch.float16), reference) is not None
    assert checks.mask_overflow(torch.tensor([[65504.0, 1.0]], dtype=torch.float16), reference) is None
    assert checks.mask_overflow(torch.tensor([[infinity, infinity]], dtype=torch.float16), reference) is None
    assert checks.mask_overflow(torch.tensor([[-infinity, 1.0]], dtype=torch.float16), reference) is None


def test_mac_direction_is_minus_step_from_zero() -> None:
    grads = {"weight": torch.ones(2, 3, dtype=torch.float64)}
    stats = {"weight": torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)}
    config = macfn.MACConfig(damping=1.0, stat_decay=0.0)
    direction = checks.mac_direction(grads, stats, config)["weight"]
    # Each row (1, 1, 1) loses half its first component: (1 - 1 / (1 + 1), 1, 1).
    expected = torch.tensor([[0.5, 1.0, 1.0], [0.5, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(direction, expected, rtol=0.0, atol=1e-15)


def test_long_rows_use_float64_reference() -> None:
    # Above HIGH_PRECISION_MAX_DIM the reference is a float64 solve whose own error joins the tolerance.
    dim = checks.HIGH_PRECISION_MAX_DIM + 16
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(2, 3, dim, generator=generator)
    mean = torch.randn(2, dim, generator=generator) + 1.0
    assert checks.reference_solve_error(mean, 0.5) > 0.0
    for damping_form in strategies.DAMPING_FORMS:
        checks.check_precondition(grad, mean, 0.5, damping_form).require()
    high = checks.reference_precondition(grad[:, :, :8], mean[:, :8], 0.5, "exact")
    low = torch.linalg.solve(checks.damped_factor(mean[0, :8], 0.5), grad[0, :, :8].double().T).T
    torch.testing.assert_close(high[0], low, rtol=1e-12, atol=1e-14)
