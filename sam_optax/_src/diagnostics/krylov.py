"""Hessian-vector products and the Krylov iterations of the curvature diagnostics.

Everything works on the params pytree as it is (no flattening, so sharded
params stay sharded), in (at least) float32, with ``lax.fori_loop`` loops.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import numerics
from sam_optax._src.diagnostics import common


def as_key(key):
  """``None`` → ``jax.random.key(0)``; an int seed → its key; a key as is."""
  if key is None:
    return jax.random.key(0)
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.key(int(key))
  return key


def num_params(params) -> int:
  """The number of scalars in ``params``: the dimension of the Hessian."""
  return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params))


# --- Tree arithmetic in f32. ---------------------------------------------------

def _normalize(tree):
  """``tree / ‖tree‖₂`` (0 at 0)."""
  return numerics.tree_scale(tree, numerics.safe_divide(1.0, numerics.tree_norm(tree)))


def _explicit_sharding(x):
  """The sharding of ``x`` if it lives on a mesh with explicit axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ()) or ()
  if any(t == jax.sharding.AxisType.Explicit for t in axis_types):
    return sharding
  return None


def random_like(key, tree, sampler=jax.random.normal):
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


def vdot(a, b):
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


def basis_combine(coeffs, basis):
  """``Σ_i coeffs_i b_i`` (``coeffs`` may have a trailing axis of outputs)."""
  return jax.tree.map(lambda b: jnp.tensordot(coeffs, b, axes=(0, 0)), basis)


def _orthogonalize(tree, basis):
  """Removes the components of ``tree`` along ``basis`` (twice is enough)."""
  for _ in range(2):
    tree = jax.tree.map(jnp.subtract, tree, basis_combine(_basis_coeffs(basis, tree), basis))
  return tree



# --- Hessian-vector products and Krylov iterations. ----------------------------

def hvp_fn(f, params):
  """``v ↦ H v`` at ``params``: forward-over-reverse (``jax.jvp`` of ``jax.grad``)."""
  grad_f = jax.grad(f)

  def hvp(v):
    return jax.jvp(grad_f, (params,), (v,))[1]

  return hvp


def lanczos(matvec, params, num_iters, key):
  """Lanczos with full reorthogonalization; returns (T, basis).

  The basis is stored with a leading axis of size ``num_iters``. On a
  breakdown (the Krylov space is invariant, ``β ≈ 0``) the next vector is a
  fresh random one orthogonal to the basis and the coupling is 0, so the Ritz
  values stay eigenvalues of the Hessian (no spurious zeros).
  """
  k = num_iters
  start_key, restart_key = jax.random.split(key)
  v0 = _normalize(random_like(start_key, params))
  basis0 = jax.tree.map(
      lambda x: jnp.broadcast_to(jnp.zeros_like(x), (k,) + x.shape), v0)
  zeros_k = jnp.zeros((k,), jnp.float32)

  def body(j, carry):
    basis, alphas, betas, v, v_prev, beta_prev, scale = carry
    basis = jax.tree.map(lambda b, x: b.at[j].set(x), basis, v)
    w = matvec(v)
    alpha = vdot(v, w)
    w = common.axpy(-alpha, v, common.axpy(-beta_prev, v_prev, w))
    w = _orthogonalize(w, basis)
    beta = numerics.tree_norm(w)
    scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
    breakdown = beta <= 1e-6 * scale

    def restart(_):
      fresh = random_like(jax.random.fold_in(restart_key, j), params)
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
  v = _normalize(random_like(key, params))

  def body(_, carry):
    v, _ = carry
    w = common.axpy(-shift, v, matvec(v))
    lam = vdot(v, w)
    return _normalize(w), lam

  _, lam = jax.lax.fori_loop(0, num_iters, body, (v, jnp.zeros((), jnp.float32)))
  return lam


def power_top(matvec, params, num_iters, key):
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
