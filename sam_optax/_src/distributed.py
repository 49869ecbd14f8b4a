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

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src import base

GRADS_NOT_PER_DEVICE = (
    "`{name}(..., axis_name={axis!r})`: the gradients passed to `update` are "
    "identical on every device (not varying over {axis!r}). Under "
    "`jax.shard_map`, `jax.grad` with respect to replicated params returns the "
    "SUM of all devices' gradients, so each device would perturb with the "
    "global gradient and m-sharpness is lost. Differentiate with respect to "
    "`sam_optax.per_device(params, {axis!r})` (that is, "
    "`jax.lax.pcast(params, {axis!r}, to='varying')`) so that each device gets "
    "its own gradient."
)
PER_DEVICE_NOT_BOUND = (
    "`sam_optax.per_device(params, {axis!r})`: no axis named {axis!r} is bound "
    "here. Call it inside the `jax.shard_map` (or `jax.pmap`) function that "
    "maps over {axis!r}; under plain `jax.jit` there is nothing to do, so drop "
    "the call."
)
MISSING_BATCH = (
    "`{name}(m={m})`: `update` needs `batch=`, a pytree whose leaves have a "
    "leading batch axis, to give each group of m examples its own "
    "perturbation (received none). Call `tx.update(grads, state, params, "
    "loss_fn=loss_fn, batch=batch)` with `loss_fn(params, chunk)`."
)
BAD_BATCH_SIZE = (
    "`{name}(m={m})`: m (examples per perturbation) must divide the "
    "(per-device) batch size, but the batch has {b} examples. Pick m among "
    "the divisors of {b} ({divisors}), or change the batch size."
)
LOSS_FN_ARITY_M = (
    "`{name}(m={m})`: with `m`, `loss_fn` is called as `loss_fn(params, "
    "chunk)` on each group of m examples, but the given `loss_fn` cannot take "
    "two positional arguments (signature {sig}). Write it as "
    "`loss_fn(params, batch)` and pass the batch as `batch=`, or drop `m` and "
    "use a `loss_fn(params)` that closes over the batch."
)
LOSS_FN_ARITY_NO_M = (
    "`{name}`: `loss_fn` is called as `loss_fn(params)`, but the given "
    "`loss_fn` needs more positional arguments (signature {sig}). Close over "
    "the batch (`loss_fn=lambda p: loss(p, batch)`), or, for m-sharpness "
    "inside a device, create the transform with `m=` and pass `batch=`."
)
GROUP_GRADS_WITHOUT_M = (
    "`{name}.update(..., group_grads=...)`: per-group gradients are only used "
    "with in-device m-sharpness, but the transform was created without `m`. "
    "Create it with `{name}(..., m=m)` (the same m as in "
    "`sam_optax.group_value_and_grad(loss_fn, m)`), or drop `group_grads`."
)
BAD_GROUP_GRADS = (
    "`{name}.update(..., group_grads=...)`: expected a pytree like params with "
    "a leading axis of {groups} groups (batch of {b} examples / m={m}), as "
    "returned by `sam_optax.group_value_and_grad(loss_fn, {m})(params, "
    "batch)`; {got}."
)


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
    raise NameError(base.AXIS_NOT_BOUND.format(name=name, axis=axis_name))
  leaves = jax.tree.leaves(grads)
  if not leaves:
    return
  for a in _axis_names(axis_name):
    if _tracks_varying(a) and not any(a in _varying_axes(x) for x in leaves):
      raise ValueError(GRADS_NOT_PER_DEVICE.format(name=name, axis=a))


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
    raise NameError(PER_DEVICE_NOT_BOUND.format(axis=axis_name))
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
    raise ValueError(
        "A perturbation rule's `ascent` must return a rule state with the "
        "same tree structure as the one it received.")
  axes = _axis_names(axis_name)
  tracked = all(_tracks_varying(a) for a in axes)

  def needs(o, n):
    if n is o or not jnp.issubdtype(jnp.result_type(n), jnp.inexact):
      return False
    return not tracked or any(a in _varying_axes(n) for a in axes)

  return [needs(o, n) for o, n in zip(old, new)]


# --- In-device groups (m=) -------------------------------------------------


def _signature_text(fn) -> str:
  try:
    return str(inspect.signature(fn))
  except (TypeError, ValueError):
    return "unknown"


def _takes_positional(fn, n: int):
  """Whether ``fn`` accepts ``n`` positional args; None if it cannot be told."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  try:
    sig.bind(*([None] * n))
  except TypeError:
    return False
  return True


def check_loss_fn_arity(name: str, loss_fn: Callable, m) -> None:
  """Raises a clear TypeError if ``loss_fn`` cannot be called as the step will.

  With ``m``, ``loss_fn(params, chunk)``; without, ``loss_fn(params)``.
  Functions whose signature cannot be read are let through.
  """
  if m is not None:
    if _takes_positional(loss_fn, 2) is False:
      raise TypeError(LOSS_FN_ARITY_M.format(
          name=name, m=m, sig=_signature_text(loss_fn)))
  elif (_takes_positional(loss_fn, 1) is False
        and _takes_positional(loss_fn, 2) is True):
    raise TypeError(LOSS_FN_ARITY_NO_M.format(
        name=name, sig=_signature_text(loss_fn)))


def _divisors(b: int) -> str:
  ds = [d for d in range(1, b + 1) if b % d == 0]
  return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")


def batch_size(name: str, batch, m: int) -> int:
  """The leading size shared by every leaf of ``batch``; checks that m divides it."""
  if batch is None:
    raise TypeError(MISSING_BATCH.format(name=name, m=m))
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f"`{name}(m={m})`: `batch` has no arrays.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f"`{name}(m={m})`: every leaf of `batch` needs the same leading batch "
        f"axis; got leading sizes {sorted(map(str, sizes))}.")
  (b,) = sizes
  if b % m:
    raise ValueError(BAD_BATCH_SIZE.format(
        name=name, m=m, b=b, divisors=_divisors(b)))
  return b


def split_batch(name: str, batch, m: int):
  """Reshapes every leaf ``[b, ...]`` of ``batch`` to ``[b // m, m, ...]``."""
  b = batch_size(name, batch, m)
  return jax.tree.map(
      lambda x: jnp.reshape(x, (b // m, m) + jnp.shape(x)[1:]), batch)


def check_group_grads(name: str, group_grads, params, b: int, m: int) -> None:
  """Checks that ``group_grads`` is params-like with ``b // m`` groups in front."""
  groups = b // m
  if jax.tree.structure(group_grads) != jax.tree.structure(params):
    raise ValueError(BAD_GROUP_GRADS.format(
        name=name, groups=groups, b=b, m=m,
        got=f"got tree {jax.tree.structure(group_grads)}"))
  for path, g, p in zip(
      [jax.tree_util.keystr(k) for k, _ in
       jax.tree_util.tree_leaves_with_path(params)],
      jax.tree.leaves(group_grads), jax.tree.leaves(params)):
    want = (groups,) + tuple(jnp.shape(p))
    if tuple(jnp.shape(g)) != want:
      raise ValueError(BAD_GROUP_GRADS.format(
          name=name, groups=groups, b=b, m=m,
          got=f"leaf {path or '<root>'} has shape {tuple(jnp.shape(g))}, "
              f"expected {want}"))


GROUP_LOOPS = ("vmap", "scan", "unroll")

BAD_GROUP_LOOP = (
    "`{name}(group_loop={loop!r})`: unknown way to run over the groups of m "
    "examples. Use 'vmap' (all groups in one vectorized pass; the default), "
    "'scan' (one group at a time in a loop: memory of one perturbed copy of "
    "the params) or 'unroll' (one group at a time, unrolled into the "
    "compiled program)."
)


def check_group_loop(name: str, group_loop) -> str:
  """Returns ``group_loop`` if it names a known loop; raises clearly otherwise."""
  if not isinstance(group_loop, str) or group_loop not in GROUP_LOOPS:
    raise ValueError(BAD_GROUP_LOOP.format(name=name, loop=group_loop))
  return group_loop


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
  if isinstance(m, bool) or not isinstance(m, int) or m < 1:
    raise ValueError(
        f"`sam_optax.group_value_and_grad(m={m!r})`: m is the number of "
        "examples per perturbation and must be a positive integer.")
  name = "sam_optax.group_value_and_grad"
  check_loss_fn_arity(name, loss_fn, m)
  check_group_loop(name, group_loop)
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
