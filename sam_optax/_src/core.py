"""The one machinery behind every sharpness-aware transform.

An ``update`` is six steps: check the call → resolve ρ → map the perturbed
gradient over the placement (:class:`~sam_optax._src.distributed.Placement`:
one batch, per device, per group, or both) → reduce once → let the rule
combine → record :class:`~sam_optax.SAMInfo`. The rule
(:class:`~sam_optax.PerturbationRule`) says how ε is chosen and how the final
direction is formed; the scope (:class:`~sam_optax._src.scoped.Scope`) which
leaves are perturbed and how far. The perturbed params never leave
``update``: the next member of the chain (the base optimizer) sees the
unperturbed params.

This is the only module that calls ``loss_fn``; the placement owns the
collectives.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import distributed
from sam_optax._src import numerics
from sam_optax._src import scoped

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class Options(NamedTuple):
  """The options every sharpness-aware block takes (see :func:`sam_optax.sam`)."""

  has_aux: bool = False
  axis_name: Any = None
  m: Optional[int] = None
  group_loop: str = "vmap"
  mask: Any = None
  track_cosine: bool = False
  rho_scale: Any = None


def block(rule: base.PerturbationRule, rho, name: str, options: Options):
  """:func:`sharpness_aware_transform` of ``rule`` with a method's options."""
  return sharpness_aware_transform(rule, rho, name=name, **options._asdict())


# Keyword arguments of a block's `update` that are the block's own.
_OWN_ARGS = ("loss_fn", "batch", "group_grads")


def with_base(sharpness_aware_block, base_optimizer):
  """``optax.chain(block, base_optimizer)``, the base without the block's args.

  The base optimizer receives every other keyword argument (``value=``, and
  ``grad=``/``value_fn=`` for ``optax.lbfgs``) but not ``loss_fn``, ``batch``
  or ``group_grads``, which optimizers that check their keyword arguments
  (L-BFGS's line search) reject. The state is the chain's.
  """
  base_optimizer = optax.with_extra_args_support(base_optimizer)

  def update_fn(updates, state, params=None, **extra_args):
    extra_args = {k: v for k, v in extra_args.items() if k not in _OWN_ARGS}
    return base_optimizer.update(updates, state, params, **extra_args)

  return optax.chain(sharpness_aware_block, optax.GradientTransformationExtraArgs(
      base_optimizer.init, update_fn))


def resolve_rho(rho: ScalarOrSchedule, count) -> jax.Array:
  """ρ at step ``count`` as a float32 scalar, clamped at 0 (NaN → 0)."""
  value = rho(count) if callable(rho) else rho
  value = jnp.asarray(value, jnp.float32)
  return jnp.where(value > 0, value, 0.0)


def _default_combine(grads, perturbed_grads, rule_state, params):
  del grads, params
  return perturbed_grads, rule_state


def _default_skip(grads, rule_state, params):
  del params
  return grads, rule_state


class _Step(NamedTuple):
  """What one ``update`` call knows once it is checked."""

  grads: Any
  params: Any
  loss: Any          # the checked, declared loss_fn: (params, *chunk) -> (loss, aux)
  batch: Any
  group_grads: Any
  value: jax.Array   # L(w) as float32, nan if not given
  rho: jax.Array
  scope: scoped.Scope


class _Stats(NamedTuple):
  """Scalars averaged over devices in the step's one all-reduce."""

  perturbed_loss: jax.Array
  eps_norm: jax.Array
  grad_norm: jax.Array
  cosine: jax.Array
  loss: jax.Array


class _Machinery(NamedTuple):
  """A transform's fixed parts: the rule, where it perturbs, what it records."""

  rule: base.PerturbationRule
  placement: distributed.Placement
  track_cosine: bool

  def perturbed_grad(self, step: _Step, g, chunk, rule_state):
    """One perturbation: ``(L(w+ε), ∇L(w+ε), ‖ε‖, rule_state)``."""
    g_scoped = step.scope.restrict(g)
    d, rule_state = self.rule.ascent(g_scoped, rule_state, step.params)
    eps = step.scope.perturbation(d, step.rho)
    # Differentiate w.r.t. per-device params even when ε happens to be
    # replicated: under shard_map, a gradient w.r.t. replicated params would
    # be summed over devices.
    w_eps = self.placement.varying(numerics.add_perturbation(step.params, eps))
    args = () if chunk is None else (chunk,)
    (loss_p, _), g_p = jax.value_and_grad(step.loss, has_aux=True)(w_eps, *args)
    eps_norm = step.scope.perturbation_norm(eps, g_scoped, step.rho,
                                            self.rule.unit_norm)
    return (jnp.asarray(loss_p, jnp.float32),
            numerics.cast_like(g_p, step.params), eps_norm, rule_state)

  def second_pass(self, step: _Step, rule_state):
    """Map over the placement → reduce once → combine → record the info."""
    rule, grads = self.rule, step.grads
    out = self.placement.map(functools.partial(self.perturbed_grad, step),
                             grads, step.params, step.loss, step.batch,
                             step.group_grads, rule_state)
    g_norm = numerics.tree_norm(grads)
    cosine = (numerics.tree_cosine(grads, out.grads) if self.track_cosine
              else jnp.full((), jnp.nan, jnp.float32))
    stats = _Stats(out.loss, out.eps_norm, g_norm, cosine, step.value)
    payload = (out.grads, stats, grads if rule.combine_uses_grad else None)
    (g_p, stats, g_reduced), rule_state = self.placement.reduce_once(payload, out)
    g_for_combine = grads if g_reduced is None else g_reduced
    direction, rule_state = (rule.combine or _default_combine)(
        g_for_combine, g_p, rule_state, step.params)
    info = base.SAMInfo(
        loss=stats.loss, perturbed_loss=stats.perturbed_loss,
        sharpness=stats.perturbed_loss - stats.loss, grad_norm=stats.grad_norm,
        perturbation_norm=stats.eps_norm,
        perturbed_grad_norm=numerics.tree_norm(g_p), cosine=stats.cosine,
        rho=step.rho)
    return direction, rule_state, info

  def skipped_pass(self, step: _Step, rule_state):
    """A step without the second pass (LookSAM, interval SAM off-steps)."""
    g, g_norm, loss = self.placement.mean(
        (step.grads, numerics.tree_norm(step.grads), step.value))
    direction, rule_state = (self.rule.skip or _default_skip)(
        g, rule_state, step.params)
    info = base.SAMInfo.empty()._replace(grad_norm=g_norm, loss=loss,
                                         rho=step.rho)
    return direction, rule_state, info


def sharpness_aware_transform(
    rule: base.PerturbationRule,
    rho: ScalarOrSchedule,
    *,
    name: str,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
    group_loop: str = "vmap",
) -> optax.GradientTransformationExtraArgs:
  """Builds a sharpness-aware chain block from a :class:`PerturbationRule`.

  Every public method is this machinery with its own rule; a new method needs
  only a rule (see :class:`PerturbationRule`).

  Args:
    rule: the method (how ε is chosen and how the direction is formed).
    rho: radius ρ ≥ 0, a float or an optax schedule of the step count
      (clamped at 0 at run time).
    name: the public name, used in error messages.
    has_aux, axis_name, m, mask, track_cosine, rho_scale, group_loop: as in
      :func:`sam_optax.sam`. With ``axis_name`` only ``∇L(w+ε)``, the step's
      statistics, the clean gradient if ``rule.combine_uses_grad``, and the
      rule-state leaves that ``ascent`` updated are all-reduced, in one
      all-reduce op.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=`` (required), ``value=``, ``batch=`` and ``group_grads=``.
  """
  checks.check_rho(name, rho)
  checks.check_rho_scale(name, rho_scale)
  checks.check_placement(name, axis_name=axis_name, m=m, group_loop=group_loop,
                         supports_groups=rule.supports_groups)
  placement = distributed.Placement(name, axis_name, m, group_loop)
  machinery = _Machinery(rule, placement, track_cosine)

  def init_fn(params):
    checks.check_float_params(name, params)
    checks.check_rho_array(name, rho)  # a JAX array's ρ, once known
    return base.SharpnessAwareState(
        count=jnp.zeros([], jnp.int32), rule_state=rule.init(params),
        info=base.SAMInfo.empty())

  def update_fn(updates, state, params=None, *, loss_fn=None, value=None,
                batch=None, group_grads=None, **extra_args):
    del extra_args
    # 1. Check the call.
    checks.check_update_call(name, updates=updates, params=params,
                             loss_fn=loss_fn, has_aux=has_aux, m=m, value=value)
    checks.check_state_matches(name, rule.init, state.rule_state, params)
    placement.check_call(updates, params, batch, group_grads)
    step = _Step(
        grads=updates, params=params,
        loss=placement.declare(checks.checked_loss(loss_fn, has_aux, name)),
        batch=batch, group_grads=group_grads,
        value=(jnp.full((), jnp.nan, jnp.float32) if value is None
               else jnp.asarray(value, jnp.float32)),
        rho=resolve_rho(rho, state.count),  # 2. ρ.
        scope=scoped.Scope.resolve(name, params, mask=mask,
                                   rho_scale=rho_scale))
    # 3.–6. Map over the placement, reduce once, combine, record the info.
    second_pass = functools.partial(machinery.second_pass, step)
    if rule.second_pass is None:
      direction, rule_state, info = second_pass(state.rule_state)
    else:
      direction, rule_state, info = jax.lax.cond(
          rule.second_pass(state.rule_state, state.count), second_pass,
          functools.partial(machinery.skipped_pass, step), state.rule_state)
    return numerics.cast_like(direction, updates), base.SharpnessAwareState(
        count=optax.safe_increment(state.count), rule_state=rule_state,
        info=info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
