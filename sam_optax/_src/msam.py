"""Momentum-SAM: perturb along the negative momentum, one gradient per step.

MSAM cannot be a :class:`~sam_optax.PerturbationRule` of the shared machinery:
its perturbation comes from the momentum, not from a fresh gradient, so no
second pass (and no ``loss_fn``) is needed. Instead the params the user holds
*are* the perturbed params ``w̃ = w + ε``; the gradient the user computes at
them is the sharpness-aware gradient, and each ``update`` moves from
``w̃_t`` to ``w̃_{t+1}`` in one step.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import core
from sam_optax._src import info as info_lib
from sam_optax._src import numerics


_f32 = numerics.f32


class MomentumSAMRuleState(NamedTuple):
  """MSAM's own state (the ``rule_state`` of its :class:`SharpnessAwareState`).

  Attributes:
    trace: the momentum ``v`` (``v ← μ v + g``), like params.
    scale: ``ρ/‖v‖`` of the perturbation currently applied to the params,
      ``ε = −scale · v`` (0 before the first step, or where ``v = 0``).
      Stored so that the next step need not recompute ``‖v‖``.
  """

  trace: chex.ArrayTree
  scale: chex.Array


class MomentumSAMState(NamedTuple):
  """State of :func:`sam_optax.msam`.

  Attributes:
    sam: the :class:`SharpnessAwareState` (step count, momentum, info).
    base: the base optimizer's state.
  """

  sam: base.SharpnessAwareState
  base: Any


def _norm(tree):
  # As dot products: on CPU, XLA fuses a plain sum of squares into the loops
  # that produce its input, which makes it several times slower.
  return jnp.sqrt(numerics.tree_vdot(tree, tree))


def _scale(trace, rho):
  """``ρ/‖v‖`` as float32 (exactly 0 at ``v = 0``)."""
  return jnp.asarray(rho, jnp.float32) * numerics.safe_divide(1.0, _norm(trace))


def _perturbation(trace, scale):
  """``ε = −scale · v`` in the dtypes of ``trace``."""
  return jax.tree.map(lambda v: (_f32(v) * -scale).astype(v.dtype), trace)


def momentum_sam(base_optimizer, rho, momentum, *, name: str):
  """The MSAM transform; see :func:`sam_optax.msam` for the documentation."""
  checks.check_rho(name, rho)
  # ρ = 0 known at construction: hand back the base's update untouched (not
  # even `+ 0`), so that XLA compiles the step exactly as for the base alone.
  static_zero = (not callable(rho)
                 and isinstance(rho, (numbers.Real, np.generic, np.ndarray))
                 and float(np.asarray(rho)) == 0.0)

  def init_fn(params):
    checks.check_float_params(name, params)
    rule_state = MomentumSAMRuleState(trace=optax.tree.zeros_like(params),
                                      scale=jnp.zeros([], jnp.float32))
    return MomentumSAMState(
        sam=base.SharpnessAwareState(count=jnp.zeros([], jnp.int32),
                                     rule_state=rule_state,
                                     info=base.SAMInfo.empty()),
        base=base_optimizer.init(params))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    sam_state = state.sam
    trace, old_scale = sam_state.rule_state
    eps_old = _perturbation(trace, old_scale)
    # The base optimizer sees the unperturbed params w = w̃ − ε.
    clean = None if params is None or static_zero else jax.tree.map(
        lambda w, e: (_f32(w) - _f32(e)).astype(w.dtype), params, eps_old)
    if static_zero:
      clean = params
    mu = jnp.asarray(momentum, jnp.float32)
    new_trace = jax.tree.map(
        lambda v, g: (mu * _f32(v) + _f32(g)).astype(v.dtype), trace, updates)
    if value is not None:
      extra_args["value"] = value
    base_updates, base_state = optax.with_extra_args_support(
        base_optimizer).update(updates, state.base, clean, **extra_args)
    rho_t = core.resolve_rho(rho, sam_state.count)
    if static_zero:
      new_scale = jnp.zeros([], jnp.float32)
      out = base_updates
    else:
      new_scale = _scale(new_trace, rho_t)
      # w̃_{t+1} − w̃_t = (w_{t+1} − w_t) + ε_{t+1} − ε_t, in one pass.
      out = jax.tree.map(
          lambda u, vn, vo: (_f32(u) - new_scale * _f32(vn)
                             + old_scale * _f32(vo)).astype(u.dtype),
          base_updates, new_trace, trace)
    g_norm = _norm(updates)
    nan = jnp.full((), jnp.nan, jnp.float32)
    info = base.SAMInfo(
        loss=nan,
        perturbed_loss=nan if value is None else jnp.asarray(value, jnp.float32),
        sharpness=nan,
        grad_norm=g_norm,
        perturbation_norm=sam_state.info.rho * jnp.sign(old_scale),
        perturbed_grad_norm=g_norm,
        cosine=nan,
        rho=rho_t,
    )
    new_sam = base.SharpnessAwareState(
        count=optax.safe_increment(sam_state.count),
        rule_state=MomentumSAMRuleState(trace=new_trace, scale=new_scale),
        info=info)
    return out, MomentumSAMState(sam=new_sam, base=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def remove_perturbation(params, opt_state):
  """Returns the unperturbed params ``w = w̃ − ε`` of an :func:`msam` run.

  :func:`sam_optax.msam` keeps the params it hands back perturbed along the
  negative momentum (``w̃ = w − ρ v/‖v‖``): that is where the next gradient
  must be taken. Call this at the end of training, or whenever you evaluate,
  to get the weights the method actually optimizes. It is exact (ε is
  recomputed from the momentum and the ``ρ/‖v‖`` stored in the state) and cheap.

  Example::

    params = sam_optax.remove_perturbation(params, opt_state)

  Args:
    params: the params as returned by the training loop (perturbed).
    opt_state: the optimizer state holding exactly one :func:`msam` block
      (wrappers such as ``inject_hyperparams`` or ``MultiSteps`` are fine).

  Returns:
    The unperturbed params, same tree and dtypes as ``params``.

  Raises:
    ValueError: if ``opt_state`` holds no MSAM state, or more than one.
  """
  found = info_lib.find_states(opt_state, MomentumSAMRuleState)
  if len(found) != 1:
    raise ValueError(checks.REMOVE_PERTURBATION_NOT_ONE.format(found=len(found)))
  (state,) = found
  eps = _perturbation(state.trace, state.scale)
  return jax.tree.map(lambda w, e: (_f32(w) - _f32(e)).astype(w.dtype), params, eps)
