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
from sam_optax._src import distributed
from sam_optax._src import numerics

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def check_rho(name: str, rho: ScalarOrSchedule) -> None:
  if callable(rho) or not isinstance(rho, (numbers.Real, np.ndarray, np.generic)):
    return
  v = float(np.asarray(rho))
  if isinstance(rho, bool) or not math.isfinite(v) or v < 0:
    raise ValueError(base.BAD_RHO.format(name=name, rho=rho))


def resolve_rho(rho: ScalarOrSchedule, count) -> jax.Array:
  """ρ at step ``count`` as a float32 scalar, clamped at 0 (NaN → 0)."""
  value = rho(count) if callable(rho) else rho
  value = jnp.asarray(value, jnp.float32)
  return jnp.where(value > 0, value, 0.0)


def _checked_loss(loss_fn: Callable, has_aux: bool, name: str) -> Callable:
  """Wraps ``loss_fn`` so that it returns ``(loss, aux)`` or raises clearly."""

  def wrapped(*args):
    out = loss_fn(*args)
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = (f"a {type(out).__name__} of length {len(out)}"
               if isinstance(out, (tuple, list)) else
               f"a single value of shape {jnp.shape(out)}")
        raise TypeError(base.LOSS_NOT_AUX_PAIR.format(name=name, got=got))
      loss, aux = out
    else:
      if isinstance(out, (tuple, list)):
        raise TypeError(base.LOSS_RETURNED_TUPLE.format(
            name=name, kind=type(out).__name__, n=len(out)))
      loss, aux = out, None
    loss = jnp.asarray(loss)
    if loss.shape != ():
      raise ValueError(base.LOSS_NOT_SCALAR.format(name=name, shape=loss.shape))
    if not jnp.issubdtype(loss.dtype, jnp.floating):
      raise TypeError(base.LOSS_NOT_FLOAT.format(name=name, dtype=loss.dtype))
    return loss, aux

  return wrapped


def check_float_params(name: str, params) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = jnp.asarray(leaf).dtype
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(base.NON_FLOAT_PARAMS.format(
          name=name, path=jax.tree_util.keystr(path) or "<root>", dtype=dtype))


def _resolve_leafwise(name, arg, value, params, what):
  """``value`` (a pytree like params, or ``params -> pytree``) as a pytree."""
  if value is None:
    return None
  tree = value(params) if callable(value) else value
  try:
    jax.tree.map(lambda _, __: None, params, tree)
  except ValueError as e:
    raise ValueError(
        f"`{name}(...)`, argument `{arg}`: the {arg} tree does not match the "
        f"params tree (params: {jax.tree.structure(params)}; {arg}: "
        f"{jax.tree.structure(tree)}). Give {what} per params leaf, or a "
        f"callable `params -> {arg}`.") from e
  return tree


def _resolve_mask(mask, params, name="mask"):
  return _resolve_leafwise(name, "mask", mask, params, "one bool")


def check_rho_scale(name: str, rho_scale) -> None:
  """Raises for concrete negative or non-finite per-leaf ρ multipliers."""
  if rho_scale is None or callable(rho_scale):
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(rho_scale):
    if not isinstance(leaf, (numbers.Real, np.ndarray, np.generic)):
      continue  # arrays (possibly traced) are used as given
    v = np.asarray(leaf, np.float64)
    if isinstance(leaf, bool) or not np.all(np.isfinite(v)) or np.any(v < 0):
      raise ValueError(
          f"`{name}(..., rho_scale=...)`: leaf {jax.tree_util.keystr(path)} is "
          f"{leaf!r}; per-leaf ρ multipliers must be finite numbers ≥ 0 "
          "(0 leaves that leaf unperturbed, 1 keeps ρ).")


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
  check_rho(name, rho)
  check_rho_scale(name, rho_scale)
  if isinstance(m, jax.Array):
    raise TypeError(base.STATIC_ARG.format(name=name, arg="m"))
  if m is not None:
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
      raise ValueError(
          f"`{name}(m={m!r})`: m is the number of examples per perturbation "
          "and must be a positive integer (or None for one perturbation per "
          "batch).")
    if not rule.supports_groups:
      raise ValueError(
          f"`{name}(m={m})`: this method keeps state across steps and cannot "
          "give each group of examples its own perturbation. Drop `m`, or use "
          "`axis_name` for one perturbation per device.")
  distributed.check_group_loop(name, group_loop)
  if m is None and group_loop != "vmap":
    raise ValueError(
        f"`{name}(group_loop={group_loop!r})`: group_loop says how the groups "
        "of m examples run (in-device m-sharpness), but `m` is not set, so "
        "there are no groups. Set `m=` (and pass `batch=` to `update`), or "
        "drop `group_loop`.")
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(
        f"`{name}(axis_name={axis_name!r})`: expected a mapped axis name (a "
        "str, or a tuple of str), as given to `jax.pmap` or `jax.shard_map`.")

  combine = rule.combine or _default_combine
  skip = rule.skip or _default_skip

  def init_fn(params):
    check_float_params(name, params)
    return base.SharpnessAwareState(
        count=jnp.zeros([], jnp.int32),
        rule_state=rule.init(params),
        info=base.SAMInfo.empty(),
    )

  def update_fn(updates, state, params=None, *, loss_fn=None, value=None,
                batch=None, group_grads=None, **extra_args):
    del extra_args
    if loss_fn is None:
      hint = ("; with `has_aux=True` it returns `(loss, aux)`" if has_aux else "")
      if m is not None:
        hint += (" (with `m=`, `loss_fn(params, chunk)` and `batch=` are "
                 "needed)")
      raise TypeError(base.MISSING_LOSS_FN.format(name=name, aux_hint=hint))
    if params is None:
      raise ValueError(base.MISSING_PARAMS.format(name=name))
    if any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
      raise ValueError(base.INSIDE_OPTAX_MASKED.format(name=name))
    if jax.tree.structure(updates) != jax.tree.structure(params):
      raise ValueError(base.TREE_MISMATCH.format(
          name=name, updates=jax.tree.structure(updates),
          params=jax.tree.structure(params)))
    if axis_name is not None:
      distributed.check_axis(name, axis_name, updates)
    distributed.check_loss_fn_arity(name, loss_fn, m)
    if m is None and group_grads is not None:
      raise ValueError(distributed.GROUP_GRADS_WITHOUT_M.format(name=name))
    if m is not None:
      b = distributed.batch_size(name, batch, m)
      if group_grads is not None:
        distributed.check_group_grads(name, group_grads, params, b, m)
    f = _checked_loss(loss_fn, has_aux, name)
    mask_tree = _resolve_mask(mask, params, name)
    scale_tree = _resolve_leafwise(name, "rho_scale", rho_scale, params,
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
