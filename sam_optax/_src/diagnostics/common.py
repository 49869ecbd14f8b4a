"""What the diagnostics share: their public names, checked inputs, f32 trees."""

from __future__ import annotations

import jax

from sam_optax._src import checks
from sam_optax._src.diagnostics import checks as diag_checks
from sam_optax._src import numerics

PREFIX = "sam_optax.diagnostics."


def to_f32(tree):
  """Casts every leaf to (at least) float32: curvature is measured in f32."""
  return jax.tree.map(numerics.f32, tree)


def prepare(name: str, loss_fn, params, has_aux: bool):
  """``(scalar loss, f32 params)``: the loss checked, its aux dropped."""
  checks.check_float_params(name, params)
  if not jax.tree.leaves(params):
    raise ValueError(diag_checks.NO_PARAMS.format(name=name))
  checked = checks.checked_loss(loss_fn, has_aux, name)
  return (lambda *args: checked(*args)[0]), to_f32(params)


def axpy(a, x, y):
  """``a x + y`` on trees."""
  return jax.tree.map(lambda u, v: a * u + v, x, y)
