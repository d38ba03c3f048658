"""MAC against curvlinops where MAC's curvature is exact, with controls that must fail."""

from __future__ import annotations

import pytest
import torch

import macfn
from proofs import oracles
from proofs.checks import require_all

# einops and linear_operator, which curvlinops uses, call torch.jit.script, deprecated in torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DAMPINGS = (1e-2, 1.0, 100.0)


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", oracles.standard_cases(), ids=lambda case: case.name)
def test_mac_equals_forward_only_kfac(case: oracles.OracleCase, damping: float) -> None:
    require_all(oracles.compare_with_forward_only_kfac(case, damping))


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_mac_equals_damped_exact_ggn(bias: bool, damping: float) -> None:
    oracles.compare_with_exact_ggn(oracles.single_point_case(4, 3, bias=bias, seed=7), damping).require()


def test_mac_equals_kfac_for_large_activations() -> None:
    case = oracles.single_point_case(6, 2, bias=True, seed=8, scale=30.0)
    require_all(oracles.compare_with_forward_only_kfac(case, 1.0))


def test_distinct_rows_break_the_equality() -> None:
    # Two different inputs: E[a a^T] has rank 2, abar abar^T rank 1, so the directions differ.
    case = oracles.identical_rows_case(5, 3, batch_sizes=(2,), bias=True, seed=3)
    (x, y), = case.batches
    x = x.clone()
    x[1] = -x[1] + 0.5
    distinct = oracles.OracleCase("two distinct rows", case.model, ((x, y),))
    comparisons = oracles.compare_with_forward_only_kfac(distinct, 1.0)
    assert all(c.error > 1e3 * c.tolerance for c in comparisons), comparisons


def test_mismatched_damping_breaks_the_equality() -> None:
    case = oracles.single_point_case(5, 3, bias=True)
    config = macfn.MACConfig(damping=1.0, damping_form="exact")
    grads, exact = oracles.mac_gradients_and_directions(case, config)
    reference = oracles.kfac_forward_only_direction(case, grads, 10.0)
    error = max(float((exact[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
    assert error > 0.1


def test_forward_only_kfac_ignores_the_loss() -> None:
    # The forward-only gradient factor is the identity whatever the targets, as MAC's P ~ I is.
    case = oracles.single_point_case(4, 2, bias=False, seed=9)
    grads, _ = oracles.mac_gradients_and_directions(case, macfn.MACConfig(damping=1.0))
    (x, y), = case.batches
    shifted = oracles.OracleCase(case.name, case.model, ((x, y + 100.0),))
    first = oracles.kfac_forward_only_direction(case, grads, 1.0)
    second = oracles.kfac_forward_only_direction(shifted, grads, 1.0)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0.0, atol=0.0)
