"""Convergence conditions of MAC on a two-layer ReLU network, measured in float64.

The MAC paper (Seung, Lee and Ko, ICDM 2025, arXiv 2506.08464) states that MAC converges to
a global minimum of nonlinear networks under two conditions. Its theorem and constants are
not available here. The conditions are phrased as in Zhang, Martens and Grosse, "Fast
Convergence of Natural Gradient Descent for Over-Parameterized Neural Networks" (NeurIPS
2019), for squared loss on n training points:

1. the output Jacobian J (``[n, params]``) has full row rank: ``lambda_0 = lambda_min(J J^T) > 0``
   at initialisation;
2. J is stable near initialisation: ``|J(w_k) - J(w_0)|_2`` stays small.

The network is ``f(x) = (1/sqrt(m)) sum_r a_r relu(w_r^T x)`` with fixed ``a_r = +-1`` and
the first layer (``nn.Linear`` without bias) trained by full-batch MAC through
``macfn.grad_and_stats`` and ``macfn.step``. With ``P = rho (abar abar^T + rho I)^-1`` the
decoupled MAC preconditioner, built here as a dense matrix, the residual follows
``u_{k+1} - y ~ (I - eta H)(u_k - y)`` with the preconditioned Gram matrix
``H = J (I_m kron P) J^T`` (row-major flatten of the ``[m, d]`` weight).

Derived here, not the paper's theorem:

- P's eigenvalues lie in ``[rho / (rho + |abar|^2), 1]``, so
  ``lambda_min(H) >= rho / (rho + |abar|^2) * lambda_0`` and ``lambda_max(H) <= lambda_max(J J^T)``;
- if ``|J_k - J_0|_2 <= (1 - 1/sqrt(2)) sqrt(lambda_min(H_0))`` then
  ``lambda_min(H_k) >= lambda_min(H_0) / 2``, by Weyl's inequality for singular values with
  ``|P^(1/2)|_2 <= 1``. This is the stability threshold used below. While the drift stays
  under it, the loss is expected to fall at least as fast as ``(1 - eta lambda_min(H_0) / 2)^k``.
  That expectation is measured, not proved, because the step also depends on how J changes
  within one step.

The mean activation abar is the mean of the network inputs, which do not change during
training, so with ``stat_decay = 0`` and full batches macfn's preconditioner is the same
matrix P at every step.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import macfn

# Tolerance of the Gram bounds, relative to lambda_max(J J^T), because float64 eigenvalues of an
# n x n Gram matrix are accurate to about n * u64 * lambda_max. No violation was observed in
# 300 random problems, so the tolerance only absorbs rounding.
GRAM_BOUND_RTOL = 1e-12

# Relative slack on the loss bound L_k <= r^k L_0 for the rounding of float64 losses. The largest
# ratio L_k / (r^k L_0) observed for k >= 1 within the stable steps was 0.98 (200 random problems).
RATE_BOUND_RTOL = 1e-9

# lambda_0 counts as 0 below this multiple of lambda_max(J J^T): float64 eigenvalues of a
# singular Gram matrix come out near n * u64 * lambda_max (observed up to 3e-16 relative).
RANK_RTOL = 1e-12

STABILITY_FRACTION = 1.0 - 1.0 / math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class TwoLayerProblem:
    """A training set and the width and seed of the network that fits it.

    Attributes:
        inputs: ``[n, d]`` unit-norm rows in float64.
        targets: ``[n]`` in float64.
        width: Hidden width m.
        seed: Seed of the network's initialisation.
    """

    inputs: Tensor
    targets: Tensor
    width: int
    seed: int


def make_problem(
    samples: int,
    dim: int,
    width: int,
    seed: int,
    *,
    mean_offset: float = 0.7,
    target_scale: float = 0.5,
    parallel_pair: bool = False,
) -> TwoLayerProblem:
    """Draw unit-norm inputs with a shared mean direction and normal targets.

    Args:
        samples: Number of training points n.
        dim: Input dimension d >= 2.
        width: Hidden width m.
        seed: Seed of the data and of the network.
        mean_offset: Length of a common vector added before normalising, so that the inputs
            have a non-zero mean activation, as ReLU features of a real network do.
        target_scale: Standard deviation of the targets.
        parallel_pair: Make the second input equal to the first (parallel inputs, which
            violate condition 1) while keeping different targets.
    """
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    shared = mean_offset * direction / direction.norm()
    raw = torch.randn(samples, dim, generator=generator, dtype=torch.float64) + shared
    inputs = raw / raw.norm(dim=1, keepdim=True)
    if parallel_pair and samples >= 2:
        inputs[1] = inputs[0]
    targets = target_scale * torch.randn(samples, generator=generator, dtype=torch.float64)
    return TwoLayerProblem(inputs, targets, width, seed)


class TwoLayerReLU(nn.Module):
    """``f(x) = (1/sqrt(m)) sum_r a_r relu(w_r^T x)`` with a trained first layer and fixed signs a_r.

    The initialisation is symmetric: neuron ``r + m/2`` copies ``w_r`` with the opposite sign
    ``a_{r + m/2} = -a_r``, so ``f = 0`` at initialisation and the initial residual is the
    targets alone. The Gram matrix ``J J^T`` keeps its expectation under this pairing.
    """

    def __init__(self, dim: int, width: int, seed: int) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"Invalid width={width}: the symmetric initialisation needs an even width >= 2.")
        generator = torch.Generator().manual_seed(seed + 7919)
        half = torch.randn(width // 2, dim, generator=generator, dtype=torch.float64)
        signs = torch.randint(0, 2, (width // 2,), generator=generator).to(torch.float64) * 2 - 1
        self.first = nn.Linear(dim, width, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.first.weight.copy_(torch.cat([half, half]))
        self.register_buffer("second", torch.cat([signs, -signs]))
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[n, d]`` inputs to ``[n]`` outputs."""
        return torch.relu(self.first(x)) @ self.signs() / math.sqrt(self.width)

    def signs(self) -> Tensor:
        """Return the fixed second-layer weights ``a`` ``[m]``."""
        second: Tensor = self.second  # type: ignore[assignment]
        return second


def squared_loss(model: nn.Module, params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
    """Return ``1/2 |f(X) - y|^2`` with the model run on ``params``."""
    outputs: Tensor = torch.func.functional_call(model, params, (inputs,))
    return 0.5 * (outputs - targets).pow(2).sum()


def output_jacobian(model: TwoLayerReLU, weight: Tensor, inputs: Tensor) -> Tensor:
    """Differentiate the n outputs with respect to the first-layer weight, in closed form.

    ``d f(x_i) / d w_r = a_r 1[w_r^T x_i > 0] x_i / sqrt(m)`` (the derivative of relu at 0 is
    taken as 0, as torch does); the test suite checks this against ``torch.func.jacrev``.

    Returns:
        ``[n, m, d]`` in float64; ``reshape(n, -1)`` is J for the row-major flattened weight.
    """
    active = (inputs @ weight.T > 0).to(torch.float64)
    scaled = active * model.signs() / math.sqrt(model.width)
    return scaled[:, :, None] * inputs[:, None, :]


def mac_preconditioner(mean_activation: Tensor, damping: float) -> Tensor:
    """Build the decoupled MAC preconditioner ``rho (abar abar^T + rho I)^-1`` as a dense ``[d, d]`` matrix."""
    dim = mean_activation.numel()
    factor = torch.outer(mean_activation, mean_activation) + damping * torch.eye(dim, dtype=torch.float64)
    inverse: Tensor = torch.linalg.inv(factor)
    return damping * inverse


def preconditioned_gram(jacobian: Tensor, preconditioner: Tensor) -> Tensor:
    """Return ``H = J (I_m kron P) J^T`` for ``J`` of shape ``[n, m, d]`` -> ``[n, n]``."""
    return torch.einsum("imd,de,jme->ij", jacobian, preconditioner, jacobian)


@dataclasses.dataclass(frozen=True)
class GramBounds:
    """Spectra of the Gram matrices at initialisation and the derived bounds.

    Attributes:
        lambda_0: ``lambda_min(J J^T)``.
        lambda_max: ``lambda_max(J J^T)``.
        preconditioned_min: ``lambda_min(H)``.
        preconditioned_max: ``lambda_max(H)``.
        factor: ``rho / (rho + |abar|^2)``, the least eigenvalue of P.
    """

    lambda_0: float
    lambda_max: float
    preconditioned_min: float
    preconditioned_max: float
    factor: float

    @property
    def lower_bound_holds(self) -> bool:
        """Whether ``lambda_min(H) >= factor * lambda_0`` (derived here, up to ``GRAM_BOUND_RTOL``)."""
        return self.preconditioned_min >= self.factor * self.lambda_0 - GRAM_BOUND_RTOL * self.lambda_max

    @property
    def upper_bound_holds(self) -> bool:
        """Whether ``lambda_max(H) <= lambda_max(J J^T)`` (derived here, up to ``GRAM_BOUND_RTOL``)."""
        return self.preconditioned_max <= self.lambda_max * (1 + GRAM_BOUND_RTOL)


def gram_bounds(problem: TwoLayerProblem, damping: float) -> GramBounds:
    """Compute lambda_0, the preconditioned Gram spectrum and P's least eigenvalue at initialisation."""
    model = TwoLayerReLU(problem.inputs.shape[1], problem.width, problem.seed)
    jacobian = output_jacobian(model, model.first.weight.detach(), problem.inputs)
    return _bounds_from(jacobian, problem.inputs.mean(dim=0), damping)


def _bounds_from(jacobian: Tensor, mean_activation: Tensor, damping: float) -> GramBounds:
    flat = jacobian.reshape(jacobian.shape[0], -1)
    plain = torch.linalg.eigvalsh(flat @ flat.T)
    preconditioned = torch.linalg.eigvalsh(preconditioned_gram(jacobian, mac_preconditioner(mean_activation, damping)))
    squared = float(mean_activation.pow(2).sum())
    return GramBounds(
        lambda_0=float(plain[0]),
        lambda_max=float(plain[-1]),
        preconditioned_min=float(preconditioned[0]),
        preconditioned_max=float(preconditioned[-1]),
        factor=damping / (damping + squared),
    )


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Loss and Jacobian drift of one full-batch MAC run.

    Attributes:
        losses: ``L_k = 1/2 |u_k - y|^2`` for k = 0..steps.
        drifts: ``|J_k - J_0|_2`` for k = 0..steps (spectral norm of the ``[n, m d]`` difference).
        learning_rate: eta.
        threshold: Stability threshold ``(1 - 1/sqrt(2)) sqrt(lambda_min(H_0))`` (derived here).
        bounds: The Gram spectra at initialisation.
    """

    losses: tuple[float, ...]
    drifts: tuple[float, ...]
    learning_rate: float
    threshold: float
    bounds: GramBounds

    @property
    def predicted_rate(self) -> float:
        """``1 - eta lambda_min(H_0) / 2``, the per-step factor the loss should beat."""
        return 1.0 - self.learning_rate * self.bounds.preconditioned_min / 2.0

    @property
    def stable_steps(self) -> int:
        """Steps k, from 0, for which every drift up to step k stayed within the threshold."""
        for k, drift in enumerate(self.drifts):
            if drift > self.threshold:
                return k
        return len(self.drifts)

    @property
    def max_drift_ratio(self) -> float:
        """Largest ``|J_k - J_0|_2 / threshold`` over the run."""
        return max(self.drifts) / self.threshold if self.threshold > 0 else math.inf

    def bound_ratios(self) -> list[float]:
        """Return ``L_k / (r^k L_0)`` for the stable steps; at most 1 where the rate held."""
        rate = self.predicted_rate
        first = self.losses[0]
        return [loss / (rate**k * first) for k, loss in enumerate(self.losses[: self.stable_steps])]

    def rate_holds(self) -> bool:
        """Return whether ``L_k <= (1 - eta lambda_min(H_0)/2)^k L_0`` for every stable step."""
        return all(ratio <= 1.0 + RATE_BOUND_RTOL for ratio in self.bound_ratios())

    def observed_rate(self) -> float:
        """Return the geometric mean per-step loss factor ``(L_K / L_0)^(1/K)`` over all steps."""
        steps = len(self.losses) - 1
        if steps <= 0 or self.losses[0] == 0:
            return 0.0
        return float((max(self.losses[-1], 0.0) / self.losses[0]) ** (1.0 / steps))


def run_mac(
    problem: TwoLayerProblem,
    damping: float,
    steps: int,
    *,
    learning_rate: float | None = None,
) -> Trajectory:
    """Train the first layer with full-batch MAC through macfn and record loss and Jacobian drift.

    Uses ``macfn.grad_and_stats`` on the real ``nn.Linear`` and ``macfn.step`` with
    ``MACConfig(lr=eta, momentum=0, weight_decay=0, damping=rho, stat_decay=0,
    damping_form="decoupled")``. Every step gets the full batch, so its mean activation is
    the mean input ``abar`` and the update is ``W <- W - eta G P``.

    Args:
        problem: Data, width and seed.
        damping: rho > 0.
        steps: Number of MAC steps K.
        learning_rate: eta; ``1 / lambda_max(H_0)`` when None, so that ``eta H_0 <= I``.

    Returns:
        The recorded :class:`Trajectory`.

    Raises:
        ValueError: ``learning_rate`` is None and the Jacobian at initialisation is zero.
    """
    model = TwoLayerReLU(problem.inputs.shape[1], problem.width, problem.seed)
    inputs, targets = problem.inputs, problem.targets
    params = {"first.weight": model.first.weight.detach().clone()}

    jacobian_0 = output_jacobian(model, params["first.weight"], inputs)
    bounds = _bounds_from(jacobian_0, inputs.mean(dim=0), damping)
    if learning_rate is None and bounds.preconditioned_max <= 0:
        raise ValueError(
            f"Invalid problem for the default learning rate: lambda_max(H_0)={bounds.preconditioned_max:.3g}, "
            "every ReLU is inactive on every input; pass learning_rate or use a wider network."
        )
    eta = 1.0 / bounds.preconditioned_max if learning_rate is None else learning_rate
    threshold = STABILITY_FRACTION * math.sqrt(max(bounds.preconditioned_min, 0.0))
    config = macfn.MACConfig(lr=eta, momentum=0.0, weight_decay=0.0, damping=damping, stat_decay=0.0,
                             damping_form="decoupled")

    def loss_fn(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return squared_loss(model, p, x, y)

    compute = macfn.grad_and_stats(model, loss_fn)
    state: macfn.MACState | None = None
    losses: list[float] = []
    drifts: list[float] = []
    try:
        for _ in range(steps):
            grads, stats, loss = compute(params, inputs, targets)
            losses.append(float(loss))
            drifts.append(_drift(model, params, inputs, jacobian_0))
            params, state = macfn.step(params, grads, stats, state, config)
        losses.append(float(squared_loss(model, params, inputs, targets)))
        drifts.append(_drift(model, params, inputs, jacobian_0))
    finally:
        compute.remove()
    return Trajectory(tuple(losses), tuple(drifts), eta, threshold, bounds)


def _drift(model: TwoLayerReLU, params: dict[str, Tensor], inputs: Tensor, jacobian_0: Tensor) -> float:
    jacobian = output_jacobian(model, params["first.weight"], inputs)
    difference = (jacobian - jacobian_0).reshape(jacobian.shape[0], -1)
    return float(torch.linalg.matrix_norm(difference, ord=2))


@dataclasses.dataclass(frozen=True)
class WidthSummary:
    """Runs at one width, summarised.

    Attributes:
        width: Hidden width m.
        runs: Number of seeds.
        full_rank: Fraction of runs with ``lambda_0 > 0`` (above ``RANK_RTOL * lambda_max``).
        median_drift_ratio: Median over seeds of ``max_k |J_k - J_0|_2 / threshold`` (inf for
            a run whose ``lambda_min(H_0)`` is 0).
        mean_observed_rate: Mean over seeds of ``(L_K / L_0)^(1/K)``; smaller is faster.
        stable_fraction: Fraction of runs whose drift stayed under the threshold for every step.
        rate_held: Fraction of runs whose loss beat ``(1 - eta lambda_min(H_0)/2)^k`` at every step.
    """

    width: int
    runs: int
    full_rank: float
    median_drift_ratio: float
    mean_observed_rate: float
    stable_fraction: float
    rate_held: float


def width_sweep(
    widths: Sequence[int],
    seeds: Sequence[int],
    *,
    samples: int = 4,
    dim: int = 5,
    damping: float = 1.0,
    steps: int = 30,
) -> list[WidthSummary]:
    """Run MAC at several widths on the same data; wider networks should drift less and converge faster.

    Each seed draws one data set, shared by every width, and its own network per width.
    """
    summaries = []
    for width in widths:
        trajectories = []
        for seed in seeds:
            trajectories.append(run_mac(make_problem(samples, dim, width, seed), damping, steps))
        count = len(trajectories)
        summaries.append(WidthSummary(
            width=width,
            runs=count,
            full_rank=sum(t.bounds.lambda_0 > RANK_RTOL * t.bounds.lambda_max for t in trajectories) / count,
            median_drift_ratio=statistics.median(t.max_drift_ratio for t in trajectories),
            mean_observed_rate=sum(t.observed_rate() for t in trajectories) / count,
            stable_fraction=sum(t.stable_steps == len(t.drifts) for t in trajectories) / count,
            rate_held=sum(max(_all_bound_ratios(t)) <= 1.0 + RATE_BOUND_RTOL for t in trajectories) / count,
        ))
    return summaries


def _all_bound_ratios(trajectory: Trajectory) -> list[float]:
    rate = trajectory.predicted_rate
    first = trajectory.losses[0]
    return [loss / (rate**k * first) for k, loss in enumerate(trajectory.losses)]


@dataclasses.dataclass(frozen=True)
class FailedCondition:
    """Outcome of a run in which one of the convergence conditions fails, reported and not asserted.

    Attributes:
        condition: Which condition was broken and how.
        lambda_0: ``lambda_min(J J^T)`` at initialisation.
        max_drift_ratio: Largest ``|J_k - J_0|_2 / threshold`` over the run (inf when the
            threshold is 0 because ``lambda_min(H_0) = 0``).
        initial_loss: ``L_0``.
        final_loss: ``L_K``.
        loss_floor: The minimum loss any network can reach on the data, or None when it is 0.
        rate_held: Whether the loss beat ``(1 - eta lambda_min(H_0)/2)^k`` at every step.
    """

    condition: str
    lambda_0: float
    max_drift_ratio: float
    initial_loss: float
    final_loss: float
    loss_floor: float | None
    rate_held: bool


def failed_conditions(*, seed: int = 0, steps: int = 30, damping: float = 1.0) -> list[FailedCondition]:
    """Run MAC where a condition fails: two identical inputs, and a narrow network.

    Identical inputs with different targets make two rows of J equal, so ``lambda_0 = 0``
    and the loss cannot fall below ``(y_1 - y_2)^2 / 4``. A width of 4 lets the Jacobian
    drift far past the threshold. Neither run is expected to meet the predicted rate, and the
    records only describe what happened.
    """
    parallel = make_problem(6, 4, 512, seed, parallel_pair=True)
    floor = float((parallel.targets[0] - parallel.targets[1]) ** 2 / 4)
    narrow = make_problem(6, 4, 4, seed)
    return [
        _report("parallel inputs: x_2 = x_1 with y_2 != y_1 (condition 1 fails)", run_mac(parallel, damping, steps),
                floor),
        _report("narrow network: width 4 (condition 2 fails)", run_mac(narrow, damping, steps), None),
    ]


def _report(condition: str, trajectory: Trajectory, floor: float | None) -> FailedCondition:
    ratios = _all_bound_ratios(trajectory)
    return FailedCondition(
        condition=condition,
        lambda_0=trajectory.bounds.lambda_0,
        max_drift_ratio=trajectory.max_drift_ratio,
        initial_loss=trajectory.losses[0],
        final_loss=trajectory.losses[-1],
        loss_floor=floor,
        rate_held=all(r <= 1.0 + RATE_BOUND_RTOL for r in ratios),
    )
