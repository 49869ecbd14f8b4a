"""Types shared by every sharpness-aware transform: the rule, the state, the info.

A *rule* says how one sharpness-aware method differs from plain SAM. The shared
machinery in :mod:`sam_optax._src.core` does everything else (read ρ, perturb,
call the user's loss, all-reduce, hand the direction on).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax.numpy as jnp
import optax

Params = Any
Updates = Any
RuleState = Any
LossFn = Callable[..., Any]


class SAMInfo(NamedTuple):
  """Per-step statistics of a sharpness-aware step, read from the state.

  All fields are ``float32`` scalars. A field that the step could not measure is
  ``nan`` (for example ``sharpness`` when ``update`` got no ``value=``, or the
  perturbed loss on a step that skipped the second pass).

  With ``axis_name`` (one perturbation per device) every field is the mean
  over devices of that device's own value, except ``perturbed_grad_norm``,
  the norm of the averaged ``∇L(w + ε)`` that the step uses; the fields are
  the same on every device. With ``m`` (groups inside a device),
  ``perturbed_loss`` and ``perturbation_norm`` are means over groups.

  Attributes:
    loss: the unperturbed loss ``L(w)`` passed as ``value=`` to ``update``
      (``nan`` if none was passed).
    perturbed_loss: ``L(w + ε)``, free from the second pass.
    sharpness: the sharpness gap ``L(w + ε) − L(w)`` (``nan`` without ``value=``).
    grad_norm: ``‖g‖₂`` of the incoming gradient.
    perturbation_norm: ``‖ε‖₂``.
    perturbed_grad_norm: ``‖∇L(w + ε)‖₂``.
    cosine: cosine between ``g`` and ``∇L(w + ε)`` (0 if either is 0); ``nan``
      unless the transform was made with ``track_cosine=True``.
    rho: the radius ρ used at this step (after clamping at 0).
  """

  loss: chex.Array
  perturbed_loss: chex.Array
  sharpness: chex.Array
  grad_norm: chex.Array
  perturbation_norm: chex.Array
  perturbed_grad_norm: chex.Array
  cosine: chex.Array
  rho: chex.Array

  @classmethod
  def empty(cls) -> "SAMInfo":
    nan = jnp.full((), jnp.nan, jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    return cls(
        loss=nan,
        perturbed_loss=nan,
        sharpness=nan,
        grad_norm=zero,
        perturbation_norm=zero,
        perturbed_grad_norm=zero,
        cosine=zero,
        rho=zero,
    )


class SharpnessAwareState(NamedTuple):
  """State of :func:`sam_optax.sharpness_aware` and of every variant block.

  Attributes:
    count: number of ``update`` calls so far (``int32``); drives ρ schedules.
    rule_state: whatever the method keeps between steps (empty for SAM; an EMA
      for VaSSO, the stored direction for LookSAM, ...).
    info: :class:`SAMInfo` of the last step.
  """

  count: chex.Array
  rule_state: RuleState
  info: SAMInfo


class PerturbationRule(NamedTuple):
  """How one sharpness-aware method chooses ε and forms the final direction.

  A rule is a tuple of pure functions, in the spirit of
  ``optax.GradientTransformation``. The shared machinery scales the ascent
  direction by ρ, evaluates the gradient at ``w + ε``, all-reduces it across
  devices, then calls ``combine``.

  Attributes:
    init: ``params -> rule_state``.
    ascent: ``(g, rule_state, params) -> (d, rule_state)``; the perturbation is
      ``ε = ρ d``, so ``d`` is the ascent direction for radius 1. Under
      ``axis_name`` it sees each device's own ``g``; the floating-point state
      leaves it returns anew are averaged over devices in the step's one
      all-reduce, so that the state stays replicated.
    combine: ``(g, g_perturbed, rule_state, params) -> (direction, rule_state)``;
      the default returns ``g_perturbed`` (plain SAM).
    second_pass: optional ``(rule_state, count) -> bool`` scalar. When it is
      false, the step skips the perturbed gradient and returns
      ``skip(g, rule_state, params)`` instead (one compiled program for both).
    skip: ``(g, rule_state, params) -> (direction, rule_state)``; used only with
      ``second_pass``. Defaults to returning ``g``.
    combine_uses_grad: whether ``combine`` reads ``g``. Under ``axis_name`` the
      machinery then all-reduces ``g`` together with ``∇L(w+ε)`` (still a single
      all-reduce op).
    supports_groups: whether the rule may be used with in-device m-sharpness
      (``m=``), where ``ascent`` runs once per group of examples.
    unit_norm: whether ``ascent`` always returns a direction of 2-norm 1 (0 at
      a zero gradient). The machinery then records ``‖ε‖ = ρ`` without another
      pass over the params.
  """

  init: Callable[[Params], RuleState]
  ascent: Callable[..., tuple[Updates, RuleState]]
  combine: Optional[Callable[..., tuple[Updates, RuleState]]] = None
  second_pass: Optional[Callable[..., chex.Array]] = None
  skip: Optional[Callable[..., tuple[Updates, RuleState]]] = None
  combine_uses_grad: bool = False
  supports_groups: bool = True
  unit_norm: bool = False


def empty_init(params):
  """``init`` of a rule that keeps no state between steps."""
  del params
  return optax.EmptyState()
