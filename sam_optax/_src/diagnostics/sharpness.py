"""m-sharpness: the worst loss increase in a ρ-ball, per group of m examples."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from sam_optax._src import groups
from sam_optax._src import numerics
from sam_optax._src.diagnostics import checks as diag_checks
from sam_optax._src.diagnostics import common


def m_sharpness(
    loss_fn: Callable,
    params,
    batch,
    *,
    rho,
    m: Optional[int],
    ascent_steps: int = 1,
    step_size=None,
    has_aux: bool = False,
) -> jax.Array:
  r"""The m-sharpness of Foret et al.: worst-case loss increase per m examples.

  The batch of ``b`` examples is split into ``b/m`` consecutive groups
  :math:`B_k` of ``m`` examples; each group gets its own worst-case
  perturbation in the ρ-ball, and the increases are averaged:

  .. math::
    S_m(w) = \frac{m}{b} \sum_{k=1}^{b/m}\;
      \max_{\|\varepsilon\|_2 \le \rho} L_{B_k}(w + \varepsilon) - L_{B_k}(w).

  The inner maximum is approximated as SAM does: one normalized ascent step
  :math:`\varepsilon_1 = \rho\, g_k / \|g_k\|_2` with
  :math:`g_k = \nabla L_{B_k}(w)`, exact when :math:`L_{B_k}` is linear in
  :math:`w`. With ``ascent_steps = s > 1`` it continues with projected
  normalized ascent,

  .. math::
    \varepsilon_{t+1} = \Pi_\rho\Big(\varepsilon_t + \eta\,
      \frac{\nabla L_{B_k}(w + \varepsilon_t)}
           {\|\nabla L_{B_k}(w + \varepsilon_t)\|_2}\Big), \qquad
    \Pi_\rho(e) = e \min(1, \rho / \|e\|_2),

  and keeps the best value over :math:`\varepsilon_0 = 0, \varepsilon_1,
  \dots, \varepsilon_s`. Each iterate is feasible, so the result is a lower
  bound on :math:`S_m` that is ≥ 0 and grows with ``ascent_steps``. Smaller
  ``m`` gives larger values; SAM with ``m`` examples per perturbation
  minimizes this quantity.

  Groups are processed one after another (``lax.map``), each in the params'
  precision (at least float32). Gradients are normalized with a rescaled norm,
  so a gradient of 1e-20 or 1e20 still gives a step of length ρ.

  Args:
    loss_fn: ``(params, chunk) -> scalar loss`` (mean over the chunk's
      examples), ``(loss, aux)`` with ``has_aux``.
    params: a pytree of floating-point arrays.
    batch: a pytree whose leaves share a leading batch axis of size ``b``.
    rho: the radius ρ ≥ 0 (may be a traced scalar); 0 gives 0.
    m: examples per perturbation; must divide ``b``. ``None`` means ``m = b``
      (one perturbation for the whole batch).
    ascent_steps: ascent steps per group, ≥ 1 (default 1: SAM's step).
    step_size: η for steps after the first; default ρ.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    :math:`S_m`, a scalar of the params' precision (float32; float64 for
    float64 params).

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> def loss(w, chunk):
    ...   x, y = chunk
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    >>> y = jnp.array([1.0, -1.0, 0.5, 2.0])
    >>> w = jnp.zeros(2)
    >>> for m in (4, 2, 1):
    ...   s = sam_optax.diagnostics.m_sharpness(loss, w, (x, y), rho=0.1, m=m)
    ...   print(m, '{:.2E}'.format(s))
    4 2.23E-01
    2 2.24E-01
    1 2.92E-01

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
    (Section 4.1, m-sharpness).

    Andriushchenko & Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022.
  """
  name = common.PREFIX + "m_sharpness"
  diag_checks.check_radius(name, rho)
  if step_size is not None:
    diag_checks.check_positive(diag_checks.BAD_STEP_SIZE, name, "step_size", step_size)
  ascent_steps = diag_checks.check_positive_int(
      name, "ascent_steps", ascent_steps, "is the number of ascent steps per group", 1)
  m = diag_checks.check_group_size(name, m)
  f, params = common.prepare(name, loss_fn, params, has_aux)
  b = diag_checks.whole_batch_size(name, batch, m)
  chunks = groups.split_batch(name, batch, b if m is None else m)
  dtype = common.compute_dtype(params)
  rho = jnp.asarray(rho).astype(dtype)
  eta = rho if step_size is None else jnp.asarray(step_size).astype(dtype)
  return jax.jit(lambda *args: _m_sharpness(f, *args, ascent_steps))(
      params, chunks, rho, eta)


def _m_sharpness(f, params, chunks, rho, eta, ascent_steps):
  """The computation of :func:`m_sharpness`."""
  value_and_grad = jax.value_and_grad(f)
  dtype = rho.dtype

  def one_group(chunk):
    loss0, g0 = value_and_grad(params, chunk)
    loss0 = jnp.asarray(loss0).astype(dtype)
    eps = common.tree_scale(common.normalize(g0), rho)

    def body(_, carry):
      eps, best = carry
      loss, g = value_and_grad(numerics.add_perturbation(params, eps), chunk)
      best = jnp.maximum(best, jnp.asarray(loss).astype(dtype) - loss0)
      eps = common.axpy(eta, common.normalize(g), eps)
      # Projection onto the ρ-ball: ε ← ε · min(1, ρ / ‖ε‖).
      norm = common.norm(eps)
      eps = common.tree_scale(
          eps, jnp.where(norm > rho, rho / jnp.maximum(norm, rho), 1.0))
      return eps, best

    eps, best = jax.lax.fori_loop(0, ascent_steps - 1, body,
                                  (eps, jnp.zeros((), dtype)))
    final = jnp.asarray(f(numerics.add_perturbation(params, eps), chunk)).astype(dtype)
    return jnp.maximum(best, final - loss0)

  return jnp.mean(jax.lax.map(one_group, chunks))
