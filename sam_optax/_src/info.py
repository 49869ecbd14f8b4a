"""Reading a sharpness-aware step's statistics out of any optimizer state."""

from __future__ import annotations

import jax

from sam_optax._src import base
from sam_optax._src import messages


def find_states(opt_state, state_type) -> list:
  """Every ``state_type`` node anywhere in ``opt_state`` (chains, wrappers)."""
  is_match = lambda x: isinstance(x, state_type)  # noqa: E731
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_match) if is_match(x)]


def get_info(opt_state) -> base.SAMInfo:
  """Returns the :class:`SAMInfo` of the sharpness-aware block in ``opt_state``.

  Works on the state of :func:`sam_optax.sam`, of any chain that contains
  :func:`sam_optax.sharpness_aware` (or a variant), through optax wrappers
  such as ``inject_hyperparams``, ``MultiSteps`` or ``apply_if_finite``, and
  on ``sam_optax.flax.SAMOptimizer(...).opt_state`` (the arrays are returned
  without their NNX variable wrappers).

  Example::

    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=loss)
    info = sam_optax.get_info(state)
    print(info.sharpness, info.perturbation_norm)

  Raises:
    ValueError: if the state holds no sharpness-aware block, or more than one.
  """
  found = find_states(opt_state, base.SharpnessAwareState)
  if len(found) != 1:
    raise ValueError(messages.GET_INFO_NOT_ONE.format(found=len(found)))
  # Wrappers around the arrays (e.g. the variables of an NNX optimizer's
  # state) flatten to the arrays themselves, one per field.
  fields = jax.tree.leaves(found[0].info)
  return base.SAMInfo(*fields)
