"""SAM's own rule: ε along the gradient, normalized in a p-norm (or not: USAM)."""

from __future__ import annotations

import math

import jax


from sam_optax._src import base
from sam_optax._src import numerics


def normalized(p: float = 2.0, *, normalize: bool = True) -> base.PerturbationRule:
  """ε = ρ · sign(g)|g|^{q-1}/‖g‖_q^{q-1} (``normalize=True``) or ε = ρ g (USAM)."""

  init = base.empty_init

  if normalize:
    def ascent(grads, state, params):
      del params
      return numerics.dual_direction(grads, p), state
  else:
    def ascent(grads, state, params):
      del params
      return grads, state

  return base.PerturbationRule(init=init, ascent=ascent,
                               unit_norm=normalize and p == 2)


def sam_ascent(grads, state, params):
  """Plain SAM's ascent direction ``g/‖g‖₂`` (0 at ``g = 0``), for reuse."""
  del params
  return numerics.dual_direction(grads, 2.0), state


