"""Tests for the symbolic checks in proofs.symbolic, with negative controls."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import sympy

from proofs import symbolic
from proofs.symbolic import SymbolicResult


def _wrong_inverse(mean: Any, rho: Any) -> Any:
    """Build the Sherman-Morrison form with the wrong denominator rho + 2 a^T a."""
    size = mean.shape[0]
    outer = mean * mean.T
    return (sympy.eye(size) - outer / (rho + 2 * symbolic.squared_norm(mean))) / rho


def _scaled_identity(mean: Any, rho: Any) -> Any:
    """Build rho/(rho + |a|^2) I, which matches P on a but not on a's complement."""
    size = mean.shape[0]
    return sympy.eye(size) * rho / (rho + symbolic.squared_norm(mean))


def _append_zero(vector: Any) -> Any:
    """Append 0 in place of the bias input 1."""
    return vector.col_join(sympy.Matrix([[0]]))


def _row_means(matrix: Any) -> Any:
    """Compute row means, the wrong weights for the attention-weighted mean."""
    count = matrix.shape[1]
    return matrix * sympy.ones(count, 1) / count


# ---------------------------------------------------------------------------
# Claims hold
# ---------------------------------------------------------------------------


def test_sherman_morrison_fixed_dims() -> None:
    result = symbolic.prove_sherman_morrison(max_dim=6)
    assert result.proved, result.detail
    assert result.source == "paper"


def test_sherman_morrison_general() -> None:
    result = symbolic.prove_sherman_morrison_general()
    assert result.proved, result.detail
    assert result.source == "paper"


def test_decoupled_spectrum() -> None:
    result = symbolic.prove_decoupled_spectrum(max_dim=4)
    assert result.proved, result.detail
    assert result.source == "derived"


@pytest.mark.parametrize(("d_out", "d_in"), [(1, 1), (2, 3), (3, 2)])
def test_kronecker_bridge(d_out: int, d_in: int) -> None:
    result = symbolic.prove_kronecker_bridge(d_out=d_out, d_in=d_in)
    assert result.proved, result.detail
    assert result.source == "paper"


def test_attention_value_identity() -> None:
    result = symbolic.prove_attention_value_identity(n_tokens=3, d_in=2, d_v=2)
    assert result.proved, result.detail
    assert result.source == "paper"


def test_bias_augmentation() -> None:
    result = symbolic.prove_bias_augmentation(d_out=2, d_in=3)
    assert result.proved, result.detail
    assert result.source == "derived"


def test_claims_at_larger_sizes() -> None:
    sherman_morrison = symbolic.prove_sherman_morrison(max_dim=8)
    spectrum = symbolic.prove_decoupled_spectrum(max_dim=6)
    bridge = symbolic.prove_kronecker_bridge(d_out=3, d_in=4)
    attention = symbolic.prove_attention_value_identity(n_tokens=4, d_in=3, d_v=2)
    bias = symbolic.prove_bias_augmentation(d_out=3, d_in=4, batch_size=3)
    assert sherman_morrison.proved, sherman_morrison.detail
    assert spectrum.proved, spectrum.detail
    assert bridge.proved, bridge.detail
    assert attention.proved, attention.detail
    assert bias.proved, bias.detail


def test_run_all_proves_every_claim() -> None:
    results = symbolic.run_all()
    assert len(results) == 8
    for result in results:
        assert isinstance(result, SymbolicResult)
        assert result.proved, f"{result.claim}: {result.detail}"


def test_run_all_sources() -> None:
    sources = [result.source for result in symbolic.run_all()]
    assert sources == [
        "paper",
        "paper",
        "derived",
        "paper",
        "paper",
        "paper",
        "paper",
        "derived",
    ]


def test_result_is_frozen() -> None:
    result = symbolic.prove_sherman_morrison_general()
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.proved = False  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Negative controls: the checkers reject wrong formulas
# ---------------------------------------------------------------------------


def test_is_zero_rejects_nonzero() -> None:
    rho = symbolic.damping_symbol()
    x = sympy.Symbol("x", real=True)
    assert symbolic.is_zero(x / (rho + x) + rho / (rho + x) - 1)
    assert not symbolic.is_zero(x / (rho + x) - 1)


def test_matrices_equal_rejects_mismatch() -> None:
    left = symbolic.symbol_matrix("m", 2, 2)
    assert symbolic.matrices_equal(left, left.T.T)
    assert not symbolic.matrices_equal(left, left.T)
    assert not symbolic.matrices_equal(left, left[:, :1])


def test_sherman_morrison_wrong_denominator() -> None:
    result = symbolic.prove_sherman_morrison(max_dim=3, inverse=_wrong_inverse)
    assert not result.proved
    assert "right inverse n=1" in result.detail


def test_sherman_morrison_general_wrong_coefficient() -> None:
    def wrong(rho: Any, norm_squared: Any) -> tuple[Any, Any]:
        return 1 / rho, -1 / (rho * (rho + 2 * norm_squared))

    result = symbolic.prove_sherman_morrison_general(coefficients=wrong)
    assert not result.proved
    assert "coefficient of A" in result.detail


def test_reduce_rank_one_uses_relation() -> None:
    rank_one = sympy.Symbol("A")
    norm_squared = sympy.Symbol("s", nonnegative=True)
    coefficients = symbolic.reduce_rank_one(rank_one**3, rank_one, norm_squared)
    assert coefficients == (0, norm_squared**2)


def test_decoupled_spectrum_wrong_denominator() -> None:
    def wrong(mean: Any, rho: Any) -> Any:
        return rho * _wrong_inverse(mean, rho)

    result = symbolic.prove_decoupled_spectrum(max_dim=3, preconditioner=wrong)
    assert not result.proved
    assert "P a = rho/(rho + |a|^2) a n=1" in result.detail


def test_decoupled_spectrum_wrong_complement() -> None:
    result = symbolic.prove_decoupled_spectrum(
        max_dim=3, preconditioner=_scaled_identity
    )
    assert not result.proved
    assert "P v_1 = v_1 n=2" in result.detail
    assert "P a = rho/(rho + |a|^2) a" not in result.detail


def test_unit_interval_rejects_bad_bounds() -> None:
    rho = symbolic.damping_symbol()
    norm_squared = sympy.Symbol("s", nonnegative=True)
    unsigned = sympy.Symbol("u", real=True)
    assert symbolic.lies_in_unit_interval(rho / (rho + norm_squared))
    assert not symbolic.lies_in_unit_interval((rho + norm_squared) / rho)
    assert not symbolic.lies_in_unit_interval(rho / (rho + unsigned))
    assert not symbolic.lies_in_unit_interval(-rho / (rho + norm_squared))


def test_kronecker_bridge_swapped_flatten() -> None:
    result = symbolic.prove_kronecker_bridge(
        d_out=2,
        d_in=3,
        column_vec=symbolic.row_flatten,
        row_vec=symbolic.column_stack,
    )
    assert not result.proved
    assert "vec(G M) = (M^T kron I) vec(G)" in result.detail
    assert "rowflatten(G M) = (I kron M^T) rowflatten(G)" in result.detail


def test_kronecker_order_matters() -> None:
    gradient = symbolic.symbol_matrix("G", 2, 3)
    factor = symbolic.symbol_matrix("M", 3, 3)
    product = gradient * factor
    wrong_operator = sympy.kronecker_product(factor.T, sympy.eye(2))
    right_operator = sympy.kronecker_product(sympy.eye(2), factor.T)
    flat = symbolic.row_flatten(gradient)
    assert symbolic.matrices_equal(symbolic.row_flatten(product), right_operator * flat)
    assert not symbolic.matrices_equal(
        symbolic.row_flatten(product), wrong_operator * flat
    )


def test_kronecker_transpose_matters() -> None:
    gradient = symbolic.symbol_matrix("G", 2, 3)
    factor = symbolic.symbol_matrix("M", 3, 3)
    operator = sympy.kronecker_product(factor, sympy.eye(2))
    assert not symbolic.matrices_equal(
        symbolic.column_stack(gradient * factor),
        operator * symbolic.column_stack(gradient),
    )


def test_attention_wrong_gradient() -> None:
    def ignore_scores(scores: Any, inputs: Any, upstream: Any) -> Any:
        return inputs.T * upstream

    result = symbolic.prove_attention_value_identity(value_gradient=ignore_scores)
    assert not result.proved
    assert "dL/dW_V = (S X)^T dO" in result.detail


def test_attention_wrong_mean_weights() -> None:
    result = symbolic.prove_attention_value_identity(mean_weights=_row_means)
    assert not result.proved
    assert "(1/N) 1^T S X = sbar^T X" in result.detail


def test_bias_augmentation_wrong_constant() -> None:
    result = symbolic.prove_bias_augmentation(d_out=2, d_in=3, augment=_append_zero)
    assert not result.proved
    assert "dL/d[W b] = [G_W, g_b]" in result.detail
    assert "bias part g_b - c" in result.detail
