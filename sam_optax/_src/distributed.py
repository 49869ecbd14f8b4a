"""Mapped axes and groups of examples: what m-sharpness needs from JAX.

m-sharpness gives every group of ``m`` examples its own perturbation
:math:`\\varepsilon_k = \\rho\\, \\hat g_k` and steps along
:math:`\\operatorname{mean}_k \\nabla L_k(w + \\varepsilon_k)`. A group can be

* a device's shard of the batch (``axis_name=``, under ``jax.pmap`` or
  ``jax.shard_map``): each device perturbs with its own, un-reduced gradient
  and only the perturbed gradient is averaged, in one all-reduce;
* a slice of ``m`` examples inside one device (``m=``): the groups are
  vectorized with ``jax.vmap``, or run one at a time (``group_loop=``);
* both at once (``axis_name=`` and ``m=``);
* the whole global batch (neither): plain SAM, also when the batch is sharded
  over devices with ``NamedSharding`` under ``jax.jit``.

A :class:`Placement` owns that choice for the core: it maps the perturbed
gradient over the perturbations and reduces the result once.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sam_optax._src import checks
from sam_optax._src import messages
from sam_optax._src import groups

# The placement of the `update` whose `loss_fn` is being traced, if any.
_LOSS_CALL: contextvars.ContextVar = contextvars.ContextVar(
    "sam_optax_loss_call", default=None)


def current_loss_call() -> Optional["Placement"]:
  """How the enclosing ``update`` is calling ``loss_fn``, for adapters to read.

  An adapter's loss function (the Flax train states, say) may need to know
  whether it runs once per group of examples (``m``), where there is no single
  perturbed pass. The core declares its :class:`Placement` at trace time
  around every call of ``loss_fn`` inside ``update``; outside one this is
  ``None``.
  """
  return _LOSS_CALL.get()


def _axis_names(axis_name):
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def axis_is_bound(axis_name) -> bool:
  """Whether every named axis is bound by an enclosing pmap/shard_map."""
  try:
    for a in _axis_names(axis_name):
      jax.lax.axis_size(a)
  except NameError:
    return False
  return True


def _varying_axes(x) -> frozenset:
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset() if mat is None else frozenset(mat.varying)


def _tracks_varying(axis) -> bool:
  """Whether JAX tracks device-variance over ``axis`` (shard_map, check_vma)."""
  return axis in _varying_axes(jax.lax.axis_index(axis))


def check_axis(name: str, axis_name, grads) -> None:
  """Raises clearly if the axis is unbound or the gradients are not per device.

  Under ``shard_map`` with ``check_vma=True`` JAX tracks which values vary
  across devices, so a gradient that was silently summed over devices is
  visible here as invariant and is rejected. The check fires only when *no*
  leaf varies: a leaf may legitimately be the same on every device (say the
  gradient of a weight-decay term added by hand). Under ``pmap`` (or
  ``check_vma=False``) that information does not exist and the check passes.

  Raises:
    NameError: if an axis of ``axis_name`` is not bound.
    ValueError: if the gradients do not vary over an axis that is tracked.
  """
  if not axis_is_bound(axis_name):
    raise NameError(messages.AXIS_NOT_BOUND.format(name=name, axis=axis_name))
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return
  for a in _axis_names(axis_name):
    if _tracks_varying(a) and not any(a in _varying_axes(x) for x in leaves):
      raise ValueError(messages.GRADS_NOT_PER_DEVICE.format(name=name, axis=a))


def all_reduce_mean(tree, axis_name):
  """Mean over ``axis_name`` of a whole pytree: one (variadic) all-reduce op."""
  return jax.lax.pmean(tree, axis_name)


def as_varying(tree, axis_name):
  """Casts the leaves of ``tree`` not yet varying over ``axis_name`` to varying.

  The identity where variance is not tracked (``pmap``, ``check_vma=False``).
  Assumes the axes are bound.
  """
  axes = _axis_names(axis_name)
  if not all(_tracks_varying(a) for a in axes):
    return tree

  def cast(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def per_device(params, axis_name):
  """Marks replicated params as varying over ``axis_name`` (for shard_map).

  Under ``jax.shard_map`` (default ``check_vma=True``), ``jax.grad`` with
  respect to replicated params returns the *sum* of all devices' gradients.
  Differentiating with respect to ``per_device(params, axis_name)`` instead
  gives each device the gradient of its own shard, which is what m-sharpness
  across devices (``axis_name=``) needs. Under ``pmap`` and
  ``shard_map(..., check_vma=False)`` the gradient is already per device and
  this is the identity.

  Example::

    def step(params, opt_state, batch):   # inside jax.shard_map over "d"
      loss_fn = lambda p: loss(p, batch)
      grads = jax.grad(loss_fn)(sam_optax.per_device(params, "d"))
      updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
      return optax.apply_updates(params, updates), opt_state

  Args:
    params: a pytree of replicated arrays.
    axis_name: the ``shard_map`` axis (or a tuple of axes).

  Returns:
    The same values, typed as varying over ``axis_name``.

  Raises:
    NameError: if ``axis_name`` is not bound (called outside the mapped
      function).
  """
  if not axis_is_bound(axis_name):
    raise NameError(messages.PER_DEVICE_NOT_BOUND.format(axis=axis_name))
  return as_varying(params, axis_name)


def reducible_state(old_state, new_state, axis_name) -> list[bool]:
  """Which leaves of a rule state, updated per device, must be averaged.

  ``rule.ascent`` runs on each device's own gradient, so a state it updates
  (an EMA of the gradient, say) differs between devices. Those leaves are
  averaged over ``axis_name`` in the step's one all-reduce, so that the state
  stays replicated. A leaf is averaged if it is floating point, was produced
  by ``ascent`` (it is not the very leaf that went in), and, where JAX tracks
  device-variance, varies over the axis.
  """
  old = jax.tree.leaves(old_state)
  new = jax.tree.leaves(new_state)
  if len(old) != len(new):
    raise ValueError(messages.RULE_STATE_STRUCTURE)
  axes = _axis_names(axis_name)
  tracked = all(_tracks_varying(a) for a in axes)

  def needs(o, n):
    if n is o or not jnp.issubdtype(jnp.result_type(n), jnp.inexact):
      return False
    return not tracked or any(a in _varying_axes(n) for a in axes)

  return [needs(o, n) for o, n in zip(old, new)]


# --- Placement: where the perturbations live. ----------------------------------


class Perturbed(NamedTuple):
  """The second pass, averaged over the perturbations of this device.

  Attributes:
    loss: ``L(w + ε)`` (float32).
    grads: ``∇L(w + ε)``, like params.
    eps_norm: ``‖ε‖₂`` (float32).
    rule_state: the rule state after ``ascent``.
    reduce: per rule-state leaf, whether it must be averaged over devices.
  """

  loss: Any
  grads: Any
  eps_norm: Any
  rule_state: Any
  reduce: tuple


class Placement(NamedTuple):
  """One batch, per device (``axis_name``), per group (``m``), or both.

  Attributes:
    name: the public name of the transform (for messages).
    axis_name: the mapped axis of per-device perturbations, or ``None``.
    m: examples per in-device perturbation, or ``None``.
    group_loop: how the in-device groups run.
  """

  name: str
  axis_name: Any = None
  m: Optional[int] = None
  group_loop: str = "vmap"

  def check_call(self, grads, params, batch, group_grads) -> None:
    """The parts of an ``update`` call that the placement needs."""
    if self.axis_name is not None:
      check_axis(self.name, self.axis_name, grads)
    b = None if self.m is None else checks.batch_size(self.name, batch, self.m)
    checks.check_group_grads(self.name, group_grads, params, b, self.m)

  def declare(self, loss_fn: Callable) -> Callable:
    """``loss_fn`` declaring this placement while it runs (see
    :func:`current_loss_call`)."""

    def declared(*args):
      token = _LOSS_CALL.set(self)
      try:
        return loss_fn(*args)
      finally:
        _LOSS_CALL.reset(token)

    return declared

  def mean(self, tree):
    """Mean over devices (one all-reduce op); the identity without ``axis_name``."""
    return tree if self.axis_name is None else all_reduce_mean(tree, self.axis_name)

  def varying(self, tree):
    """``tree`` typed per device (the identity without ``axis_name``)."""
    return tree if self.axis_name is None else as_varying(tree, self.axis_name)

  def map(self, perturbed_grad, grads, params, loss, batch, group_grads,
          rule_state) -> Perturbed:
    """``perturbed_grad(g, chunk, rule_state)`` over this device's perturbations.

    ``perturbed_grad`` returns ``(loss, ∇L(w+ε), ‖ε‖, rule_state)`` for one
    perturbation; with ``m`` it runs once per group (the rule state is then
    unchanged: rules with state do not take ``m``), and the outputs are
    averaged over the groups.
    """
    if self.m is None:
      loss_p, g_p, eps_norm, new_state = perturbed_grad(grads, None, rule_state)
      reduce = (() if self.axis_name is None else
                tuple(reducible_state(rule_state, new_state, self.axis_name)))
      return Perturbed(loss_p, g_p, eps_norm, new_state, reduce)
    chunks = groups.split_batch(self.name, batch, self.m)
    if group_grads is None:
      # Not supplied (see `group_value_and_grad`): one extra pass, fused with
      # the perturbed one group by group (the ascent gradient, ε, ∇L(w+ε) and
      # the accumulation), so that 'scan' holds one group's buffers at a time
      # instead of b/m per-group gradients.
      w = self.varying(params)
      grad = jax.grad(lambda p, c: loss(p, c)[0])

      def one_group(chunk):
        return perturbed_grad(grad(w, chunk), chunk, rule_state)[:3]

      xs = chunks
    else:

      def one_group(xs):
        return perturbed_grad(*xs, rule_state)[:3]

      xs = (group_grads, chunks)
    loss_p, g_p, eps_norm = groups.mean_over_groups(
        one_group, xs, self.group_loop, self.varying)
    return Perturbed(loss_p, g_p, eps_norm, rule_state, ())

  def reduce_once(self, payload, perturbed: Perturbed):
    """Averages ``payload`` and the per-device rule state: one all-reduce op.

    Returns ``(payload, rule_state)``; the identity without ``axis_name``.
    """
    if self.axis_name is None:
      return payload, perturbed.rule_state
    leaves, treedef = jax.tree.flatten(perturbed.rule_state)
    flags = perturbed.reduce or (False,) * len(leaves)
    to_reduce = [x for x, r in zip(leaves, flags) if r]
    payload, to_reduce = self.mean((payload, to_reduce))
    it = iter(to_reduce)
    rule_state = jax.tree.unflatten(treedef, [
        next(it) if r else x for x, r in zip(leaves, flags)])
    return payload, rule_state
