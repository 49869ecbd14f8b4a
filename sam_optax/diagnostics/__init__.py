"""Diagnostics: measure sharpness and feature use, not just minimize them.

Per-step statistics from the optimizer state, Hessian curvature (top
eigenvalues, trace) from Hessian-vector products, m-sharpness, and probes of
how much a model relies on each feature block. All functions are traceable
(``jax.jit``, sharded params).
"""

from sam_optax._src.diagnostics.curvature import hessian_top_eigenvalue as hessian_top_eigenvalue
from sam_optax._src.diagnostics.curvature import hessian_top_eigenvalues as hessian_top_eigenvalues
from sam_optax._src.diagnostics.curvature import hessian_trace as hessian_trace
from sam_optax._src.diagnostics.curvature import hessian_vector_product as hessian_vector_product
from sam_optax._src.diagnostics.features import block_contributions as block_contributions
from sam_optax._src.diagnostics.features import feature_reliance as feature_reliance
from sam_optax._src.diagnostics.features import linear_probe_accuracy as linear_probe_accuracy
from sam_optax._src.diagnostics.sharpness import m_sharpness as m_sharpness
from sam_optax._src.diagnostics.statistics import step_statistics as step_statistics

__all__ = (
    "block_contributions",
    "feature_reliance",
    "hessian_top_eigenvalue",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "linear_probe_accuracy",
    "m_sharpness",
    "step_statistics",
)
