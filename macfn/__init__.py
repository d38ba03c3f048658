"""macfn: MAC, a KFAC-family preconditioner at the cost of SGD, as pure PyTorch functions.

MAC (Mean Activation approximated Curvature; Seung, Lee and Ko, ICDM 2025,
arXiv 2506.08464) approximates a layer's activation Kronecker factor ``A = E[a a^T]`` by
``abar abar^T`` with ``abar = E[a]`` the mean activation, and the gradient factor ``P`` by
the identity. With damping ``rho`` the inverse has the closed form of Sherman–Morrison, so
the preconditioned gradient ``Ghat = G - (G abar) abar^T / (rho + |abar|^2)`` costs one extra
pass over the gradient.

Glossary (name here -> symbol in the paper):
    ``mean_activation`` -> abar, the mean layer input row (with a trailing 1 for a bias)
    ``damping``         -> rho
    ``stat_decay``      -> beta, the weight the running average keeps on its old value
    ``grad``            -> G, the weight gradient as ``[d_out, d_in (+1)]`` rows

Functional use::

    compute = macfn.grad_and_stats(model, loss_fn)
    grads, stats, loss = compute(params, x, y)
    params, state = macfn.step(params, grads, stats, state, config)
"""

from ._attention import AttentionDeclaration, attention_key_weights, declare_attention
from ._capture import (
    GradAndStats,
    LayerSpec,
    Stats,
    StatsRecorder,
    bias_name_for,
    find_layers,
    grad_and_stats,
)
from ._config import BaseUpdate, MACConfig
from ._step import MACState, init, step
from . import distributed, optim

__all__ = [
    "AttentionDeclaration",
    "BaseUpdate",
    "GradAndStats",
    "LayerSpec",
    "MACConfig",
    "MACState",
    "Stats",
    "StatsRecorder",
    "attention_key_weights",
    "bias_name_for",
    "declare_attention",
    "distributed",
    "find_layers",
    "grad_and_stats",
    "init",
    "optim",
    "step",
]

__version__ = "0.1.0"
