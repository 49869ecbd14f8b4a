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
from sam_optax._src import messages
from sam_optax._src import core
from sam_optax._src import info as info_lib
from sam_optax._src import numerics


ScalarOrSchedule = core.ScalarOrSchedule
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
  """The MSAM transform; see :func:`msam` for the documentation."""
  checks.check_rho(name, rho)
  # ρ = 0 known at construction: hand back the base's update untouched (not
  # even `+ 0`), so that XLA compiles the step exactly as for the base alone.
  static_zero = (not callable(rho)
                 and isinstance(rho, (numbers.Real, np.generic, np.ndarray))
                 and float(np.asarray(rho)) == 0.0)

  def init_fn(params):
    checks.check_float_params(name, params)
    checks.check_rho_array(name, rho)  # a JAX array's ρ, once known
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
    checks.check_state_like(name, trace, updates if params is None else params)
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
    ValueError: if ``opt_state`` holds no MSAM state, or more than one, or if
      ``params`` do not have the tree and leaf shapes of its momentum.
  """
  found = info_lib.find_states(opt_state, MomentumSAMRuleState)
  if len(found) != 1:
    raise ValueError(messages.REMOVE_PERTURBATION_NOT_ONE.format(found=len(found)))
  (state,) = found
  detail = checks.tree_mismatch(params, state.trace, "params", "the state's")
  if detail is not None:
    raise ValueError(messages.REMOVE_PERTURBATION_MISMATCH.format(detail=detail))
  eps = _perturbation(state.trace, state.scale)
  return jax.tree.map(lambda w, e: (_f32(w) - _f32(e)).astype(w.dtype), params, eps)


def msam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.3,
    momentum: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM: SAM along the negative momentum, one gradient per step.

  MSAM perturbs the weights along the direction they are moving in (the
  negative momentum), which needs no extra gradient: the params this
  optimizer hands back are already the perturbed ones, :math:`\tilde w =
  w + \varepsilon`, and the gradient you compute at them is MSAM's gradient.
  With the momentum :math:`v` (``v ← μ v + g``, kept by MSAM itself):

  .. math::
    g_t = \nabla L(\tilde w_t), \quad v_{t+1} = \mu v_t + g_t, \quad
    w_{t+1} = w_t + \operatorname{base}(g_t), \quad
    \tilde w_{t+1} = w_{t+1} - \rho\, \frac{v_{t+1}}{\|v_{t+1}\|_2}.

  The base optimizer sees the unperturbed :math:`w_t` (for weight decay).
  With ``optax.sgd(lr, momentum=μ)`` and the same ``momentum=μ`` this is the
  paper's MSAM; with ``optax.adamw(lr, b1=β)`` and ``momentum=β`` it is the
  paper's AdamW-MSAM (the perturbation follows Adam's first moment).

  **Unperturbed params.** Evaluate, and finish training, with
  :func:`sam_optax.remove_perturbation`:
  ``params = sam_optax.remove_perturbation(params, opt_state)``.

  Args:
    base_optimizer: the optimizer that makes the step (typically
      ``optax.sgd(lr, momentum=0.9)``). MSAM turns gradients into the final
      params update, so it must wrap the whole chain (put gradient clipping
      or weight decay inside ``base_optimizer``), not sit first in it.
    rho: the radius ρ ≥ 0 (float or schedule). Default 0.3, the reference
      code's default; the paper's CIFAR and ImageNet runs use 3 (the
      momentum direction needs a much larger ρ than SAM's gradient
      direction). ``rho=0`` is exactly ``base_optimizer``.
    momentum: μ in [0, 1), the decay of MSAM's momentum; match the base
      optimizer's (``momentum`` of ``optax.sgd``, ``b1`` of ``optax.adamw``).
      Default 0.9.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state
    :class:`MomentumSAMState`). ``update(grads, state, params)`` takes the
    gradient at the params you hold and needs no ``loss_fn``; ``value=`` is
    recorded as ``info.perturbed_loss`` and passed on to the base.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.msam(optax.sgd(0.1, momentum=0.5), rho=0.1, momentum=0.5)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(sam_optax.remove_perturbation(w, state))))
    8.64E+00
    4.02E+00
    1.34E+00
    2.71E-01
    1.40E-02

  References:
    Becker et al., `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.

  .. note::
    MSAM has no ``axis_name``: its perturbation comes from the (replicated)
    momentum, not from a per-device gradient, so use it like any optax
    optimizer under data parallelism (average the gradients as usual). It
    keeps its own momentum buffer (one params-sized buffer beside the base
    optimizer's); the reference SGD version shares one buffer, and applies
    weight decay at the perturbed params.
  """
  name = "sam_optax.msam"
  checks.check_range(name, "momentum", momentum, high=1.0, high_open=True,
              hint=" Use the base optimizer's momentum, for example 0.9.")
  return momentum_sam(base_optimizer, rho, momentum, name=name)
