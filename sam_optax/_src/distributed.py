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
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sam_optax._src import checks

class LossCall(NamedTuple):
  """How the step is calling ``loss_fn`` right now, for adapters to read.

  An adapter's loss function (the Flax train states, say) may need to know
  whether it runs once per group of examples under ``jax.vmap``, where it
  cannot write to array references. The core declares it here, at trace time,
  around every call of ``loss_fn`` inside ``update``: read it with
  :func:`current_loss_call` (``None`` outside a sharpness-aware step).

  Attributes:
    name: the public name of the transform calling.
    m: examples per perturbation (``None``: one per batch or per device).
    group_loop: how the groups run (``'vmap'``, ``'scan'``, ``'unroll'``).
    axis_name: the mapped axis of per-device perturbations, or ``None``.
  """

  name: str
  m: Optional[int]
  group_loop: str
  axis_name: Any

  @property
  def vectorized_over_groups(self) -> bool:
    """Whether ``loss_fn`` is traced under ``jax.vmap`` over groups."""
    return self.m is not None and self.group_loop == "vmap"


_LOSS_CALL: contextvars.ContextVar = contextvars.ContextVar(
    "sam_optax_loss_call", default=None)


def current_loss_call() -> Optional[LossCall]:
  """The :class:`LossCall` of the enclosing ``update`` (``None`` outside one)."""
  return _LOSS_CALL.get()


def declared(fn: Callable, call: LossCall) -> Callable:
  """``fn`` that declares ``call`` (see :class:`LossCall`) while it runs."""

  def wrapped(*args):
    token = _LOSS_CALL.set(call)
    try:
      return fn(*args)
    finally:
      _LOSS_CALL.reset(token)

  return wrapped


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
    raise NameError(checks.AXIS_NOT_BOUND.format(name=name, axis=axis_name))
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return
  for a in _axis_names(axis_name):
    if _tracks_varying(a) and not any(a in _varying_axes(x) for x in leaves):
      raise ValueError(checks.GRADS_NOT_PER_DEVICE.format(name=name, axis=a))


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
    raise NameError(checks.PER_DEVICE_NOT_BOUND.format(axis=axis_name))
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
    raise ValueError(checks.RULE_STATE_STRUCTURE)
  axes = _axis_names(axis_name)
  tracked = all(_tracks_varying(a) for a in axes)

  def needs(o, n):
    if n is o or not jnp.issubdtype(jnp.result_type(n), jnp.inexact):
      return False
    return not tracked or any(a in _varying_axes(n) for a in axes)

  return [needs(o, n) for o, n in zip(old, new)]


# --- In-device groups (m=) -------------------------------------------------


def split_batch(name: str, batch, m: int):
  """Reshapes every leaf ``[b, ...]`` of ``batch`` to ``[b // m, m, ...]``."""
  b = checks.batch_size(name, batch, m)
  return jax.tree.map(
      lambda x: jnp.reshape(x, (b // m, m) + jnp.shape(x)[1:]), batch)


def map_groups(fn, xs, group_loop: str):
  """``fn`` on every slice of ``xs`` along the leading axis, outputs stacked.

  ``'vmap'`` vectorizes over the groups; ``'scan'`` and ``'unroll'`` run one
  group at a time (``jax.lax.scan``, rolled or fully unrolled).
  """
  if group_loop == "vmap":
    return jax.vmap(fn)(xs)
  _, ys = jax.lax.scan(lambda carry, x: (carry, fn(x)), None, xs,
                       unroll=group_loop == "unroll")
  return ys


def mean_over_groups(fn, xs, group_loop: str, axis_name=None):
  """The mean over groups of ``fn(x)`` for every slice ``x`` of ``xs``.

  With ``'vmap'`` every group's output is materialized and then averaged
  (:func:`group_mean`); with ``'scan'``/``'unroll'`` the outputs are summed
  into a float32 accumulator one group at a time, so only one group's output
  (its perturbed params and gradient, in the second pass) is alive at once.
  Outputs keep their dtype. ``axis_name``: the mapped axis the outputs vary
  over, if any (the accumulator is typed to match under ``shard_map``).
  """
  if group_loop == "vmap":
    return group_mean(jax.vmap(fn)(xs))
  k = jax.tree.leaves(xs)[0].shape[0]
  first = jax.tree.map(lambda x: x[0], xs)
  shapes = jax.eval_shape(fn, first)
  acc = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
  if axis_name is not None:
    acc = as_varying(acc, axis_name)

  def body(acc, x):
    out = fn(x)
    return jax.tree.map(lambda a, o: a + o.astype(jnp.float32), acc, out), None

  acc, _ = jax.lax.scan(body, acc, xs, unroll=group_loop == "unroll")
  return jax.tree.map(lambda a, s: (a / k).astype(s.dtype), acc, shapes)


def group_mean(tree):
  """Mean over the leading (group) axis of every leaf, in the leaf's dtype.

  Written as a contraction with a vector of ``1/K`` (at the highest matmul
  precision) rather than ``jnp.mean(x, axis=0)``: XLA's CPU backend runs a
  leading-axis reduction of a batched matmul's output several times slower
  than the matmul itself, and the contraction avoids it on every backend.
  """

  def mean(x):
    k = jnp.shape(x)[0]
    weights = jnp.full((k,), 1.0 / k, jnp.result_type(x))
    return jnp.tensordot(weights, x, axes=1,
                         precision=jax.lax.Precision.HIGHEST).astype(x.dtype)

  return jax.tree.map(mean, tree)


def group_value_and_grad(
    loss_fn: Callable[..., Any],
    m: int,
    *,
    has_aux: bool = False,
    group_loop: str = "vmap",
) -> Callable[..., tuple[Any, Any, Any]]:
  r"""Loss, gradient and per-group gradients for in-device m-sharpness, in one pass.

  Splits the batch into groups of ``m`` examples and evaluates
  ``jax.value_and_grad(loss_fn)`` on every group (by default at once,
  ``jax.vmap`` over groups with the params shared), so it costs one forward
  and backward pass over the batch, like ``jax.value_and_grad`` of the whole
  batch:

  .. math::
    g_k = \nabla_w L(w; B_k), \qquad g = \tfrac{1}{K}\textstyle\sum_k g_k,
    \qquad K = b / m.

  Hand ``g`` to ``update`` as the gradient and the ``g_k`` as
  ``group_grads=``: the sharpness-aware transform (created with the same
  ``m``) then only adds the perturbed pass, so a step costs two passes.
  Without ``group_grads=`` the transform recomputes the ``g_k`` itself, a
  third pass.

  For a ``loss_fn`` that averages over examples, ``g`` and the returned loss
  are those of the whole batch. Under ``jax.shard_map`` (with ``axis_name=``
  as well as ``m=``), call it on ``sam_optax.per_device(params, axis_name)``
  so that the gradients are the device's own.

  Args:
    loss_fn: ``loss_fn(params, chunk) -> loss`` (or ``(loss, aux)`` with
      ``has_aux=True``), where ``chunk`` is ``batch`` restricted to ``m``
      examples along the leading axis of every leaf.
    m: examples per perturbation, a positive integer dividing the batch size.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is then
      returned stacked over groups (leading axis ``b // m``).
    group_loop: how to run over the groups: ``'vmap'`` (default; one
      vectorized pass), ``'scan'`` (one group at a time in a
      ``jax.lax.scan``) or ``'unroll'`` (one group at a time, unrolled into
      the compiled program). The result is the same; see the note below.

  Returns:
    A function ``(params, batch) -> (value, grads, group_grads)``: ``value``
    is the mean loss over groups (``(loss, aux)`` with ``has_aux``),
    ``grads`` the mean gradient (params-like), ``group_grads`` the per-group
    gradients (params-like, leading axis ``b // m``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w, chunk):
    ...   x, y = chunk
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
    >>> batch = (x, x @ jnp.array([1.0, -2.0, 0.5]))
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, m=2)
    >>> w = jnp.zeros(3)
    >>> state = tx.init(w)
    >>> value_grads = sam_optax.group_value_and_grad(loss, m=2)
    >>> for _ in range(3):
    ...   value, grads, group_grads = value_grads(w, batch)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss,
    ...                              batch=batch, group_grads=group_grads)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(value))
    9.12E-02
    5.19E-02
    2.89E-02

  .. note::
    The per-group gradients take ``b // m`` times the memory of the params,
    and with ``group_loop='vmap'`` so do the ``b // m`` perturbed copies of
    the params in the transform's second pass (each pass is one vectorized
    pass with the FLOPs of a plain forward/backward). Memory and elementwise
    work grow as ``b / m`` params-sized buffers: that, not the matmuls, is
    the price of a small ``m``. If it does not fit, use
    ``group_loop='scan'``, raise ``m``, or lower the per-device batch and
    spread the batch over more devices (``axis_name``), where each device's
    groups cost memory only on that device.

    ``group_loop`` (here and in the transforms) trades these off. ``'vmap'``
    turns every weight into ``b // m`` copies inside one pass (batched
    matmuls, grouped convolutions), one kernel per layer. ``'scan'`` runs
    the groups one after another, so the transform's second pass holds one
    perturbed copy at a time (memory of about one params-sized buffer
    instead of ``b // m``), at the price of a sequential loop. ``'unroll'`` also runs them one after
    another, as straight-line code: compile time and program size grow with
    ``b // m``. On XLA:CPU, convolutions run far faster unrolled than either
    vectorized over groups (about 1.9× against 3× an SGD step on a small
    CNN) or inside a loop (12–16×); see
    ``benchmarks/results/distributed.md``.
  """
  name = "sam_optax.group_value_and_grad"
  if not checks.is_positive_int(m):
    raise ValueError(checks.BAD_M.format(name=name, m=m, alt=""))
  checks.check_loss_fn_arity(name, loss_fn, m)
  checks.check_choice(checks.BAD_GROUP_LOOP, group_loop, checks.GROUP_LOOPS,
                      name=name, loop=group_loop)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def value_and_grads(params, batch):
    chunks = split_batch(name, batch, m)
    value, group_grads = map_groups(
        lambda chunk: value_and_grad(params, chunk), chunks, group_loop)
    if has_aux:
      losses, aux = value
      value = (jnp.mean(losses), aux)
    else:
      value = jnp.mean(value)
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)),
                         group_mean(group_grads), params)
    return value, grads, group_grads

  return value_and_grads
