"""The one machinery behind every sharpness-aware transform.

``perturb → re-evaluate → reduce → combine``: read ρ, ask the rule for the
ascent direction, evaluate the user's ``loss_fn`` gradient at ``w + ε``,
all-reduce it once across devices (``axis_name``), let the rule form the final
direction, record :class:`~sam_optax.SAMInfo`. The perturbed params never leave
``update``: the next member of the chain (the base optimizer) sees the
unperturbed params.

This is the only module that calls ``loss_fn`` or a collective.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import distributed
from sam_optax._src import numerics

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def resolve_rho(rho: ScalarOrSchedule, count) -> jax.Array:
  """ρ at step ``count`` as a float32 scalar, clamped at 0 (NaN → 0)."""
  value = rho(count) if callable(rho) else rho
  value = jnp.asarray(value, jnp.float32)
  return jnp.where(value > 0, value, 0.0)


def _apply_rho_scale(eps, scale_tree):
  if scale_tree is None:
    return eps
  return jax.tree.map(
      lambda e, s: (e * jnp.asarray(s, jnp.float32)).astype(e.dtype), eps, scale_tree)


def _apply_mask(tree, mask_tree):
  if mask_tree is None:
    return tree
  return jax.tree.map(lambda x, keep: x if keep else jnp.zeros_like(x), tree, mask_tree)


def _default_combine(grads, perturbed_grads, rule_state, params):
  del grads, params
  return perturbed_grads, rule_state


def _default_skip(grads, rule_state, params):
  del params
  return grads, rule_state


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

  Args:
    rule: the method (how ε is chosen and how the direction is formed).
    rho: radius ρ ≥ 0, a float or an optax schedule of the step count
      (clamped at 0 at run time).
    name: the public name, used in error messages.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: a ``pmap``/``shard_map`` axis. Each device perturbs with its own
      gradient; only ``∇L(w+ε)`` (with the step's statistics, and any rule
      state that ``ascent`` updated) is all-reduced, in one all-reduce op.
      Under ``shard_map`` the incoming gradient must be per device
      (see :func:`sam_optax.per_device`); the outputs are replicated.
      Leave it ``None`` under plain ``jax.jit``, also with a batch sharded
      over devices (``NamedSharding``): one ε for the global batch, that is
      plain SAM (m = global batch).
    m: examples per perturbation inside one device; ``update`` then needs
      ``batch=`` and calls ``loss_fn(params, chunk)`` on every group of ``m``
      (as ``group_loop`` says). Pass the per-group gradients from
      :func:`sam_optax.group_value_and_grad` as ``group_grads=`` to keep the
      step at two passes; without them ``update`` computes them (a third
      pass). Memory: ``b / m`` params-sized buffers (the perturbed copies;
      one with ``group_loop='scan'``).
    mask: a pytree of bools like params, or ``params -> pytree``; only leaves
      marked True are perturbed (ε is normalized over them alone).
    track_cosine: record ``cos(g, ∇L(w+ε))`` in :class:`SAMInfo`. Off by
      default: it keeps ``g`` alive through the second pass, one params-sized
      buffer of extra memory; when off, ``info.cosine`` is ``nan``.
    rho_scale: per-leaf ρ: a pytree of numbers ≥ 0 like params (or
      ``params -> pytree``); leaf ``l`` is perturbed by ``ρ · s_l · d_l``
      where ``d`` is the rule's unit direction (over the ``mask``).
    group_loop: with ``m``, how the second pass runs over the groups:
      ``'vmap'`` (one vectorized pass; ``b / m`` perturbed copies alive),
      ``'scan'`` (one group at a time in a loop; one perturbed copy alive) or
      ``'unroll'`` (one group at a time, unrolled). The same math; see
      :func:`sam_optax.group_value_and_grad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  checks.check_rho(name, rho)
  checks.check_rho_scale(name, rho_scale)
  checks.check_placement(name, axis_name=axis_name, m=m, group_loop=group_loop,
                         supports_groups=rule.supports_groups)

  loss_call = distributed.LossCall(name, m, group_loop, axis_name)
  combine = rule.combine or _default_combine
  skip = rule.skip or _default_skip

  def init_fn(params):
    checks.check_float_params(name, params)
    return base.SharpnessAwareState(
        count=jnp.zeros([], jnp.int32),
        rule_state=rule.init(params),
        info=base.SAMInfo.empty(),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, value=None,
                batch=None, group_grads=None, **extra_args):
    del extra_args
    checks.check_update_call(name, updates=updates, params=params,
                             loss_fn=loss_fn, has_aux=has_aux, m=m)
    if axis_name is not None:
      distributed.check_axis(name, axis_name, updates)
    b = None if m is None else checks.batch_size(name, batch, m)
    checks.check_group_grads(name, group_grads, params, b, m)
    f = distributed.declared(checks.checked_loss(loss_fn, has_aux, name),
                             loss_call)
    mask_tree = checks.resolve_leafwise(name, "mask", mask, params, "one bool")
    scale_tree = checks.resolve_leafwise(name, "rho_scale", rho_scale, params,
                                         "one number")
    rho_t = resolve_rho(rho, state.count)
    grads = updates
    value_f32 = jnp.full((), jnp.nan, jnp.float32) if value is None else (
        jnp.asarray(value, jnp.float32))

    def perturbed_grad(g, chunk, rule_state):
      """One perturbation: (loss at w+ε, ∇ at w+ε, ‖ε‖, rule_state)."""
      g_scoped = _apply_mask(g, mask_tree)
      d, rule_state = rule.ascent(g_scoped, rule_state, params)
      eps = numerics.tree_scale(_apply_mask(d, mask_tree), rho_t)
      eps = _apply_rho_scale(eps, scale_tree)
      args = () if chunk is None else (chunk,)
      w_eps = numerics.add_perturbation(params, eps)
      if axis_name is not None:
        # Differentiate w.r.t. per-device params even when ε happens to be
        # replicated: under shard_map, a gradient w.r.t. replicated params
        # would be summed over devices.
        w_eps = distributed.as_varying(w_eps, axis_name)
      (loss_p, _), g_p = jax.value_and_grad(f, has_aux=True)(w_eps, *args)
      g_p = numerics.cast_like(g_p, params)
      if rule.unit_norm and scale_tree is None:
        # ‖ε‖ = ρ‖d‖ = ρ (0 at g = 0): no extra pass over the params.
        eps_norm = jnp.where(numerics.tree_norm(g_scoped) > 0, rho_t, 0.0)
      else:
        eps_norm = numerics.tree_norm(eps)
      return jnp.asarray(loss_p, jnp.float32), g_p, eps_norm, rule_state

    def second_pass(rule_state):
      state_in, reduce_state = rule_state, []
      if m is None:
        loss_p, g_p, eps_norm, rule_state = perturbed_grad(grads, None, rule_state)
        if axis_name is not None:
          # State that `ascent` updated from this device's own gradient is
          # averaged in the same all-reduce, so that it stays replicated.
          reduce_state = distributed.reducible_state(state_in, rule_state, axis_name)
      else:
        chunks = distributed.split_batch(name, batch, m)
        g_groups = group_grads
        if g_groups is None:
          # Not supplied (see `group_value_and_grad`): one extra pass.
          w = params if axis_name is None else distributed.as_varying(params, axis_name)
          grad = jax.grad(lambda p, c: f(p, c)[0])
          g_groups = distributed.map_groups(
              lambda chunk: grad(w, chunk), chunks, group_loop)

        def one_group(xs):
          g_k, chunk = xs
          loss_k, g_p_k, eps_norm_k, _ = perturbed_grad(g_k, chunk, rule_state)
          return loss_k, g_p_k, eps_norm_k

        loss_p, g_p, eps_norm = distributed.mean_over_groups(
            one_group, (g_groups, chunks), group_loop, axis_name)
      g_norm = numerics.tree_norm(grads)
      dot = (numerics.tree_vdot(grads, g_p) if track_cosine
             else jnp.full((), jnp.nan, jnp.float32))
      if axis_name is not None and track_cosine:
        # Each device's own cosine, averaged below.
        dot = numerics.safe_divide(dot, g_norm * numerics.tree_norm(g_p))
      stats = (loss_p, eps_norm, g_norm, dot, value_f32)
      g_for_combine = grads
      if axis_name is not None:
        state_leaves, state_def = jax.tree.flatten(rule_state)
        to_reduce = [x for x, r in zip(state_leaves, reduce_state) if r]
        payload = (g_p, stats, grads if rule.combine_uses_grad else None,
                   to_reduce)
        # One all-reduce op for everything (checked on the compiled HLO).
        g_p, stats, reduced, to_reduce = distributed.all_reduce_mean(
            payload, axis_name)
        if rule.combine_uses_grad:
          g_for_combine = reduced
        if to_reduce:
          it = iter(to_reduce)
          rule_state = jax.tree.unflatten(state_def, [
              next(it) if r else x for x, r in zip(state_leaves, reduce_state)])
      loss_p, eps_norm, g_norm, dot, loss = stats
      direction, rule_state = combine(g_for_combine, g_p, rule_state, params)
      gp_norm = numerics.tree_norm(g_p)
      info = base.SAMInfo(
          loss=loss,
          perturbed_loss=loss_p,
          sharpness=loss_p - loss,
          grad_norm=g_norm,
          perturbation_norm=eps_norm,
          perturbed_grad_norm=gp_norm,
          cosine=(numerics.safe_divide(dot, g_norm * gp_norm)
                  if track_cosine and axis_name is None else dot),
          rho=rho_t,
      )
      return direction, rule_state, info

    def skipped_pass(rule_state):
      g, g_norm, loss = grads, numerics.tree_norm(grads), value_f32
      if axis_name is not None:
        g, g_norm, loss = distributed.all_reduce_mean((g, g_norm, loss), axis_name)
      direction, rule_state = skip(g, rule_state, params)
      info = base.SAMInfo.empty()._replace(grad_norm=g_norm, loss=loss, rho=rho_t)
      return direction, rule_state, info

    if rule.second_pass is None:
      direction, rule_state, info = second_pass(state.rule_state)
    else:
      direction, rule_state, info = jax.lax.cond(
          rule.second_pass(state.rule_state, state.count),
          second_pass, skipped_pass, state.rule_state)

    direction = numerics.cast_like(direction, updates)
    new_state = base.SharpnessAwareState(
        count=optax.safe_increment(state.count),
        rule_state=rule_state,
        info=info,
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
