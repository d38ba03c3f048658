"""Proofs and checks of the mathematics behind macfn's MAC preconditioner.

Modules:
    symbolic: SymPy proofs of the algebra (Sherman–Morrison, spectrum, Kronecker bridge,
        attention mean, bias augmentation).
    checks: Checkers that compare macfn's own functions with independent references.
    strategies: Hypothesis strategies for shapes, damping, dtypes, layers and inputs.
    properties: The property-tested claims and their pinned edge cases.
    oracles: Comparisons with curvlinops where MAC's curvature is exact.
    convergence: Convergence conditions on a two-layer ReLU network.

``python -m proofs`` runs them all and prints one line per claim.
"""
