"""Hessian-vector products and the Krylov iterations of the curvature diagnostics.

Everything works on the params pytree as it is (no flattening, so sharded
params stay sharded), in the params' precision (at least float32; see
:mod:`common`), with ``lax.fori_loop`` loops. Every vector is normalized with a
rescaled norm and every breakdown test is relative, so the iterations do not
depend on the scale of the Hessian.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src.diagnostics import common


def as_key(key):
  """``None`` → ``jax.random.key(0)``; an int seed → its key; a key as is."""
  if key is None:
    return jax.random.key(0)
  if isinstance(key, numbers.Integral) and not isinstance(key, bool):
    return jax.random.key(int(key))
  return key


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
  dtype = common.compute_dtype(leaves)
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


def _basis_coeffs(basis, tree):
  """``[⟨b_i, tree⟩]_i`` for a basis stored with a leading axis."""
  dtype = common.compute_dtype(tree)
  return sum(
      jnp.sum(b * x[None], axis=tuple(range(1, b.ndim))).astype(dtype)
      for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(tree)))


def basis_combine(coeffs, basis):
  """``Σ_i coeffs_i b_i`` (``coeffs`` may have a trailing axis of outputs)."""
  return jax.tree.map(
      lambda b: jnp.tensordot(coeffs.astype(b.dtype), b, axes=(0, 0)), basis)


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


# Lanczos takes β ≤ BREAKDOWN · (largest |α| or β so far) for a breakdown: a
# tolerance relative to the Hessian's scale, well above the rounding noise left
# by full reorthogonalization (~ε) and well below any coupling that matters.
BREAKDOWN_EXPONENT = 0.75  # tolerance ε^0.75: 6e-6 in float32, 2e-12 in float64


def lanczos(matvec, params, num_iters, key):
  """Lanczos with full reorthogonalization; returns (T, basis).

  The basis is stored with a leading axis of size ``num_iters``; ``T`` has the
  dtype of :func:`common.compute_dtype`. On a breakdown (the Krylov space is
  invariant: ``β`` is negligible next to the largest ``|α|`` or ``β`` so far)
  the next vector is a fresh random one orthogonal to the basis and the
  coupling is 0, so the Ritz values stay eigenvalues of the Hessian (no
  spurious zeros). The test is relative and norms are rescaled, so a Hessian
  multiplied by 1e-30 or 1e30 gives the same basis and a ``T`` multiplied by
  the same factor.
  """
  k = num_iters
  dtype = common.compute_dtype(params)
  tol = float(jnp.finfo(dtype).eps) ** BREAKDOWN_EXPONENT
  start_key, restart_key = jax.random.split(key)
  v0 = common.normalize(random_like(start_key, params))
  basis0 = jax.tree.map(
      lambda x: jnp.broadcast_to(jnp.zeros_like(x), (k,) + x.shape), v0)
  zeros_k = jnp.zeros((k,), dtype)

  def body(j, carry):
    basis, alphas, betas, v, v_prev, beta_prev, scale = carry
    basis = jax.tree.map(lambda b, x: b.at[j].set(x), basis, v)
    w = matvec(v)
    alpha = common.vdot(v, w)
    w = common.axpy(-alpha, v, common.axpy(-beta_prev, v_prev, w))
    w = _orthogonalize(w, basis)
    beta = common.norm(w)
    scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
    breakdown = beta <= tol * scale

    def restart(_):
      fresh = random_like(jax.random.fold_in(restart_key, j), params)
      return common.normalize(_orthogonalize(fresh, basis))

    def proceed(_):
      return common.tree_divide(w, beta)

    v_next = jax.lax.cond(breakdown, restart, proceed, None)
    beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
    return (basis, alphas.at[j].set(alpha), betas.at[j].set(beta), v_next, v,
            beta, scale)

  init = (basis0, zeros_k, zeros_k, v0, jax.tree.map(jnp.zeros_like, v0),
          jnp.zeros((), dtype), jnp.zeros((), dtype))
  basis, alphas, betas, *_ = jax.lax.fori_loop(0, k, body, init)
  off = betas[:-1]
  t = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return t, basis


def ritz(t):
  """``eigh(T)``, with ``T`` scaled to a largest entry of 1 for the solver.

  The eigenvalues are scaled back; the eigenvectors do not change.
  """
  scale = jnp.max(jnp.abs(t))
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  vals, vecs = jnp.linalg.eigh(t / scale)
  return vals * scale, vecs


def _power(matvec, params, num_iters, key, shift=0.0):
  """Power iteration on ``H − shift·I``; returns the last Rayleigh quotient."""
  v = common.normalize(random_like(key, params))

  def body(_, carry):
    v, _ = carry
    w = common.axpy(-shift, v, matvec(v))
    lam = common.vdot(v, w)
    return common.normalize(w), lam

  lam0 = jnp.zeros((), common.compute_dtype(params))
  _, lam = jax.lax.fori_loop(0, num_iters, body, (v, lam0))
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
