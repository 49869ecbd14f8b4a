"""The curvature of the loss: Hessian-vector products, top eigenvalues, trace."""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from sam_optax._src import checks
from sam_optax._src.diagnostics import checks as diag_checks
from sam_optax._src.diagnostics import common
from sam_optax._src.diagnostics import krylov

METHODS = ("lanczos", "power")


def hessian_vector_product(loss_fn: Callable, params, vector, *,
                           has_aux: bool = False):
  r"""The Hessian of ``loss_fn`` at ``params`` times ``vector``, in (at least) float32.

  Forward-over-reverse differentiation: the directional derivative of the
  gradient,

  .. math::
    H v = \frac{\partial}{\partial t} \nabla L(w + t v) \Big|_{t=0},

  computed by ``jax.jvp`` of ``jax.grad``; it costs about two gradient
  evaluations and never forms :math:`H`. Params are cast to at least float32
  first, so bfloat16 models get f32 curvature (float64 params stay float64),
  and each leaf of ``vector`` is cast to the dtype of its param.

  Args:
    loss_fn: ``params -> scalar loss`` (``(loss, aux)`` with ``has_aux``).
      Close over the batch.
    params: a pytree of floating-point arrays (sharded arrays are fine).
    vector: a pytree like ``params``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)`` (aux is discarded).

  Returns:
    :math:`H v`, a pytree like ``params``, each leaf in its param's dtype
    promoted to at least float32.

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)
    >>> hv = sam_optax.diagnostics.hessian_vector_product(
    ...     loss, jnp.zeros(2), jnp.array([1.0, 1.0]))
    >>> print(['{:.2E}'.format(x) for x in hv])
    ['3.00E+00', '1.00E+00']

  References:
    Pearlmutter, `Fast Exact Multiplication by the Hessian
    <https://doi.org/10.1162/neco.1994.6.1.147>`_, Neural Computation 1994.
  """
  name = common.PREFIX + "hessian_vector_product"
  f, params = common.prepare(name, loss_fn, params, has_aux)
  if jax.tree.structure(vector) != jax.tree.structure(params):
    raise ValueError(diag_checks.VECTOR_NOT_LIKE_PARAMS.format(
        name=name, vector=jax.tree.structure(vector),
        params=jax.tree.structure(params)))
  vector = jax.tree.map(lambda v, p: jnp.asarray(v).astype(p.dtype), vector, params)
  return krylov.hvp_fn(f, params)(vector)


def hessian_top_eigenvalue(
    loss_fn: Callable,
    params,
    *,
    num_iters: int = 20,
    key: Union[jax.Array, int, None] = None,
    method: str = "lanczos",
    has_aux: bool = False,
) -> jax.Array:
  r"""The largest eigenvalue :math:`\lambda_{\max}` of the loss Hessian.

  The sharpness measure of flat-minima studies. Only Hessian-vector products
  :math:`v \mapsto Hv` are used (see :func:`hessian_vector_product`), one per
  iteration, on the params pytree as it is (no flattening, so sharded params
  stay sharded):

  .. math::
    \lambda_{\max}(H) = \max_{\|v\|_2 = 1} v^\top H v
      \;\ge\; \lambda_{\max}(V_k^\top H V_k)
      \quad \text{for any orthonormal } V_k,

  with equality once the columns of :math:`V_k` contain the top eigenvector.

  ``method='lanczos'`` (default) builds the Krylov space
  :math:`\mathcal{K} = \operatorname{span}\{v, Hv, \dots, H^{k-1} v\}` with an
  orthonormal basis :math:`V` (fully reorthogonalized) and returns the top
  eigenvalue of the tridiagonal :math:`T = V^\top H V`, which converges to
  :math:`\lambda_{\max}` much faster than power iteration; it keeps
  ``num_iters`` vectors the size of ``params``. If ``num_iters`` reaches the
  number of parameters the result is exact (up to rounding).

  ``method='power'`` keeps two vectors and iterates
  :math:`v \leftarrow Hv/\|Hv\|`, returning the Rayleigh quotient
  :math:`v^\top H v`, whose error shrinks like
  :math:`(\lambda_2/\lambda_1)^{2t}`. Power iteration finds the eigenvalue of
  largest *magnitude*; when that one is negative (a saddle dominated by
  negative curvature), a second run on the shifted, positive semi-definite
  :math:`H - \lambda I` recovers :math:`\lambda_{\max}`, doubling the cost.

  The iterations normalize every vector with a norm rescaled by its largest
  entry and detect a Lanczos breakdown relative to the largest coupling seen,
  so the result does not depend on the scale of the loss: ``c · loss_fn``
  gives ``c`` times the eigenvalue for any ``c`` whose Hessian is finite
  (1e-30 and 1e30 included, in float32).

  Args:
    loss_fn: ``params -> scalar loss`` (``(loss, aux)`` with ``has_aux``);
      close over the batch (a fixed batch gives a fixed Hessian).
    params: a pytree of floating-point arrays; computed in their precision,
      at least float32 (float64 params under ``jax_enable_x64``: float64).
    num_iters: Hessian-vector products (≥ 1), default 20. Lanczos uses
      ``min(num_iters, number of parameters)``.
    key: a ``jax.random`` key (or an int seed) for the random start vector;
      default ``jax.random.key(0)``.
    method: ``'lanczos'`` or ``'power'``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    The largest (algebraic) eigenvalue, a scalar of the params' precision
    (float32; float64 for float64 params).

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> def loss(params):
    ...   return 2.0 * jnp.sum(params['a'] ** 2) + 0.5 * params['b'] ** 2
    >>> params = {'a': jnp.ones(3), 'b': jnp.array(1.0)}
    >>> lam = sam_optax.diagnostics.hessian_top_eigenvalue(loss, params)
    >>> print('{:.2E}'.format(lam))
    4.00E+00

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators
    <https://doi.org/10.6028/jres.045.026>`_, 1950.

    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  name = common.PREFIX + "hessian_top_eigenvalue"
  num_iters = diag_checks.check_positive_int(
      name, "num_iters", num_iters, "is the number of Hessian-vector products", 20)
  checks.check_choice(diag_checks.BAD_HESSIAN_METHOD, method, METHODS,
                     name=name, method=method)
  f, params = common.prepare(name, loss_fn, params, has_aux)
  key = krylov.as_key(key)

  def compute(params, key):
    matvec = krylov.hvp_fn(f, params)
    if method == "power":
      return krylov.power_top(matvec, params, num_iters, key)
    t, _ = krylov.lanczos(matvec, params, min(num_iters, common.num_params(params)), key)
    return krylov.ritz(t)[0][-1]

  return jax.jit(compute)(params, key)


def hessian_top_eigenvalues(
    loss_fn: Callable,
    params,
    *,
    k: int,
    num_iters: Optional[int] = None,
    key: Union[jax.Array, int, None] = None,
    return_eigenvectors: bool = False,
    has_aux: bool = False,
):
  r"""The ``k`` largest Hessian eigenvalues (and eigenvectors), by Lanczos.

  Runs ``num_iters`` Lanczos steps with full reorthogonalization (see
  :func:`hessian_top_eigenvalue`) and returns the ``k`` largest Ritz values
  of :math:`T = V^\top H V`, largest first:

  .. math::
    T = V^\top H V = \sum_i \theta_i\, y_i y_i^\top, \qquad
    \lambda_i(H) \approx \theta_i, \qquad u_i \approx V y_i
    \quad (\theta_1 \ge \theta_2 \ge \dots).

  With eigenvectors, the Ritz vectors :math:`V y_i` are returned as a pytree
  like ``params`` whose leaves have a leading axis of size ``k``. The top Ritz
  values converge first; give a few times ``k`` steps for the ``k``-th.

  Args:
    loss_fn: ``params -> scalar loss`` (``(loss, aux)`` with ``has_aux``).
    params: a pytree of floating-point arrays; computed in their precision,
      at least float32.
    k: how many eigenvalues, ``1 ≤ k ≤ num_iters``.
    num_iters: Lanczos steps; default ``max(20, 2 k)``, at most the number of
      parameters. Memory: ``num_iters`` vectors the size of ``params``.
    key: a ``jax.random`` key (or an int seed) for the start vector; default
      ``jax.random.key(0)``.
    return_eigenvectors: also return the Ritz vectors.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    An array of shape ``[k]`` (descending) of the params' precision (float32;
    float64 for float64 params), or ``(eigenvalues, eigenvectors)`` with
    ``return_eigenvectors=True``.

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([5.0, 3.0, 1.0, -2.0]) * w ** 2)
    >>> vals = sam_optax.diagnostics.hessian_top_eigenvalues(loss, jnp.ones(4), k=2)
    >>> print(['{:.2E}'.format(x) for x in vals])
    ['5.00E+00', '3.00E+00']

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators
    <https://doi.org/10.6028/jres.045.026>`_, 1950.

    Ghorbani, Krishnan & Xiao, `An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_,
    ICML 2019.
  """
  name = common.PREFIX + "hessian_top_eigenvalues"
  k = diag_checks.check_positive_int(name, "k", k, "is the number of eigenvalues", 5)
  f, params = common.prepare(name, loss_fn, params, has_aux)
  dim = common.num_params(params)
  if num_iters is None:
    num_iters = min(max(20, 2 * k), dim)
  num_iters = diag_checks.check_positive_int(
      name, "num_iters", num_iters, "is the number of Lanczos steps", 20)
  if k > min(num_iters, dim):
    raise ValueError(diag_checks.BAD_EIGENVALUE_COUNT.format(
        name=name, k=k, num_iters=num_iters, dim=dim, k_ex=min(k, dim),
        it_ex=min(max(20, 2 * k), dim)))
  key = krylov.as_key(key)
  num_iters = min(num_iters, dim)

  def compute(params, key):
    t, basis = krylov.lanczos(krylov.hvp_fn(f, params), params, num_iters, key)
    vals, vecs = krylov.ritz(t)
    vals = vals[::-1][:k]
    if not return_eigenvectors:
      return vals
    return vals, krylov.basis_combine(vecs[:, ::-1][:, :k], basis)

  return jax.jit(compute)(params, key)


def hessian_trace(
    loss_fn: Callable,
    params,
    *,
    num_samples: int = 100,
    key: Union[jax.Array, int, None] = None,
    has_aux: bool = False,
) -> jax.Array:
  r"""Hutchinson's estimate of the Hessian trace :math:`\operatorname{tr} H`.

  With Rademacher probes :math:`z` (independent ±1 entries),
  :math:`\mathbb{E}[z^\top H z] = \operatorname{tr} H`, so

  .. math::
    \widehat{\operatorname{tr} H} = \frac{1}{S} \sum_{s=1}^{S} z_s^\top H z_s,
    \qquad \operatorname{Var}[z^\top H z] = 2 \sum_{i \ne j} H_{ij}^2,

  one Hessian-vector product per sample (a loop: memory stays that of one
  vector). The estimate is exact for a diagonal Hessian, whatever the
  probes. The trace is the sum of all eigenvalues, the "average sharpness"
  complementary to :func:`hessian_top_eigenvalue`.

  Args:
    loss_fn: ``params -> scalar loss`` (``(loss, aux)`` with ``has_aux``).
    params: a pytree of floating-point arrays; computed in their precision,
      at least float32.
    num_samples: number of probes S ≥ 1, default 100; the standard error falls
      like :math:`1/\sqrt{S}`.
    key: a ``jax.random`` key (or an int seed) for the probes; default
      ``jax.random.key(0)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    The estimate, a scalar of the params' precision (float32; float64 for
    float64 params).

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([5.0, 3.0, 1.0]) * w ** 2)
    >>> tr = sam_optax.diagnostics.hessian_trace(loss, jnp.ones(3), num_samples=4)
    >>> print('{:.2E}'.format(tr))
    9.00E+00

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines
    <https://doi.org/10.1080/03610918908812806>`_, 1989.

    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020.
  """
  name = common.PREFIX + "hessian_trace"
  num_samples = diag_checks.check_positive_int(
      name, "num_samples", num_samples, "is the number of random probes", 100)
  f, params = common.prepare(name, loss_fn, params, has_aux)
  key = krylov.as_key(key)

  def compute(params, key):
    matvec = krylov.hvp_fn(f, params)

    def body(s, total):
      z = krylov.random_like(jax.random.fold_in(key, s), params, jax.random.rademacher)
      return total + common.vdot(z, matvec(z))

    total = jax.lax.fori_loop(0, num_samples, body,
                              jnp.zeros((), common.compute_dtype(params)))
    return total / num_samples

  return jax.jit(compute)(params, key)
