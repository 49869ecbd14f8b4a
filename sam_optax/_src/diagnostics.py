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
Curvature and sharpness are computed in (at least) float32, also for bfloat16
params.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import info as info_lib
from sam_optax._src import numerics

_PREFIX = "sam_optax.diagnostics."

# --- Error messages (asserted by the tests). --------------------------------

BAD_POSITIVE_INT = (
    "`{name}({arg}={value!r})`: {arg} {meaning} and must be a positive Python "
    "integer (it fixes the shape of the computation, so it cannot be a traced "
    "array). Use for example `{arg}={example}`."
)
BAD_RADIUS = (
    "`{name}(rho={rho!r})`: ρ is the radius of the perturbation ball and must "
    "be a finite number ≥ 0. Pass the radius you train with, for example "
    "`rho=0.05`."
)
BAD_K = (
    "`{name}(k={k!r}, num_iters={num_iters!r})`: k eigenvalues need at least k "
    "Lanczos steps and at most as many as there are parameters ({dim}). Use "
    "1 ≤ k ≤ num_iters ≤ {dim}, for example `k={k_ex}, num_iters={it_ex}`."
)
BAD_METHOD = (
    "`{name}(method={method!r})`: unknown method; use `method='lanczos'` "
    "(default, accurate, keeps num_iters vectors) or `method='power'` (keeps "
    "two vectors)."
)
NO_PARAMS = (
    "`{name}`: `params` has no array leaves, so there is no Hessian to "
    "measure. Pass the model's params pytree."
)
M_NOT_DIVIDING = (
    "`{name}(m={m})`: m (examples per perturbation) must divide the batch "
    "size, but the batch has {b} examples. Pick m among the divisors of {b} "
    "({divisors}), or pass `m=None` for one group."
)
BAD_BATCH = (
    "`{name}`: every leaf of `batch` needs the same leading batch axis (the "
    "examples); got leading sizes {sizes}."
)
NUM_CLASSES_NEEDED = (
    "`{name}`: the labels are traced (inside `jax.jit`), so the number of "
    "classes cannot be read from them. Pass `num_classes=` explicitly."
)
BAD_LABELS = (
    "`{name}`: `labels` must be a 1-D integer array of class indices with one "
    "entry per example; got shape {shape} and dtype {dtype} for {n} examples."
)


def _check_positive_int(name, arg, value, meaning, example):
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < 1):
    raise ValueError(BAD_POSITIVE_INT.format(
        name=name, arg=arg, value=value, meaning=meaning, example=example))
  return int(value)


def _check_radius(name, rho):
  if isinstance(rho, (numbers.Real, np.ndarray, np.generic)):
    v = float(np.asarray(rho))
    if isinstance(rho, bool) or not math.isfinite(v) or v < 0:
      raise ValueError(BAD_RADIUS.format(name=name, rho=rho))


def _to_f32(params):
  """Casts every leaf to (at least) float32: curvature is measured in f32."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)),
      params)


def _scalar_loss(loss_fn, has_aux, name):
  checked = checks.checked_loss(loss_fn, has_aux, name)
  return lambda *args: checked(*args)[0]


def _prepare(name, loss_fn, params, has_aux):
  checks.check_float_params(name, params)
  if not jax.tree.leaves(params):
    raise ValueError(NO_PARAMS.format(name=name))
  return _scalar_loss(loss_fn, has_aux, name), _to_f32(params)


def _as_key(key):
  """``None`` → ``jax.random.key(0)``; an int seed → its key; a key as is."""
  if key is None:
    return jax.random.key(0)
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.key(int(key))
  return key


def _dim(params) -> int:
  return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params))


# --- Tree arithmetic in f32. ---------------------------------------------------

def _axpy(a, x, y):
  """``a x + y`` on trees."""
  return jax.tree.map(lambda u, v: a * u + v, x, y)


def _normalize(tree):
  return numerics.tree_scale(tree, numerics.safe_divide(1.0, numerics.tree_norm(tree)))


def _explicit_sharding(x):
  """The sharding of ``x`` if it lives on a mesh with explicit axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ()) or ()
  if any(t == jax.sharding.AxisType.Explicit for t in axis_types):
    return sharding
  return None


def _random_like(key, tree, sampler=jax.random.normal):
  """Random leaves like ``tree``'s, sharded like them on an explicit mesh.

  One draw for the whole tree, cut into leaves: a random-number generator per
  leaf would make compilation time grow with the number of leaves.
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
  dtype = functools.reduce(jnp.promote_types, [x.dtype for x in leaves])
  flat = sampler(key, (sum(sizes),), dtype=dtype)
  out, start = [], 0
  for x, size in zip(leaves, sizes):
    piece = jnp.reshape(flat[start:start + size], jnp.shape(x)).astype(x.dtype)
    sharding = _explicit_sharding(x)
    if sharding is not None:
      piece = jax.sharding.reshard(piece, sharding)
    out.append(piece)
    start += size
  return jax.tree.unflatten(treedef, out)


def _vdot(a, b):
  """``Σ a·b`` over all leaves, as a product and a sum.

  (A dot product of two sharded vectors is ambiguous on a mesh with explicit
  axes; an elementwise product followed by a reduction is not.)
  """
  return sum((jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             jnp.zeros((), jnp.float32))


def _basis_coeffs(basis, tree):
  """``[⟨b_i, tree⟩]_i`` for a basis stored with a leading axis."""
  return sum(
      jnp.sum(b * x[None], axis=tuple(range(1, b.ndim)))
      for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(tree)))


def _basis_combine(coeffs, basis):
  """``Σ_i coeffs_i b_i`` (``coeffs`` may have a trailing axis of outputs)."""
  return jax.tree.map(lambda b: jnp.tensordot(coeffs, b, axes=(0, 0)), basis)


def _orthogonalize(tree, basis):
  """Removes the components of ``tree`` along ``basis`` (twice is enough)."""
  for _ in range(2):
    tree = jax.tree.map(jnp.subtract, tree, _basis_combine(_basis_coeffs(basis, tree), basis))
  return tree


# --- 1. Step statistics. -------------------------------------------------------

def step_statistics(opt_state, *, prefix: str = "") -> dict[str, jax.Array]:
  r"""The statistics of the last sharpness-aware step, as a dict of scalars.

  Reads the :class:`~sam_optax.SAMInfo` that every sharpness-aware transform
  keeps in its state (found anywhere inside ``opt_state``, as
  :func:`sam_optax.get_info` does) and returns it as a flat dict, ready for a
  logger. With :math:`g = \nabla L(w)`, :math:`\varepsilon` the perturbation
  and :math:`g_{\mathrm{SAM}} = \nabla L(w + \varepsilon)`:

  .. math::
    \text{sharpness} = L(w + \varepsilon) - L(w), \qquad
    \text{cosine} = \frac{\langle g, g_{\mathrm{SAM}} \rangle}
                         {\|g\|_2\, \|g_{\mathrm{SAM}}\|_2}.

  Keys (all float32 scalars): ``loss`` (:math:`L(w)`, from ``value=``),
  ``perturbed_loss`` (:math:`L(w+\varepsilon)`), ``sharpness``, ``grad_norm``
  (:math:`\|g\|_2`), ``perturbation_norm`` (:math:`\|\varepsilon\|_2`),
  ``perturbed_grad_norm`` (:math:`\|g_{\mathrm{SAM}}\|_2`), ``cosine`` and
  ``rho``. ``loss`` and ``sharpness`` are ``nan`` unless ``update`` got
  ``value=`` (the unperturbed loss), ``cosine`` unless the transform was made
  with ``track_cosine=True``; with per-device perturbations
  (``axis_name``) or groups (``m=``) each is the mean over perturbations.

  It is pure pytree access, so it works inside ``jax.jit`` (return the dict
  from the jitted step) as well as outside.

  Args:
    opt_state: the state of a chain or wrapper that contains exactly one
      sharpness-aware transform, or a :class:`~sam_optax.SAMInfo` itself.
    prefix: prepended to every key, e.g. ``"sam/"``.

  Returns:
    A ``dict[str, jax.Array]`` of float32 scalars, keys in the order above.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> w = jnp.array([3.0, 4.0])
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.5, track_cosine=True)
    >>> value, g = jax.value_and_grad(loss)(w)
    >>> _, state = tx.update(g, tx.init(w), w, loss_fn=loss, value=value)
    >>> stats = sam_optax.diagnostics.step_statistics(state)
    >>> for k in ('sharpness', 'perturbation_norm', 'grad_norm', 'cosine'):
    ...   print(k, '{:.2E}'.format(stats[k]))
    sharpness 5.25E+00
    perturbation_norm 5.00E-01
    grad_norm 1.00E+01
    cosine 1.00E+00

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  info = opt_state if isinstance(opt_state, base.SAMInfo) else info_lib.get_info(opt_state)
  return {prefix + k: jnp.asarray(v, jnp.float32) for k, v in info._asdict().items()}


# --- 2. Curvature. -------------------------------------------------------------

def hessian_vector_product(loss_fn: Callable, params, vector, *,
                           has_aux: bool = False):
  r"""The Hessian of ``loss_fn`` at ``params`` times ``vector``, in float32.

  Forward-over-reverse differentiation: the directional derivative of the
  gradient,

  .. math::
    H v = \frac{\partial}{\partial t} \nabla L(w + t v) \Big|_{t=0},

  computed by ``jax.jvp`` of ``jax.grad``; it costs about two gradient
  evaluations and never forms :math:`H`. Params (and ``vector``) are cast to
  at least float32 first, so bfloat16 models get f32 curvature.

  Args:
    loss_fn: ``params -> scalar loss`` (``(loss, aux)`` with ``has_aux``).
      Close over the batch.
    params: a pytree of floating-point arrays (sharded arrays are fine).
    vector: a pytree like ``params``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)`` (aux is discarded).

  Returns:
    :math:`H v`, a pytree like ``params`` with (at least) float32 leaves.

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
  name = _PREFIX + "hessian_vector_product"
  f, params = _prepare(name, loss_fn, params, has_aux)
  return _hvp_fn(f, params)(_to_f32(vector))


def _hvp_fn(f, params):
  grad_f = jax.grad(f)

  def hvp(v):
    return jax.jvp(grad_f, (params,), (v,))[1]

  return hvp


def _check_method(name, method):
  if method not in ("lanczos", "power"):
    raise ValueError(BAD_METHOD.format(name=name, method=method))


def _lanczos(matvec, params, num_iters, key):
  """Lanczos with full reorthogonalization; returns (T, basis).

  The basis is stored with a leading axis of size ``num_iters``. On a
  breakdown (the Krylov space is invariant, ``β ≈ 0``) the next vector is a
  fresh random one orthogonal to the basis and the coupling is 0, so the Ritz
  values stay eigenvalues of the Hessian (no spurious zeros).
  """
  k = num_iters
  start_key, restart_key = jax.random.split(key)
  v0 = _normalize(_random_like(start_key, params))
  basis0 = jax.tree.map(
      lambda x: jnp.broadcast_to(jnp.zeros_like(x), (k,) + x.shape), v0)
  zeros_k = jnp.zeros((k,), jnp.float32)

  def body(j, carry):
    basis, alphas, betas, v, v_prev, beta_prev, scale = carry
    basis = jax.tree.map(lambda b, x: b.at[j].set(x), basis, v)
    w = matvec(v)
    alpha = _vdot(v, w)
    w = _axpy(-alpha, v, _axpy(-beta_prev, v_prev, w))
    w = _orthogonalize(w, basis)
    beta = numerics.tree_norm(w)
    scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
    breakdown = beta <= 1e-6 * scale

    def restart(_):
      fresh = _random_like(jax.random.fold_in(restart_key, j), params)
      return _normalize(_orthogonalize(fresh, basis))

    def proceed(_):
      return numerics.tree_scale(w, numerics.safe_divide(1.0, beta))

    v_next = jax.lax.cond(breakdown, restart, proceed, None)
    beta = jnp.where(breakdown, 0.0, beta)
    return (basis, alphas.at[j].set(alpha), betas.at[j].set(beta), v_next, v,
            beta, scale)

  init = (basis0, zeros_k, zeros_k, v0, jax.tree.map(jnp.zeros_like, v0),
          jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  basis, alphas, betas, *_ = jax.lax.fori_loop(0, k, body, init)
  off = betas[:-1]
  t = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return t, basis


def _power(matvec, params, num_iters, key, shift=0.0):
  """Power iteration on ``H − shift·I``; returns the last Rayleigh quotient."""
  v = _normalize(_random_like(key, params))

  def body(_, carry):
    v, _ = carry
    w = _axpy(-shift, v, matvec(v))
    lam = _vdot(v, w)
    return _normalize(w), lam

  _, lam = jax.lax.fori_loop(0, num_iters, body, (v, jnp.zeros((), jnp.float32)))
  return lam


def _power_top(matvec, params, num_iters, key):
  """Largest algebraic eigenvalue by power iteration, shifting if needed."""
  k1, k2 = jax.random.split(key)
  lam = _power(matvec, params, num_iters, k1)
  # Power iteration finds the eigenvalue of largest |λ|. If it is negative,
  # H − λ·I is positive semi-definite and its top eigenvalue is λ_max − λ.
  return jax.lax.cond(
      lam < 0,
      lambda lam: lam + _power(matvec, params, num_iters, k2, shift=lam),
      lambda lam: lam,
      lam)


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

  Args:
    loss_fn: ``params -> scalar loss`` (``(loss, aux)`` with ``has_aux``);
      close over the batch (a fixed batch gives a fixed Hessian).
    params: a pytree of floating-point arrays; computed in (at least) float32.
    num_iters: Hessian-vector products (≥ 1), default 20. Lanczos uses
      ``min(num_iters, number of parameters)``.
    key: a ``jax.random`` key (or an int seed) for the random start vector;
      default ``jax.random.key(0)``.
    method: ``'lanczos'`` or ``'power'``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    The largest (algebraic) eigenvalue, a float32 scalar.

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
  name = _PREFIX + "hessian_top_eigenvalue"
  num_iters = _check_positive_int(
      name, "num_iters", num_iters, "is the number of Hessian-vector products", 20)
  _check_method(name, method)
  f, params = _prepare(name, loss_fn, params, has_aux)
  key = _as_key(key)

  def compute(params, key):
    matvec = _hvp_fn(f, params)
    if method == "power":
      return _power_top(matvec, params, num_iters, key)
    t, _ = _lanczos(matvec, params, min(num_iters, _dim(params)), key)
    return jnp.linalg.eigvalsh(t)[-1]

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
    params: a pytree of floating-point arrays; computed in (at least) float32.
    k: how many eigenvalues, ``1 ≤ k ≤ num_iters``.
    num_iters: Lanczos steps; default ``max(20, 2 k)``, at most the number of
      parameters. Memory: ``num_iters`` vectors the size of ``params``.
    key: a ``jax.random`` key (or an int seed) for the start vector; default
      ``jax.random.key(0)``.
    return_eigenvectors: also return the Ritz vectors.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A float32 array of shape ``[k]`` (descending), or ``(eigenvalues,
    eigenvectors)`` with ``return_eigenvectors=True``.

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
  name = _PREFIX + "hessian_top_eigenvalues"
  k = _check_positive_int(name, "k", k, "is the number of eigenvalues", 5)
  f, params = _prepare(name, loss_fn, params, has_aux)
  dim = _dim(params)
  if num_iters is None:
    num_iters = min(max(20, 2 * k), dim)
  num_iters = _check_positive_int(
      name, "num_iters", num_iters, "is the number of Lanczos steps", 20)
  if k > min(num_iters, dim):
    raise ValueError(BAD_K.format(
        name=name, k=k, num_iters=num_iters, dim=dim, k_ex=min(k, dim),
        it_ex=min(max(20, 2 * k), dim)))
  key = _as_key(key)
  num_iters = min(num_iters, dim)

  def compute(params, key):
    t, basis = _lanczos(_hvp_fn(f, params), params, num_iters, key)
    vals, vecs = jnp.linalg.eigh(t)
    vals = vals[::-1][:k]
    if not return_eigenvectors:
      return vals
    return vals, _basis_combine(vecs[:, ::-1][:, :k], basis)

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
    params: a pytree of floating-point arrays; computed in (at least) float32.
    num_samples: number of probes S ≥ 1, default 100; the standard error falls
      like :math:`1/\sqrt{S}`.
    key: a ``jax.random`` key (or an int seed) for the probes; default
      ``jax.random.key(0)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    The estimate, a float32 scalar.

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
  name = _PREFIX + "hessian_trace"
  num_samples = _check_positive_int(
      name, "num_samples", num_samples, "is the number of random probes", 100)
  f, params = _prepare(name, loss_fn, params, has_aux)
  key = _as_key(key)

  def compute(params, key):
    matvec = _hvp_fn(f, params)

    def body(s, total):
      z = _random_like(jax.random.fold_in(key, s), params, jax.random.rademacher)
      return total + _vdot(z, matvec(z))

    total = jax.lax.fori_loop(0, num_samples, body, jnp.zeros((), jnp.float32))
    return total / num_samples

  return jax.jit(compute)(params, key)


# --- 3. m-sharpness. -----------------------------------------------------------

def _split_groups(name, batch, m):
  """Reshapes every leaf ``[b, ...]`` to ``[b // m, m, ...]``, checking m."""
  leaves = jax.tree.leaves(batch)
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(BAD_BATCH.format(name=name, sizes=sorted(map(str, sizes))))
  (b,) = sizes
  m = b if m is None else m
  if b % m:
    divisors = ", ".join(str(d) for d in range(1, b + 1) if b % d == 0)
    raise ValueError(M_NOT_DIVIDING.format(name=name, m=m, b=b, divisors=divisors))
  return jax.tree.map(lambda x: jnp.reshape(x, (b // m, m) + jnp.shape(x)[1:]), batch)


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

  Groups are processed one after another (``lax.map``), each in float32.

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
    :math:`S_m`, a float32 scalar.

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
  name = _PREFIX + "m_sharpness"
  _check_radius(name, rho)
  if step_size is not None and isinstance(step_size, (numbers.Real, np.ndarray, np.generic)):
    if isinstance(step_size, bool) or not (
        math.isfinite(float(step_size)) and float(step_size) > 0):
      raise ValueError(
          f"`{name}(step_size={step_size!r})`: the ascent step size η must be "
          "a finite number > 0, or None for η = ρ.")
  ascent_steps = _check_positive_int(
      name, "ascent_steps", ascent_steps, "is the number of ascent steps per group", 1)
  if m is not None:
    m = _check_positive_int(name, "m", m, "is the number of examples per perturbation", 32)
  f, params = _prepare(name, loss_fn, params, has_aux)
  chunks = _split_groups(name, batch, m)
  rho = jnp.asarray(rho, jnp.float32)
  eta = rho if step_size is None else jnp.asarray(step_size, jnp.float32)
  return jax.jit(lambda *args: _m_sharpness(f, *args, ascent_steps))(
      params, chunks, rho, eta)


def _m_sharpness(f, params, chunks, rho, eta, ascent_steps):
  """The computation of :func:`m_sharpness`."""
  value_and_grad = jax.value_and_grad(f)

  def one_group(chunk):
    loss0, g0 = value_and_grad(params, chunk)
    loss0 = jnp.asarray(loss0, jnp.float32)
    eps = numerics.tree_scale(numerics.dual_direction(g0), rho)

    def body(_, carry):
      eps, best = carry
      loss, g = value_and_grad(numerics.add_perturbation(params, eps), chunk)
      best = jnp.maximum(best, jnp.asarray(loss, jnp.float32) - loss0)
      eps = _axpy(eta, numerics.dual_direction(g), eps)
      eps = numerics.tree_scale(
          eps, jnp.minimum(1.0, numerics.safe_divide(rho, numerics.tree_norm(eps))))
      return eps, best

    eps, best = jax.lax.fori_loop(0, ascent_steps - 1, body,
                                  (eps, jnp.zeros((), jnp.float32)))
    final = jnp.asarray(f(numerics.add_perturbation(params, eps), chunk), jnp.float32)
    return jnp.maximum(best, final - loss0)

  return jnp.mean(jax.lax.map(one_group, chunks))


# --- 4. Feature reliance. ------------------------------------------------------

def _labels_1d(name, labels, n):
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != n or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(BAD_LABELS.format(name=name, shape=labels.shape,
                                       dtype=labels.dtype, n=n))
  return labels


def _num_classes(name, num_classes, *label_arrays):
  if num_classes is not None:
    return _check_positive_int(name, "num_classes", num_classes,
                               "is the number of classes", 2)
  try:
    return max(int(np.max(np.asarray(y))) for y in label_arrays) + 1
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    raise ValueError(NUM_CLASSES_NEEDED.format(name=name)) from None


def linear_probe_accuracy(
    features,
    labels,
    *,
    test_features=None,
    test_labels=None,
    num_classes: Optional[int] = None,
    l2: float = 1e-3,
) -> jax.Array:
  r"""Accuracy of a closed-form ridge linear probe on ``features``.

  How linearly decodable the labels are from a representation. The probe is
  ridge regression onto one-hot targets :math:`Y` with an unpenalized bias,
  solved in closed form (no iterative training, no randomness):

  .. math::
    W = \big(\bar X^\top \bar X + \lambda\, \tfrac{\operatorname{tr}
        (\bar X^\top \bar X)}{d}\, I\big)^{-1} \bar X^\top \bar Y, \qquad
    \hat y(x) = \operatorname{argmax}_c\, \big((x - \mu_X) W + \mu_Y\big)_c,

  where :math:`\bar X, \bar Y` are the centered features and targets and
  :math:`\lambda` is ``l2`` (relative to the mean feature variance, so the
  probe does not depend on the scale of the features). When there are more
  features than examples the equivalent dual form is solved instead.

  Args:
    features: ``[n, ...]`` array (flattened to ``[n, d]``), e.g. a layer's
      activations.
    labels: ``[n]`` integer class indices.
    test_features: optional held-out ``[n_test, ...]`` features; the accuracy
      is measured on them (recommended: training accuracy of a probe with
      ``d ≳ n`` is close to 1 for any features).
    test_labels: ``[n_test]`` labels of ``test_features``.
    num_classes: number of classes; default read from the labels (pass it
      under ``jax.jit``).
    l2: relative ridge strength λ > 0, default 1e-3.

  Returns:
    The accuracy in ``[0, 1]``, a float32 scalar.

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> x = jax.random.normal(jax.random.key(0), (200, 5))
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> acc = sam_optax.diagnostics.linear_probe_accuracy(x[:100], y[:100],
    ...     test_features=x[100:], test_labels=y[100:])
    >>> print('{:.2E}'.format(acc))
    9.60E-01

  References:
    Alain & Bengio, `Understanding intermediate layers using linear classifier
    probes <https://arxiv.org/abs/1610.01644>`_, 2016.
  """
  name = _PREFIX + "linear_probe_accuracy"
  x = jnp.asarray(features)
  n = x.shape[0] if x.ndim else 0
  x = jnp.reshape(x, (n, -1)).astype(jnp.promote_types(x.dtype, jnp.float32))
  y = _labels_1d(name, labels, n)
  if (test_features is None) != (test_labels is None):
    raise ValueError(
        f"`{name}`: pass both `test_features` and `test_labels`, or neither "
        "(then the accuracy is measured on the training features).")
  if test_features is None:
    xt, yt = x, y
  else:
    xt = jnp.asarray(test_features)
    xt = jnp.reshape(xt, (xt.shape[0], -1)).astype(x.dtype)
    if xt.shape[1] != x.shape[1]:
      raise ValueError(
          f"`{name}`: `test_features` have {xt.shape[1]} features per example "
          f"but `features` have {x.shape[1]}.")
    yt = _labels_1d(name, test_labels, xt.shape[0])
  if isinstance(l2, (numbers.Real, np.ndarray, np.generic)) and not (
      math.isfinite(float(l2)) and float(l2) > 0):
    raise ValueError(
        f"`{name}(l2={l2!r})`: the relative ridge strength must be a finite "
        "number > 0 (it keeps the probe well posed). Use for example "
        "`l2=1e-3`.")
  c = _num_classes(name, num_classes, y, yt)
  return jax.jit(lambda *args: _ridge_probe(*args, c))(x, y, xt, yt, l2)


def _ridge_probe(x, y, xt, yt, l2, c):
  """The computation of :func:`linear_probe_accuracy`."""
  n, d = x.shape
  targets = jax.nn.one_hot(y, c, dtype=x.dtype)
  mu_x, mu_y = jnp.mean(x, 0), jnp.mean(targets, 0)
  xc, yc = x - mu_x, targets - mu_y
  variance = jnp.sum(xc * xc) / d
  ridge = l2 * jnp.where(variance > 0, variance, 1.0)
  if d <= n:
    w = jnp.linalg.solve(xc.T @ xc + ridge * jnp.eye(d, dtype=x.dtype), xc.T @ yc)
  else:
    w = xc.T @ jnp.linalg.solve(xc @ xc.T + ridge * jnp.eye(n, dtype=x.dtype), yc)
  pred = jnp.argmax((xt - mu_x) @ w + mu_y, axis=-1)
  return jnp.mean((pred == yt).astype(jnp.float32))


def feature_reliance(
    representation_fn: Callable,
    params,
    probes: Mapping[str, tuple[Any, Any]],
    *,
    train_fraction: float = 0.5,
    num_classes: Optional[int] = None,
    l2: float = 1e-3,
) -> dict[str, jax.Array]:
  r"""Per-feature linear-probe accuracy of a model's representation.

  Measures how well a representation :math:`\phi_w` encodes each of several
  features (the "feature quality" of Springer et al.). For each named
  feature, ``probes`` holds inputs in which only that feature carries the
  probe's label (for two blocks: the other block is shuffled across examples,
  or replaced by noise) together with that label. The representation of the
  first ``train_fraction`` of the examples trains a
  :func:`linear_probe_accuracy` probe; the accuracy on the rest is reported:

  .. math::
    \operatorname{reliance}_j = \operatorname{acc}\big(\text{probe trained on }
      \phi_w(x^{(j)}_{\mathrm{train}}),\ \text{tested on }
      \phi_w(x^{(j)}_{\mathrm{test}})\big).

  Chance level means the representation has not learned feature ``j``; SAM's
  balanced feature learning shows as higher accuracy on the feature that
  plain training neglects. For a two-layer network the weights themselves
  give a cheaper answer: :func:`block_contributions`.

  Args:
    representation_fn: ``(params, inputs) -> [n, ...]`` features (e.g. the
      penultimate layer, or the model's outputs).
    params: the model's params.
    probes: ``{feature name: (inputs, labels)}``, ``labels`` ``[n]`` integers.
      Shuffle the examples beforehand: the split is by position.
    train_fraction: fraction of each probe set used to fit the probe, in
      ``(0, 1)``; default 0.5.
    num_classes: number of classes; default read from the labels.
    l2: relative ridge strength of the probe.

  Returns:
    ``{feature name: held-out probe accuracy}`` (float32 scalars).

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> y = jax.random.bernoulli(k1, 0.5, (400,)).astype(jnp.int32)
    >>> noise = jax.random.normal(k2, (400, 2))
    >>> sign = (2 * y - 1)[:, None].astype(jnp.float32)
    >>> easy_only = jnp.concatenate([sign + 0.1 * noise[:, :1], noise[:, 1:]], 1)
    >>> hard_only = jnp.concatenate([noise[:, :1], sign + 0.1 * noise[:, 1:]], 1)
    >>> rep = lambda w, x: jnp.tanh(x @ w)  # a representation that ignores block 2
    >>> w = jnp.array([[1.0, -1.0], [0.0, 0.0]])
    >>> out = sam_optax.diagnostics.feature_reliance(
    ...     rep, w, {'easy': (easy_only, y), 'hard': (hard_only, y)})
    >>> print({k: '{:.2E}'.format(v) for k, v in out.items()})
    {'easy': '1.00E+00', 'hard': '5.05E-01'}

  References:
    Springer, Nagarajan & Raghunathan, `Sharpness-Aware Minimization Enhances
    Feature Quality via Balanced Feature Learning
    <https://arxiv.org/abs/2405.20439>`_, ICLR 2024.

    Kirichenko, Izmailov & Wilson, `Last Layer Re-Training is Sufficient for
    Robustness to Spurious Correlations <https://arxiv.org/abs/2204.02937>`_,
    ICLR 2023.
  """
  name = _PREFIX + "feature_reliance"
  if not (isinstance(train_fraction, numbers.Real) and 0 < train_fraction < 1):
    raise ValueError(
        f"`{name}(train_fraction={train_fraction!r})`: the probe is fitted on "
        "this fraction of each probe set and tested on the rest, so it must be "
        "in (0, 1). Use for example `train_fraction=0.5`.")
  if not isinstance(probes, Mapping) or not probes:
    raise ValueError(
        f"`{name}`: `probes` must be a non-empty dict "
        "`{feature name: (inputs, labels)}`.")
  out = {}
  for key, (inputs, labels) in probes.items():
    feats = representation_fn(params, inputs)
    n = jnp.shape(feats)[0]
    n_train = int(round(train_fraction * n))
    if not 0 < n_train < n:
      raise ValueError(
          f"`{name}`: probe set {key!r} has {n} examples, too few to split "
          f"with train_fraction={train_fraction}.")
    labels = jnp.asarray(labels)
    out[key] = linear_probe_accuracy(
        feats[:n_train], labels[:n_train], test_features=feats[n_train:],
        test_labels=labels[n_train:], num_classes=num_classes, l2=l2)
  return out


Indices = Union[slice, Sequence[int], np.ndarray, jax.Array]


def block_contributions(kernel, head, blocks: Mapping[str, Indices]) -> dict[str, jax.Array]:
  r"""How much a two-layer network's output draws on each block of inputs.

  For :math:`f(x) = \sum_j v_j\, \sigma(w_j^\top x + b_j)` with hidden units
  :math:`j` (``kernel[:, j]`` is :math:`w_j`, ``head[j]`` is :math:`v_j`),
  the contribution of the input coordinates :math:`B` is

  .. math::
    c_B = \sum_j \|v_j\|_2\, \|w_{j,B}\|_2,

  the weight a unit puts on the block times how much the output uses that
  unit. If each unit reads a single block (unit ``e`` the easy block, unit
  ``h`` the hard one) the ratio :math:`c_h / c_e = |v_h|\,\|w_h\| /
  (|v_e|\,\|w_e\|)` is the hard-over-easy reliance of the balanced-feature
  experiment: near 0 when the network ignores the hard feature (plain
  gradient descent, simplicity bias), larger under SAM.

  Args:
    kernel: first-layer weights ``[d_in, hidden]`` (the ``x @ kernel``
      convention of ``flax.linen.Dense``).
    head: second-layer weights ``[hidden]`` or ``[hidden, d_out]``.
    blocks: ``{block name: input coordinates}``; coordinates as a slice, a
      list of ints or a boolean mask of length ``d_in``.

  Returns:
    ``{block name: c_B}`` (float32 scalars).

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> kernel = jnp.array([[2.0, 0.0], [0.0, 0.3]])  # rows: x_easy, x_hard
    >>> head = jnp.array([1.5, 0.5])
    >>> c = sam_optax.diagnostics.block_contributions(
    ...     kernel, head, {'easy': [0], 'hard': [1]})
    >>> print('{:.2E}'.format(c['hard'] / c['easy']))
    5.00E-02

  References:
    Springer, Nagarajan & Raghunathan, `Sharpness-Aware Minimization Enhances
    Feature Quality via Balanced Feature Learning
    <https://arxiv.org/abs/2405.20439>`_, ICLR 2024.
  """
  name = _PREFIX + "block_contributions"
  kernel = jnp.asarray(kernel)
  head = jnp.asarray(head)
  if kernel.ndim != 2 or head.ndim not in (1, 2) or head.shape[0] != kernel.shape[1]:
    raise ValueError(
        f"`{name}`: expected `kernel` of shape [d_in, hidden] and `head` of "
        f"shape [hidden] or [hidden, d_out]; got {kernel.shape} and "
        f"{head.shape}.")
  kernel = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  head = head.astype(jnp.promote_types(head.dtype, jnp.float32))
  head_norms = jnp.abs(head) if head.ndim == 1 else jnp.linalg.norm(head, axis=1)
  out = {}
  for key, idx in blocks.items():
    if not isinstance(idx, slice):
      idx = np.asarray(idx)
      if idx.dtype == bool:
        if idx.shape != (kernel.shape[0],):
          raise ValueError(
              f"`{name}`: the boolean mask of block {key!r} has shape "
              f"{idx.shape}; it needs one entry per input ({kernel.shape[0]}).")
        idx = np.flatnonzero(idx)
    rows = kernel[idx]
    out[key] = jnp.sum(head_norms * jnp.linalg.norm(rows, axis=0))
  return out
