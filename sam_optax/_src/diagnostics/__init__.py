"""Instruments that measure sharpness, rather than minimize it.

* :func:`step_statistics`: the statistics of the last sharpness-aware step, read
  from the optimizer state, as a dict of scalars for a training loop's logger.
* :func:`hessian_vector_product`, :func:`hessian_top_eigenvalue`,
  :func:`hessian_top_eigenvalues`, :func:`hessian_trace`: the curvature of the
  loss by Hessian-vector products (forward-over-reverse), Lanczos or power
  iteration, and Hutchinson's trace estimator.
* :func:`m_sharpness`: the m-sharpness of Foret et al., the average over groups
  of ``m`` examples of the worst loss increase in a ρ-ball.
* :func:`linear_probe_accuracy`, :func:`feature_reliance`,
  :func:`block_contributions`: how much a model uses each of several feature
  blocks (the balanced-feature-learning view of SAM).

Everything here is traceable: no host callbacks, loops are ``lax.fori_loop`` /
``lax.map``, so each function can run under ``jax.jit`` and on sharded params.
Curvature and sharpness are computed in the params' precision, at least
float32 (bfloat16 params get float32, float64 params under ``jax_enable_x64``
float64), with norms rescaled so that a loss of any scale is measured alike.

(One module per instrument: ``statistics``, ``curvature`` with its Krylov
iterations in ``krylov``, ``sharpness`` and ``features``; ``common`` holds what
they share. The public names are re-exported by ``sam_optax.diagnostics``.)
"""
