"""Check the algebra of the MAC preconditioner symbolically with SymPy.

MAC (Seung, Lee and Ko, 2025, "MAC: An Efficient Gradient Preconditioning using
Mean Activation Approximated Curvature", arXiv:2506.08464, ICDM 2025)
approximates the Fisher block of a layer with gradient ``G`` (``d_out x d``) by
``(a a^T + rho I) kron I``, where ``a`` is the mean input activation and
``rho > 0`` is the damping. The Sherman-Morrison formula inverts the factor in
closed form, so the exact preconditioned gradient is
``G (rho I + a a^T)^-1 = G P / rho`` with the decoupled preconditioner
``P = I - a a^T / (rho + |a|^2)``.

Each ``prove_*`` function builds its objects from SymPy symbols and reduces the
difference between the two sides of every equation to a canonical rational
function. It returns a ``SymbolicResult`` whose ``proved`` field is True only
when every difference is zero and SymPy's assumptions prove every inequality.
A check at a fixed size proves the claim for that size only.
``prove_sherman_morrison_general`` covers every dimension through the
rank-one algebra ``A^2 = (a^T a) A``.

The ``source`` field separates what the MAC paper states ("paper") from facts
that macfn derives on top of it ("derived"). Every ``prove_*`` function takes
the formula under test as a keyword-only argument with the correct formula as
its default, so a caller can pass a wrong formula and confirm that the checker
returns ``proved=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import sympy  # type: ignore[import-untyped, unused-ignore]

# SymPy ships no type information, so its objects are typed as Any.
SymExpr: TypeAlias = Any
SymMatrix: TypeAlias = Any

Source: TypeAlias = Literal["paper", "derived"]


@dataclass(frozen=True)
class SymbolicResult:
    """Outcome of one symbolic claim.

    Attributes:
        claim: The statement that was checked, in plain notation.
        source: "paper" when the MAC paper states the fact, "derived" when
            macfn derives it.
        proved: True when every equation and inequality of the claim held.
        detail: The sizes checked and the name of every sub-check that failed.
    """

    claim: str
    source: Source
    proved: bool
    detail: str


# ---------------------------------------------------------------------------
# Checker helpers
# ---------------------------------------------------------------------------


def is_zero(expr: SymExpr) -> bool:
    """Decide whether a rational expression is identically zero.

    ``sympy.cancel`` brings a rational function to the canonical form ``p/q``
    with coprime expanded polynomials, so the result is 0 exactly when the
    expression is the zero function. Non-polynomial subexpressions such as
    undefined functions are treated as independent generators.

    Args:
        expr: A SymPy expression or a Python number.

    Returns:
        True when the expression cancels to 0.
    """
    return bool(sympy.cancel(sympy.sympify(expr)) == 0)


def matrices_equal(left: SymMatrix, right: SymMatrix) -> bool:
    """Compare two symbolic matrices entry by entry with ``is_zero``.

    Args:
        left: A SymPy matrix.
        right: A SymPy matrix.

    Returns:
        True when the shapes match and every entry of ``left - right`` cancels
        to 0.
    """
    if left.shape != right.shape:
        return False
    difference = left - right
    return all(is_zero(entry) for entry in difference)


def lies_in_unit_interval(expr: SymExpr) -> bool:
    """Decide whether SymPy's assumptions prove ``0 < expr <= 1``.

    The expression and ``1 - expr`` are cancelled first because SymPy's
    assumption system often cannot decide the sign of an uncancelled sum such
    as ``1 - rho/(rho + s)``.

    Args:
        expr: An expression in symbols that carry assumptions such as
            ``positive=True`` or ``nonnegative=True``.

    Returns:
        True when both inequalities are proved, False when either is false or
        undecided.
    """
    positive = sympy.cancel(expr).is_positive
    slack_nonnegative = sympy.cancel(1 - expr).is_nonnegative
    return positive is True and slack_nonnegative is True


def symbol_vector(name: str, length: int) -> SymMatrix:
    """Create a column vector of real symbols ``name_1 .. name_length``.

    Args:
        name: The base name of the symbols.
        length: The number of entries.

    Returns:
        A ``length x 1`` SymPy matrix.
    """
    entries = [sympy.Symbol(f"{name}_{i + 1}", real=True) for i in range(length)]
    return sympy.Matrix(length, 1, entries)


def symbol_matrix(name: str, rows: int, cols: int) -> SymMatrix:
    """Create a matrix of real symbols ``name_i_j`` with 1-based indices.

    Args:
        name: The base name of the symbols.
        rows: The number of rows.
        cols: The number of columns.

    Returns:
        A ``rows x cols`` SymPy matrix.
    """
    return sympy.Matrix(
        rows, cols, lambda i, j: sympy.Symbol(f"{name}_{i + 1}_{j + 1}", real=True)
    )


def damping_symbol() -> SymExpr:
    """Create the damping symbol ``rho`` with the assumption ``rho > 0``.

    Returns:
        A positive SymPy symbol.
    """
    return sympy.Symbol("rho", positive=True)


def squared_norm(vector: SymMatrix) -> SymExpr:
    """Compute ``v^T v`` for a column vector.

    Args:
        vector: An ``n x 1`` SymPy matrix.

    Returns:
        The scalar ``v^T v``.
    """
    return (vector.T * vector)[0, 0]


def sherman_morrison_inverse(mean: SymMatrix, rho: SymExpr) -> SymMatrix:
    """Build ``(1/rho)(I - a a^T / (rho + a^T a))``.

    Args:
        mean: The mean activation ``a`` as an ``n x 1`` matrix.
        rho: The damping.

    Returns:
        The claimed inverse of ``rho I + a a^T``.
    """
    size = mean.shape[0]
    outer = mean * mean.T
    return (sympy.eye(size) - outer / (rho + squared_norm(mean))) / rho


def decoupled_preconditioner(mean: SymMatrix, rho: SymExpr) -> SymMatrix:
    """Build macfn's decoupled preconditioner ``P = I - a a^T / (rho + |a|^2)``.

    Args:
        mean: The mean activation ``a`` as an ``n x 1`` matrix.
        rho: The damping.

    Returns:
        The ``n x n`` matrix ``P``.
    """
    size = mean.shape[0]
    outer = mean * mean.T
    return sympy.eye(size) - outer / (rho + squared_norm(mean))


def sherman_morrison_coefficients(
    rho: SymExpr, norm_squared: SymExpr
) -> tuple[SymExpr, SymExpr]:
    """Return the coefficients of ``I`` and ``A`` in the Sherman-Morrison inverse.

    The inverse ``(1/rho)(I - A/(rho + s))`` with ``A = a a^T`` and
    ``s = a^T a`` is ``c_I I + c_A A`` with ``c_I = 1/rho`` and
    ``c_A = -1/(rho (rho + s))``.

    Args:
        rho: The damping.
        norm_squared: The scalar ``s = a^T a``.

    Returns:
        The pair ``(c_I, c_A)``.
    """
    return 1 / rho, -1 / (rho * (rho + norm_squared))


def reduce_rank_one(
    expr: SymExpr, rank_one: SymExpr, norm_squared: SymExpr
) -> tuple[SymExpr, SymExpr]:
    """Reduce a polynomial in ``A = a a^T`` to the span of ``I`` and ``A``.

    ``A^2 = a (a^T a) a^T = s A``, so every polynomial in ``A`` equals its
    remainder modulo ``A^2 - s A``. The identity ``I`` and ``A`` commute, so
    treating ``A`` as a commutative symbol is exact inside this algebra.

    Args:
        expr: A polynomial in the symbol ``rank_one`` whose coefficients are
            rational functions of other symbols.
        rank_one: The symbol standing for ``A``.
        norm_squared: The symbol standing for ``s = a^T a``.

    Returns:
        The cancelled coefficients ``(c_I, c_A)`` of ``I`` and ``A``.
    """
    remainder = sympy.rem(
        sympy.expand(expr), rank_one**2 - norm_squared * rank_one, rank_one
    )
    polynomial = sympy.Poly(remainder, rank_one)
    identity_coefficient = sympy.cancel(polynomial.coeff_monomial(1))
    rank_one_coefficient = sympy.cancel(polynomial.coeff_monomial(rank_one))
    return identity_coefficient, rank_one_coefficient


def column_stack(matrix: SymMatrix) -> SymMatrix:
    """Flatten a matrix column by column, the ``vec`` of the K-FAC literature.

    Args:
        matrix: A ``rows x cols`` SymPy matrix.

    Returns:
        The ``rows * cols x 1`` vector ``[M[:, 0]; M[:, 1]; ...]``.
    """
    rows, cols = matrix.shape
    entries = [matrix[i, j] for j in range(cols) for i in range(rows)]
    return sympy.Matrix(rows * cols, 1, entries)


def row_flatten(matrix: SymMatrix) -> SymMatrix:
    """Flatten a matrix row by row, the order of ``torch.Tensor.flatten``.

    Args:
        matrix: A ``rows x cols`` SymPy matrix.

    Returns:
        The ``rows * cols x 1`` vector ``[M[0, :]^T; M[1, :]^T; ...]``.
    """
    rows, cols = matrix.shape
    entries = [matrix[i, j] for i in range(rows) for j in range(cols)]
    return sympy.Matrix(rows * cols, 1, entries)


def row_stochastic_matrix(name: str, size: int) -> SymMatrix:
    """Create a symbolic ``size x size`` matrix whose rows sum to 1.

    The last entry of each row is 1 minus the other entries, which
    parametrises every row-stochastic matrix (entry signs are not constrained).

    Args:
        name: The base name of the free symbols.
        size: The number of rows and columns.

    Returns:
        The SymPy matrix.
    """
    rows = []
    for i in range(size):
        free = [
            sympy.Symbol(f"{name}_{i + 1}_{j + 1}", real=True) for j in range(size - 1)
        ]
        rows.append([*free, 1 - sum(free)])
    return sympy.Matrix(rows)


def column_means(matrix: SymMatrix) -> SymMatrix:
    """Compute the mean of every column as a column vector.

    Args:
        matrix: An ``N x M`` SymPy matrix.

    Returns:
        The ``M x 1`` vector with entries ``(1/N) sum_i matrix[i, j]``.
    """
    count = matrix.shape[0]
    return (sympy.ones(1, count) * matrix).T / count


def value_weight_gradient(
    scores: SymMatrix, inputs: SymMatrix, upstream: SymMatrix
) -> SymMatrix:
    """Build ``(S X)^T dO``, the gradient of ``sum(dO * (S X W_V))`` in ``W_V``.

    Args:
        scores: The attention matrix ``S`` (``N x N``).
        inputs: The token inputs ``X`` (``N x d_in``).
        upstream: The upstream gradient ``dO`` (``N x d_v``).

    Returns:
        The ``d_in x d_v`` gradient.
    """
    return (scores * inputs).T * upstream


def append_one(vector: SymMatrix) -> SymMatrix:
    """Append the constant 1 to a column vector, the bias input of a layer.

    Args:
        vector: An ``n x 1`` SymPy matrix.

    Returns:
        The ``(n + 1) x 1`` vector ``[v; 1]``.
    """
    return vector.col_join(sympy.Matrix([[1]]))


def gradient_matrix(loss: SymExpr, parameters: SymMatrix) -> SymMatrix:
    """Differentiate a scalar with respect to every entry of a symbol matrix.

    Args:
        loss: A scalar SymPy expression.
        parameters: A matrix of SymPy symbols.

    Returns:
        The matrix of partial derivatives, shaped like ``parameters``.
    """
    rows, cols = parameters.shape
    return sympy.Matrix(rows, cols, lambda i, j: sympy.diff(loss, parameters[i, j]))


def _result(
    claim: str, source: Source, failures: list[str], sizes: str
) -> SymbolicResult:
    """Package the failed sub-check names into a ``SymbolicResult``."""
    if failures:
        detail = f"{sizes}; failed: {', '.join(failures)}"
    else:
        detail = f"{sizes}; all sub-checks held"
    return SymbolicResult(
        claim=claim, source=source, proved=not failures, detail=detail
    )


# ---------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------

InverseFormula: TypeAlias = Callable[[SymMatrix, SymExpr], SymMatrix]
CoefficientFormula: TypeAlias = Callable[[SymExpr, SymExpr], tuple[SymExpr, SymExpr]]


def prove_sherman_morrison(
    max_dim: int = 6, *, inverse: InverseFormula = sherman_morrison_inverse
) -> SymbolicResult:
    """Check the Sherman-Morrison inverse of ``rho I + a a^T`` for small dimensions.

    For every ``n`` in ``1..max_dim`` the vector ``a`` contains ``n`` real
    symbols and ``rho`` is a positive symbol. The products of
    ``rho I + a a^T`` with the candidate on both sides must cancel to ``I``.

    Args:
        max_dim: The largest dimension checked.
        inverse: The candidate inverse as a function of ``(a, rho)``.

    Returns:
        The result with source "paper".
    """
    rho = damping_symbol()
    failures: list[str] = []
    for size in range(1, max_dim + 1):
        mean = symbol_vector("a", size)
        curvature = rho * sympy.eye(size) + mean * mean.T
        candidate = inverse(mean, rho)
        identity = sympy.eye(size)
        if not matrices_equal(curvature * candidate, identity):
            failures.append(f"right inverse n={size}")
        if not matrices_equal(candidate * curvature, identity):
            failures.append(f"left inverse n={size}")
    return _result(
        claim="(rho I + a a^T)^-1 = (1/rho)(I - a a^T/(rho + a^T a))",
        source="paper",
        failures=failures,
        sizes=f"n = 1..{max_dim}, symbolic a and rho > 0",
    )


def prove_sherman_morrison_general(
    *, coefficients: CoefficientFormula = sherman_morrison_coefficients
) -> SymbolicResult:
    """Check the Sherman-Morrison inverse for every dimension with rank-one algebra.

    With ``A = a a^T`` and ``s = a^T a`` the product
    ``(rho I + A)(c_I I + c_A A)`` is a polynomial in ``A``. Reducing it with
    ``A^2 = s A`` must leave the coefficient 1 on ``I`` and 0 on ``A``. No step
    depends on the dimension of ``a``. Both orders of the product agree
    because ``I`` and ``A`` commute.

    Args:
        coefficients: The candidate ``(c_I, c_A)`` as a function of
            ``(rho, s)``.

    Returns:
        The result with source "paper".
    """
    rho = damping_symbol()
    norm_squared = sympy.Symbol("s", nonnegative=True)
    rank_one = sympy.Symbol("A")
    identity_part, rank_one_part = coefficients(rho, norm_squared)
    product = (rho + rank_one) * (identity_part + rank_one_part * rank_one)
    identity_coefficient, rank_one_coefficient = reduce_rank_one(
        product, rank_one, norm_squared
    )
    failures: list[str] = []
    if not is_zero(identity_coefficient - 1):
        failures.append(f"coefficient of I is {identity_coefficient}, not 1")
    if not is_zero(rank_one_coefficient):
        failures.append(f"coefficient of A is {rank_one_coefficient}, not 0")
    return _result(
        claim="(rho I + A)(I - A/(rho + s))/rho = I whenever A^2 = s A",
        source="paper",
        failures=failures,
        sizes="every dimension, A = a a^T and s = a^T a",
    )


def _orthogonal_basis(mean: SymMatrix) -> list[SymMatrix]:
    """Build ``a_n e_k - a_k e_n`` for ``k < n``.

    The vectors span the orthogonal complement of ``a`` when ``a_n != 0``.
    """
    size = mean.shape[0]
    basis = []
    for k in range(size - 1):
        vector = sympy.zeros(size, 1)
        vector[k, 0] = mean[size - 1, 0]
        vector[size - 1, 0] = -mean[k, 0]
        basis.append(vector)
    return basis


def _check_spectrum_at(
    size: int, rho: SymExpr, preconditioner: InverseFormula
) -> list[str]:
    """Run the decoupled-spectrum sub-checks at one dimension and list failures."""
    failures: list[str] = []
    mean = symbol_vector("a", size)
    norm_squared = squared_norm(mean)
    matrix = preconditioner(mean, rho)
    identity = sympy.eye(size)

    # P is rho times the inverse of rho I + a a^T.
    curvature = rho * identity + mean * mean.T
    if not matrices_equal(curvature * matrix, rho * identity):
        failures.append(f"P = rho (rho I + a a^T)^-1 n={size}")

    if not matrices_equal(matrix.T, matrix):
        failures.append(f"symmetry n={size}")

    # The mean activation is an eigenvector with eigenvalue rho / (rho + |a|^2).
    eigenvalue = rho / (rho + norm_squared)
    if not matrices_equal(matrix * mean, eigenvalue * mean):
        failures.append(f"P a = rho/(rho + |a|^2) a n={size}")

    # The complement vectors are orthogonal to a and fixed by P. Together with
    # a they form a basis, because det[v_1 .. v_{n-1} a] = a_n^(n-2) |a|^2,
    # which is nonzero when a_n != 0. Relabelling coordinates covers every
    # a != 0, and a = 0 gives P = I.
    basis = _orthogonal_basis(mean)
    for index, vector in enumerate(basis):
        if not is_zero((mean.T * vector)[0, 0]):
            failures.append(f"a^T v_{index + 1} = 0 n={size}")
        if not matrices_equal(matrix * vector, vector):
            failures.append(f"P v_{index + 1} = v_{index + 1} n={size}")
    if size >= 2:
        columns = sympy.Matrix.hstack(*basis, mean)
        expected_determinant = mean[size - 1, 0] ** (size - 2) * norm_squared
        if not is_zero(columns.det() - expected_determinant):
            failures.append(f"eigenbasis determinant n={size}")

    # |g|^2 - |g^T P|^2 = (2 rho + s)/(rho + s)^2 (g^T a)^2 for every row g.
    row = symbol_vector("g", size).T
    projected = row * matrix
    slack = (row * row.T)[0, 0] - (projected * projected.T)[0, 0]
    weight = (2 * rho + norm_squared) / (rho + norm_squared) ** 2
    if not is_zero(slack - weight * (row * mean)[0, 0] ** 2):
        failures.append(f"|g|^2 - |g^T P|^2 identity n={size}")
    return failures


def prove_decoupled_spectrum(
    max_dim: int = 4, *, preconditioner: InverseFormula = decoupled_preconditioner
) -> SymbolicResult:
    """Check the eigenstructure and norm bound of the decoupled preconditioner.

    For every ``n`` in ``1..max_dim`` with symbolic ``a`` and ``rho > 0``:
    ``P`` equals ``rho (rho I + a a^T)^-1`` and is symmetric, ``a`` is an
    eigenvector with eigenvalue ``rho/(rho + |a|^2)``, and ``n - 1`` vectors
    orthogonal to ``a`` that form a basis with ``a`` have eigenvalue 1.
    SymPy's assumptions then show ``0 < rho/(rho + s) <= 1`` for ``s >= 0``,
    so ``P`` is symmetric positive definite with spectral norm at most 1.
    The identity ``|g|^2 - |g^T P|^2 = (2 rho + s)/(rho + s)^2 (g^T a)^2``
    with a nonnegative weight gives ``|g^T P| <= |g|`` for every row ``g``
    directly.

    Args:
        max_dim: The largest dimension checked.
        preconditioner: The candidate ``P`` as a function of ``(a, rho)``.

    Returns:
        The result with source "derived".
    """
    rho = damping_symbol()
    failures: list[str] = []
    for size in range(1, max_dim + 1):
        failures.extend(_check_spectrum_at(size, rho, preconditioner))

    norm_squared = sympy.Symbol("s", nonnegative=True)
    if not lies_in_unit_interval(rho / (rho + norm_squared)):
        failures.append("0 < rho/(rho + s) <= 1")
    weight = (2 * rho + norm_squared) / (rho + norm_squared) ** 2
    if sympy.cancel(weight).is_nonnegative is not True:
        failures.append("(2 rho + s)/(rho + s)^2 >= 0")
    return _result(
        claim=(
            "P = I - a a^T/(rho + |a|^2) is symmetric positive definite with "
            "eigenvalues rho/(rho + |a|^2) (on a) and 1 (on a's complement), "
            "so |g^T P| <= |g|"
        ),
        source="derived",
        failures=failures,
        sizes=f"n = 1..{max_dim}, symbolic a and g, rho > 0",
    )


FlattenOrder: TypeAlias = Callable[[SymMatrix], SymMatrix]


def prove_kronecker_bridge(
    d_out: int = 2,
    d_in: int = 3,
    *,
    column_vec: FlattenOrder = column_stack,
    row_vec: FlattenOrder = row_flatten,
) -> SymbolicResult:
    """Check that right-multiplying ``G`` matches the Kronecker-factored Fisher block.

    With symbolic ``G`` (``d_out x d_in``) and a symbolic ``M`` that is not
    assumed symmetric:

    * ``vec(G M) = (M^T kron I_{d_out}) vec(G)`` with column-stacking ``vec``;
    * ``rowflatten(G M) = (I_{d_out} kron M^T) rowflatten(G)`` with the
      row-major order of ``torch.Tensor.flatten``.

    With ``F = (a a^T + rho I) kron I_{d_out}`` and the Sherman-Morrison
    ``M``, the product ``F (M kron I)`` is the identity, so
    ``F^-1 vec(G) = (M kron I) vec(G) = vec(G M)``. The paper states the
    Fisher-block form. The two flatten identities are standard Kronecker
    algebra that ties it to torch's row-major layout of ``G``.

    Args:
        d_out: The number of rows of ``G``.
        d_in: The number of columns of ``G``.
        column_vec: The flatten order paired with ``M^T kron I``.
        row_vec: The flatten order paired with ``I kron M^T``.

    Returns:
        The result with source "paper".
    """
    failures: list[str] = []
    gradient = symbol_matrix("G", d_out, d_in)
    factor = symbol_matrix("M", d_in, d_in)
    out_identity = sympy.eye(d_out)
    product = gradient * factor

    column_operator = sympy.kronecker_product(factor.T, out_identity)
    if not matrices_equal(
        column_vec(product), column_operator * column_vec(gradient)
    ):
        failures.append("vec(G M) = (M^T kron I) vec(G)")

    row_operator = sympy.kronecker_product(out_identity, factor.T)
    if not matrices_equal(row_vec(product), row_operator * row_vec(gradient)):
        failures.append("rowflatten(G M) = (I kron M^T) rowflatten(G)")

    rho = damping_symbol()
    mean = symbol_vector("a", d_in)
    curvature = mean * mean.T + rho * sympy.eye(d_in)
    inverse = sherman_morrison_inverse(mean, rho)
    fisher_block = sympy.kronecker_product(curvature, out_identity)
    fisher_inverse = sympy.kronecker_product(inverse, out_identity)
    if not matrices_equal(fisher_block * fisher_inverse, sympy.eye(d_out * d_in)):
        failures.append("(A kron I)(A^-1 kron I) = I")
    if not matrices_equal(
        fisher_inverse * column_vec(gradient), column_vec(gradient * inverse)
    ):
        failures.append("(A kron I)^-1 vec(G) = vec(G A^-1)")
    return _result(
        claim=(
            "G (a a^T + rho I)^-1 = ((a a^T + rho I) kron I)^-1 applied to vec(G); "
            "vec and torch's row-major flatten pair with M^T kron I and I kron M^T"
        ),
        source="paper",
        failures=failures,
        sizes=f"d_out={d_out}, d_in={d_in}, symbolic G, M, a and rho > 0",
    )


ValueGradientFormula: TypeAlias = Callable[
    [SymMatrix, SymMatrix, SymMatrix], SymMatrix
]
MeanWeights: TypeAlias = Callable[[SymMatrix], SymMatrix]


def prove_attention_value_identity(
    n_tokens: int = 3,
    d_in: int = 2,
    d_v: int = 2,
    *,
    value_gradient: ValueGradientFormula = value_weight_gradient,
    mean_weights: MeanWeights = column_means,
) -> SymbolicResult:
    """Check the value-projection gradient and attention-weighted mean of one head.

    With symbolic inputs ``X`` (``N x d_in``), value weights ``W_V``
    (``d_in x d_v``), a row-stochastic ``S`` and ``O = S X W_V``, SymPy
    differentiates ``L = sum(dO * O)`` in every entry of ``W_V`` and compares
    with ``(S X)^T dO``, so the effective input of the value projection is
    ``S X``. The mean row ``(1/N) 1^T S X`` must equal ``sbar^T X`` where
    ``sbar`` contains the column means of ``S``, and ``sbar`` must sum to 1.

    Args:
        n_tokens: The number of tokens ``N``.
        d_in: The input width.
        d_v: The value width.
        value_gradient: The candidate gradient as a function of
            ``(S, X, dO)``.
        mean_weights: The candidate ``sbar`` as a function of ``S``.

    Returns:
        The result with source "paper".
    """
    failures: list[str] = []
    inputs = symbol_matrix("x", n_tokens, d_in)
    value_weights = symbol_matrix("w", d_in, d_v)
    scores = row_stochastic_matrix("s", n_tokens)
    upstream = symbol_matrix("dO", n_tokens, d_v)
    outputs = scores * inputs * value_weights
    loss = sum(
        upstream[i, j] * outputs[i, j] for i in range(n_tokens) for j in range(d_v)
    )

    derived_gradient = gradient_matrix(loss, value_weights)
    if not matrices_equal(derived_gradient, value_gradient(scores, inputs, upstream)):
        failures.append("dL/dW_V = (S X)^T dO")

    weights = mean_weights(scores)
    mean_row = sympy.ones(1, n_tokens) * scores * inputs / n_tokens
    if not matrices_equal(mean_row, weights.T * inputs):
        failures.append("(1/N) 1^T S X = sbar^T X")
    if not is_zero(sum(weights) - 1):
        failures.append("sum(sbar) = 1")
    return _result(
        claim=(
            "dL/dW_V = (S X)^T dO for O = S X W_V, and the mean row of S X is "
            "sbar^T X with sbar the column means of S, which sum to 1"
        ),
        source="paper",
        failures=failures,
        sizes=f"N={n_tokens}, d_in={d_in}, d_v={d_v}, row-stochastic symbolic S",
    )


AugmentFormula: TypeAlias = Callable[[SymMatrix], SymMatrix]


def prove_bias_augmentation(
    d_out: int = 2,
    d_in: int = 3,
    *,
    batch_size: int = 2,
    augment: AugmentFormula = append_one,
) -> SymbolicResult:
    """Check that folding the bias into an augmented input preserves the MAC update.

    For ``y = W x + b`` over a batch of symbolic inputs ``x_k`` with upstream
    gradients ``delta_k`` the loss is ``L = sum_k delta_k^T y_k``. The checks:

    * ``[W b] [x; 1] = W x + b`` for every sample;
    * differentiating ``L`` in the joint parameter ``Theta`` with
      ``y_k = Theta [x_k; 1]`` gives ``G_aug = [G_W, g_b]``, where ``G_W`` and
      ``g_b`` come from differentiating the unaugmented layer;
    * the mean augmented activation is ``[xbar; 1]``;
    * with ``c = (G_W xbar + g_b) / (rho + |xbar|^2 + 1)``, the update
      ``G_aug P_aug`` splits into the weight part ``G_W - c xbar^T`` and the
      bias part ``g_b - c``.

    Args:
        d_out: The output width.
        d_in: The input width without the bias entry.
        batch_size: The number of samples averaged into the mean activation.
        augment: The candidate augmentation of an input vector.

    Returns:
        The result with source "derived".
    """
    failures: list[str] = []
    weight = symbol_matrix("W", d_out, d_in)
    bias = symbol_vector("b", d_out)
    joint = symbol_matrix("theta", d_out, d_in + 1)
    samples = [symbol_vector(f"x{k + 1}", d_in) for k in range(batch_size)]
    upstreams = [symbol_vector(f"delta{k + 1}", d_out) for k in range(batch_size)]

    joint_value = weight.row_join(bias)
    for index, sample in enumerate(samples):
        if not matrices_equal(joint_value * augment(sample), weight * sample + bias):
            failures.append(f"[W b][x;1] = W x + b, sample {index + 1}")

    loss = sum(
        (delta.T * (weight * sample + bias))[0, 0]
        for delta, sample in zip(upstreams, samples, strict=True)
    )
    weight_gradient = gradient_matrix(loss, weight)
    bias_gradient = gradient_matrix(loss, bias)
    joint_loss = sum(
        (delta.T * joint * augment(sample))[0, 0]
        for delta, sample in zip(upstreams, samples, strict=True)
    )
    joint_gradient = gradient_matrix(joint_loss, joint)
    augmented_gradient = weight_gradient.row_join(bias_gradient)
    if not matrices_equal(joint_gradient, augmented_gradient):
        failures.append("dL/d[W b] = [G_W, g_b]")

    mean = sum(samples, sympy.zeros(d_in, 1)) / batch_size
    augmented_mean = sum(
        (augment(sample) for sample in samples), sympy.zeros(d_in + 1, 1)
    ) / batch_size
    if not matrices_equal(augmented_mean, mean.col_join(sympy.Matrix([[1]]))):
        failures.append("mean of [x; 1] = [xbar; 1]")

    rho = damping_symbol()
    update = augmented_gradient * decoupled_preconditioner(augmented_mean, rho)
    coupling = (weight_gradient * mean + bias_gradient) / (
        rho + squared_norm(mean) + 1
    )
    if not matrices_equal(update[:, :d_in], weight_gradient - coupling * mean.T):
        failures.append("weight part G_W - c xbar^T")
    if not matrices_equal(update[:, d_in], bias_gradient - coupling):
        failures.append("bias part g_b - c")
    return _result(
        claim=(
            "preconditioning [W b] with the mean of [x; 1] and G_aug = [G_W, g_b] "
            "gives weight part G_W - c xbar^T and bias part g_b - c, "
            "c = (G_W xbar + g_b)/(rho + |xbar|^2 + 1)"
        ),
        source="derived",
        failures=failures,
        sizes=f"d_out={d_out}, d_in={d_in}, batch={batch_size}, rho > 0",
    )


def run_all() -> list[SymbolicResult]:
    """Run every claim at the sizes used by the test suite.

    Returns:
        One result per claim and size, in a fixed order.
    """
    results = [
        prove_sherman_morrison(max_dim=6),
        prove_sherman_morrison_general(),
        prove_decoupled_spectrum(max_dim=4),
    ]
    for d_out, d_in in ((1, 1), (2, 3), (3, 2)):
        results.append(prove_kronecker_bridge(d_out=d_out, d_in=d_in))
    results.append(prove_attention_value_identity(n_tokens=3, d_in=2, d_v=2))
    results.append(prove_bias_augmentation(d_out=2, d_in=3))
    return results


if __name__ == "__main__":
    for outcome in run_all():
        status = "proved" if outcome.proved else "NOT proved"
        print(f"[{outcome.source}] {status}: {outcome.claim}\n    {outcome.detail}")
