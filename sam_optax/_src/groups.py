"""In-device groups of examples (``m=``): one perturbation per group of m.

The batch of ``b`` examples is split into ``b / m`` groups along the leading
axis of every leaf; the groups run vectorized (``jax.vmap``) or one at a time
(``group_loop='scan'``/``'unroll'``). :func:`group_value_and_grad` gives the
per-group gradients in one pass, so a step stays at two passes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src import checks

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


def mean_over_groups(fn, xs, group_loop: str, varying=lambda tree: tree):
  """The mean over groups of ``fn(x)`` for every slice ``x`` of ``xs``.

  With ``'vmap'`` every group's output is materialized and then averaged
  (:func:`group_mean`); with ``'scan'``/``'unroll'`` the outputs are summed
  into a float32 accumulator one group at a time, so only one group's output
  (its perturbed params and gradient, in the second pass) is alive at once.
  Outputs keep their dtype. ``varying`` types the accumulator like the
  outputs (per device under ``shard_map``).
  """
  if group_loop == "vmap":
    return group_mean(jax.vmap(fn)(xs))
  k = jax.tree.leaves(xs)[0].shape[0]
  first = jax.tree.map(lambda x: x[0], xs)
  shapes = jax.eval_shape(fn, first)
  acc = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
  acc = varying(acc)

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
