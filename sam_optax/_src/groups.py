"""In-device groups of examples (``m=``): one perturbation per group of m.

The batch of ``b`` examples is split into ``b / m`` groups along the leading
axis of every leaf (group ``k`` is examples ``k·m … (k+1)·m - 1``); the groups
run vectorized (``jax.vmap``) or one at a time (``group_loop='scan'``/
``'unroll'``). :func:`group_value_and_grad` gives the per-group gradients in
one pass, so a step stays at two passes; without them, the transform computes
each group's gradient inside its loop (constant memory with ``'scan'``).
Under ``jax.jit`` with a batch sharded over a mesh, a loop runs the groups of
each device's shard on that device (:func:`side_by_side`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src import checks
from sam_optax._src import messages

def split_batch(name: str, batch, m: int):
  """Reshapes every leaf ``[b, ...]`` of ``batch`` to ``[b // m, m, ...]``."""
  b = checks.batch_size(name, batch, m)
  return jax.tree.map(
      lambda x: jnp.reshape(x, (b // m, m) + jnp.shape(x)[1:]), batch)


def side_by_side(xs) -> int:
  """How many groups one iteration of a ``'scan'``/``'unroll'`` loop runs at once.

  Under ``jax.jit`` with a batch sharded over a mesh, the groups of a device's
  shard must run on that device: a loop that takes group ``i`` of the global
  batch at iteration ``i`` slices the sharded axis, and XLA then all-gathers
  the whole batch so that every device runs every group. So the ``K`` groups
  are laid out as ``[W, K // W]`` (group ``g = w · K/W + i``, contiguous
  blocks as the batch is split) and iteration ``i`` runs the ``W`` groups
  ``w · K/W + i`` side by side, vectorized: the ``W`` axis keeps the batch's
  sharding and each device runs its own block, one group per iteration when
  ``W`` is the number of devices the batch is split over.

  The split is read from the leaves' types: with an explicitly sharded
  (``AxisType.Explicit``) leading axis, ``W`` is the number of devices it is
  split over; otherwise the size of the ``Auto`` (not ``Manual``) axes of the
  mesh, which is all of them under plain ``jit`` and none inside
  ``shard_map`` or ``pmap``, where every device already sees only its own
  shard. ``W`` is the greatest common divisor of ``K`` and that number, so
  ``1`` (a plain loop over the groups) without a mesh.
  """
  leaves = jax.tree.leaves(xs)
  spread = 1
  for leaf in leaves:
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
      continue
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    lead = sharding.spec[0] if len(sharding.spec) else None
    if lead is not None:
      axes = lead if isinstance(lead, tuple) else (lead,)
    else:
      axes = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                   if t == jax.sharding.AxisType.Auto)
    spread = max(spread, math.prod(sizes[a] for a in axes))
  k = jnp.shape(leaves[0])[0]
  return math.gcd(k, spread)


def _blocks(xs, width: int):
  """``[K, ...]`` leaves as ``[K // W, W, ...]``: iteration ``i`` takes groups
  ``w · K/W + i`` (see :func:`side_by_side`)."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(
          jnp.reshape(x, (width, x.shape[0] // width) + x.shape[1:]), 0, 1), xs)


def _zeros_f32(shape: jax.ShapeDtypeStruct):
  """float32 zeros of ``shape``, sharded like it where its type says how
  (``AxisType.Explicit`` axes), so that a loop's carry keeps its type."""
  sharding = getattr(shape, "sharding", None)
  explicit = any(s is not None for s in getattr(sharding, "spec", ()))
  return jnp.zeros(shape.shape, jnp.float32,
                   out_sharding=sharding if explicit else None)


def map_groups(fn, xs, group_loop: str):
  """``fn`` on every slice of ``xs`` along the leading axis, outputs stacked.

  ``'vmap'`` vectorizes over the groups; ``'scan'`` and ``'unroll'`` run one
  group at a time (``jax.lax.scan``, rolled or fully unrolled), or one per
  device at a time under ``jit`` with a sharded batch (:func:`side_by_side`).
  """
  if group_loop == "vmap":
    return jax.vmap(fn)(xs)
  width = side_by_side(xs)
  unroll = group_loop == "unroll"
  if width == 1:
    _, ys = jax.lax.scan(lambda carry, x: (carry, fn(x)), None, xs,
                         unroll=unroll)
    return ys
  _, ys = jax.lax.scan(lambda carry, x: (carry, jax.vmap(fn)(x)), None,
                       _blocks(xs, width), unroll=unroll)
  return jax.tree.map(
      lambda y: jnp.reshape(jnp.swapaxes(y, 0, 1), (-1,) + y.shape[2:]), ys)


def mean_over_groups(fn, xs, group_loop: str, varying=lambda tree: tree):
  """The mean over groups of ``fn(x)`` for every slice ``x`` of ``xs``.

  With ``'vmap'`` every group's output is materialized and then averaged
  (:func:`group_mean`); with ``'scan'``/``'unroll'`` the outputs are summed
  into a float32 accumulator one group at a time, so only one group's
  buffers (its gradient, perturbed params and perturbed gradient, when
  ``fn`` computes them all) are alive at once, whatever the number of
  groups. Under ``jit`` with a sharded batch, one group per device at a
  time (:func:`side_by_side`): the accumulator has one slot per group run
  side by side, summed once after the loop. Outputs keep their dtype.
  ``varying`` types the accumulator like the outputs (per device under
  ``shard_map``).
  """
  if group_loop == "vmap":
    return group_mean(jax.vmap(fn)(xs))
  k = jax.tree.leaves(xs)[0].shape[0]
  width = side_by_side(xs)
  step = fn if width == 1 else jax.vmap(fn)
  blocks = xs if width == 1 else _blocks(xs, width)
  shapes = jax.eval_shape(step, jax.tree.map(lambda x: x[0], blocks))
  acc = varying(jax.tree.map(_zeros_f32, shapes))
  weight = jnp.float32(1.0 / k)

  def body(acc, x):
    out = step(x)
    return jax.tree.map(lambda a, o: a + weight * o.astype(jnp.float32),
                        acc, out), None

  acc, _ = jax.lax.scan(body, acc, blocks, unroll=group_loop == "unroll")
  if width > 1:
    acc = jax.tree.map(lambda a: jnp.sum(a, axis=0), acc)
  return jax.tree.map(lambda a, s: a.astype(s.dtype), acc, shapes)


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
    the price of a small ``m``. If it does not fit, do not build them: pass
    the batch gradient (``jax.grad`` of the whole batch) to a transform with
    ``group_loop='scan'`` and no ``group_grads=``. It then runs, one group at
    a time, the group's gradient, ε, the perturbed gradient and the
    accumulation, so its memory stays at a hand-written fused loop's
    whatever ``b / m``, at the price of a third pass. Or raise ``m``, or spread the batch over
    more devices (``axis_name``, or a batch sharded under ``jit``), where
    each device's groups cost memory only on that device.

    ``group_loop`` (here and in the transforms) trades these off. ``'vmap'``
    turns every weight into ``b // m`` copies inside one pass (batched
    matmuls, grouped convolutions), one kernel per layer. ``'scan'`` runs
    the groups one after another, so the transform's second pass holds one
    perturbed copy at a time (memory of about one params-sized buffer
    instead of ``b // m``), at the price of a sequential loop. ``'unroll'``
    also runs them one after another, as straight-line code: compile time
    and program size grow with ``b // m``, and XLA may overlap the groups'
    buffers, so its memory is not bounded like ``'scan'``'s. On XLA:CPU,
    convolutions run far faster unrolled than either vectorized over groups
    (about 1.9× against 3× an SGD step on a small CNN) or inside a loop
    (12–16×); see ``benchmarks/results/distributed.md``, and
    ``benchmarks/results/group_memory_cpu.md`` for the memory of each.

    Under ``jax.jit`` with the batch sharded over a mesh, ``'scan'`` and
    ``'unroll'`` run each device's groups on that device, one per device at
    a time (:func:`side_by_side`; no all-gather of the batch), and the
    stacked ``group_grads`` keep the batch's sharding. The groups are the
    same: group ``k`` is examples ``k·m … (k+1)·m - 1`` of the global batch.
  """
  name = "sam_optax.group_value_and_grad"
  if not checks.is_positive_int(m):
    raise ValueError(messages.BAD_M.format(name=name, m=m, alt=""))
  checks.check_loss_fn_arity(name, loss_fn, m)
  checks.check_choice(messages.BAD_GROUP_LOOP, group_loop, checks.GROUP_LOOPS,
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
