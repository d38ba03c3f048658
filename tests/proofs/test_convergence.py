"""Convergence conditions of MAC on a two-layer ReLU network (bounds derived here, rates measured)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import macfn
from proofs import convergence, properties, strategies


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Run on one thread: the networks are tiny and thread handoff dominates on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_jacobian_closed_form_matches_autograd() -> None:
    problem = convergence.make_problem(5, 4, 64, seed=3)
    model = convergence.TwoLayerReLU(4, 64, seed=3)
    weight = model.first.weight.detach() + 0.1  # break the symmetric pairs

    def outputs(w: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = torch.func.functional_call(model, {"first.weight": w}, (problem.inputs,))
        return result

    expected = torch.func.jacrev(outputs)(weight)
    torch.testing.assert_close(convergence.output_jacobian(model, weight, problem.inputs), expected,
                               rtol=0.0, atol=1e-15)


def test_symmetric_initialisation_outputs_zero() -> None:
    problem = convergence.make_problem(4, 3, 16, seed=0)
    model = convergence.TwoLayerReLU(3, 16, seed=0)
    with torch.no_grad():
        outputs = model(problem.inputs)
    # The paired terms cancel up to the summation order of the matmul.
    assert float(outputs.abs().max()) < 1e-15


def test_inputs_have_unit_norm() -> None:
    problem = convergence.make_problem(7, 5, 8, seed=1)
    torch.testing.assert_close(problem.inputs.norm(dim=1), torch.ones(7, dtype=torch.float64))


def test_mac_run_applies_dense_preconditioner() -> None:
    # One macfn step must move W by -eta G P with the dense P = rho (abar abar^T + rho I)^-1.
    problem = convergence.make_problem(5, 4, 32, seed=2)
    damping = 0.5
    model = convergence.TwoLayerReLU(4, 32, seed=2)
    weight = model.first.weight.detach().clone()
    params = {"first.weight": weight}
    grad = torch.func.grad(lambda p: convergence.squared_loss(model, p, problem.inputs, problem.targets))(params)
    preconditioner = convergence.mac_preconditioner(problem.inputs.mean(dim=0), damping)

    compute = macfn.grad_and_stats(model, lambda p, x, y: convergence.squared_loss(model, p, x, y))
    grads, stats, _ = compute(params, problem.inputs, problem.targets)
    compute.remove()
    config = macfn.MACConfig(lr=0.3, momentum=0.0, weight_decay=0.0, damping=damping, stat_decay=0.0)
    new_params, _ = macfn.step(params, grads, stats, None, config)
    expected = weight - 0.3 * grad["first.weight"] @ preconditioner
    torch.testing.assert_close(new_params["first.weight"], expected, rtol=1e-12, atol=1e-14)


def test_preconditioner_changes_spectrum() -> None:
    # The bounds are not vacuous: with abar != 0 the preconditioned Gram differs from J J^T.
    bounds = convergence.gram_bounds(convergence.make_problem(6, 4, 256, seed=0, mean_offset=2.0), 0.1)
    assert bounds.factor < 0.5
    assert bounds.preconditioned_max < 0.99 * bounds.lambda_max
    assert bounds.lower_bound_holds
    assert bounds.upper_bound_holds


@given(value=st.tuples(strategies.two_layer_problems(), strategies.dampings(-3.0, 3.0)))
@example(value=(convergence.make_problem(2, 2, 2, seed=0), 1.0))
@example(value=(convergence.make_problem(8, 3, 1024, seed=1, mean_offset=2.0), 1e-3))
def test_gram_bounds_hold(value: tuple[convergence.TwoLayerProblem, float]) -> None:
    properties.check_gram_bounds_case(value)


@settings(max_examples=10)  # each example trains a network for 30 steps
@given(value=properties.rate_problems())
@example(value=(convergence.make_problem(4, 5, 2048, seed=0), 1.0))
def test_rate_holds_while_drift_under_threshold(value: tuple[convergence.TwoLayerProblem, float]) -> None:
    properties.check_rate_case(value)


def test_wide_network_stays_stable_and_converges() -> None:
    trajectory = convergence.run_mac(convergence.make_problem(4, 5, 4096, seed=1), 1.0, 30)
    assert trajectory.stable_steps == len(trajectory.drifts)
    assert trajectory.rate_holds()
    assert trajectory.losses[-1] < 1e-6 * trajectory.losses[0]


def test_rate_improves_with_width() -> None:
    summaries = convergence.width_sweep((8, 64, 512, 4096), range(6))
    drifts = [s.median_drift_ratio for s in summaries]
    rates = [s.mean_observed_rate for s in summaries]
    stable = [s.stable_fraction for s in summaries]
    assert all(a > b for a, b in zip(drifts, drifts[1:])), drifts
    assert all(a > b for a, b in zip(rates, rates[1:])), rates
    assert all(a <= b for a, b in zip(stable, stable[1:])), stable
    assert stable[-1] == 1.0


def test_failed_conditions_are_reported() -> None:
    parallel, narrow = convergence.failed_conditions()
    # Identical inputs: J has two equal rows, and no network beats the loss floor.
    assert abs(parallel.lambda_0) < convergence.RANK_RTOL
    assert parallel.loss_floor is not None
    assert parallel.final_loss >= parallel.loss_floor * (1 - 1e-9)
    # Width 4: the Jacobian leaves the threshold ball.
    assert narrow.max_drift_ratio > 1.0
    assert math.isfinite(narrow.final_loss)


def test_run_rejects_dead_network() -> None:
    # Width 2 has one distinct unit w; inputs pointing away from it keep it inactive everywhere.
    weight = convergence.TwoLayerReLU(3, 2, seed=0).first.weight.detach()[0]
    away = -weight / weight.norm()
    inputs = torch.stack([away, (away + 0.1 * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))])
    inputs = inputs / inputs.norm(dim=1, keepdim=True)
    problem = convergence.TwoLayerProblem(inputs, torch.ones(2, dtype=torch.float64), width=2, seed=0)
    with pytest.raises(ValueError, match="every ReLU is inactive"):
        convergence.run_mac(problem, 1.0, 1)
