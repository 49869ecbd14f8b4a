"""What the diagnostics share: public names, checked inputs, tree arithmetic.

The curvature and sharpness diagnostics compute in the params' precision (at
least float32): every leaf keeps its dtype (bfloat16/float16 promoted to
float32), and the scalars they produce (norms, dot products, eigenvalues) have
the widest leaf dtype, :func:`compute_dtype`. Norms are rescaled by the largest
entry first, so no square leaves the dtype's range: a Hessian of 1e-30 or 1e30
is measured as well as one of 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import checks
from sam_optax._src.diagnostics import checks as diag_checks
from sam_optax._src import numerics

PREFIX = "sam_optax.diagnostics."


def to_f32(tree):
  """Casts every leaf to (at least) float32: bf16/f16 are promoted, f64 kept."""
  return jax.tree.map(numerics.f32, tree)


def compute_dtype(tree):
  """The dtype of the scalars computed from ``tree``: its widest float (≥ f32)."""
  dtypes = [numerics.f32(x).dtype for x in jax.tree.leaves(tree)]
  with jax.numpy_dtype_promotion("standard"):  # f32 with f64 is f64, also when strict
    return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def num_params(params) -> int:
  """The number of scalars in ``params``: the dimension of the Hessian."""
  return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params))


def prepare(name: str, loss_fn, params, has_aux: bool):
  """``(scalar loss, params of at least f32)``: the loss checked, its aux dropped."""
  checks.check_float_params(name, params)
  if not num_params(params):
    raise ValueError(diag_checks.NO_PARAMS.format(name=name))
  checked = checks.checked_loss(loss_fn, has_aux, name)
  return (lambda *args: checked(*args)[0]), to_f32(params)


# --- Tree arithmetic: leaves keep their dtypes, scalars are cast to them. -------

def _like(scalar, x):
  """A scalar in the dtype of the leaf ``x`` (no implicit promotion)."""
  return jnp.asarray(scalar).astype(x.dtype)


def tree_scale(tree, scalar):
  """``scalar · tree``."""
  return jax.tree.map(lambda x: _like(scalar, x) * x, tree)


def tree_divide(tree, scalar):
  """``tree / scalar``, and exactly 0 where ``scalar == 0``.

  A division, not a multiplication by ``1 / scalar``, which overflows for a
  subnormal ``scalar``.
  """
  positive = scalar > 0
  safe = jnp.where(positive, scalar, jnp.ones_like(scalar))
  return jax.tree.map(
      lambda x: jnp.where(positive, x / _like(safe, x), jnp.zeros_like(x)), tree)


def axpy(a, x, y):
  """``a x + y`` on trees."""
  return jax.tree.map(lambda u, v: _like(a, u) * u + v, x, y)


def vdot(a, b):
  """``Σ a·b`` over all leaves, accumulated in :func:`compute_dtype`.

  An elementwise product and a reduction per leaf (a dot product of two
  sharded vectors is ambiguous on a mesh with explicit axes; this is not).
  """
  dtype = compute_dtype(a)
  return sum((jnp.sum(x * y).astype(dtype)
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             jnp.zeros((), dtype))


def max_abs(tree):
  """``max |tree|`` over all leaves (0 for a tree of empty leaves)."""
  dtype = compute_dtype(tree)
  return functools.reduce(
      jnp.maximum,
      (jnp.max(jnp.abs(x), initial=0.0).astype(dtype) for x in jax.tree.leaves(tree)),
      jnp.zeros((), dtype))


def _sum_of_squares(tree, dtype):
  return sum((jnp.sum(jnp.square(x)).astype(dtype) for x in jax.tree.leaves(tree)),
             jnp.zeros((), dtype))


def norm(tree):
  """``‖tree‖₂``, accurate for entries anywhere in the dtype's range.

  ``√(Σ x²)`` in one pass when that sum is finite and at least √tiny (tiny the
  smallest normal number: ~1e-19 in float32), where subnormal squares could
  only matter for ~1e19 entries. Otherwise (entries below ~1e-19 or above
  ~1e19 in float32, whose squares under/overflow) ``m √(Σ (x/m)²)`` with
  ``m = max |x|``, whose sum of squares lies in ``[1, size]``.
  """
  dtype = compute_dtype(tree)
  squares = _sum_of_squares(tree, dtype)
  in_range = jnp.isfinite(squares) & (squares >= np.sqrt(jnp.finfo(dtype).tiny))

  def rescaled(_):
    big = max_abs(tree)
    return big * jnp.sqrt(_sum_of_squares(tree_divide(tree, big), dtype))

  return jax.lax.cond(in_range, lambda _: jnp.sqrt(squares), rescaled, None)


def normalize(tree):
  """``tree / ‖tree‖₂`` (0 at 0), accurate at any scale (see :func:`norm`)."""
  return tree_divide(tree, norm(tree))
