"""NNX: an optimizer whose ``update`` adapts the model-taking ``loss_fn``."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import optax
from flax import errors as flax_errors
from flax import nnx

from sam_optax._src import checks
from sam_optax.flax import _common as common

# --- Error messages (asserted by the tests). --------------------------------

OUTSIDE_STATE_IN_LOSS = (
    "`SAMOptimizer.update(loss_fn=...)`: `loss_fn` changed NNX state that is "
    "not part of the model it receives ({error}). The transform evaluates "
    "`loss_fn` at the perturbed params inside its own `jax.value_and_grad`, "
    "where state from outside (typically an `nnx.Rngs` passed at call time, "
    "`layer(x, rngs=rngs)`, or the model closed over instead of the "
    "argument) cannot be changed. Either keep the random streams in the "
    "model (`nnx.Dropout(rate, rngs=rngs)` at construction), whose keys "
    "`SAMOptimizer(..., second_pass_rng='same' | 'fresh')` handles, or pass "
    "a key drawn once per step outside `loss_fn` (`key = rngs.dropout()`, "
    "then `layer(x, rngs=key)`): both passes then use the same dropout mask. "
    "Use the model that `loss_fn` receives, not a closed-over one."
)


def _set_values(variables, values):
  """Writes ``values`` (a pure tree) into a same-shaped tree of Variables."""
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  var_leaves, treedef = jax.tree.flatten(variables, is_leaf=is_var)
  for var, x in zip(var_leaves, treedef.flatten_up_to(values)):
    var.set_value(x)


class SAMOptimizer(nnx.Optimizer):
  """An ``nnx.Optimizer`` for sharpness-aware transforms.

  ``nnx.Optimizer.update`` forwards keyword arguments to ``tx.update``, but the
  transform sees the params as a pure ``nnx.State`` and calls
  ``loss_fn(params)``. Here ``update`` takes your usual model-taking
  ``loss_fn(model)`` and adapts it: it splits the model into the ``wrt``
  params and the rest, and the transform's pass evaluates ``loss_fn`` on a
  temporary copy ``nnx.merge(graphdef, w + ε, rest)``, the rest held fixed.
  Your model only ever holds the unperturbed params.

  .. math::
    w_{t+1} = w_t + \\operatorname{tx}\\big(g_t;\\ \\nabla_w
    \\mathtt{loss\\_fn}(\\mathrm{merge}(w_t + \\varepsilon_t,\\ \\text{rest}))
    \\big).

  Model state changed by the perturbed pass (BatchNorm statistics, RNG
  counters, sown values) is discarded, except as chosen by ``bn_stats`` and
  ``second_pass_rng``.

  Args:
    model: the NNX module.
    tx: a sharpness-aware optax transform (:func:`sam_optax.sam`, ...).
    wrt: filter of the variables to optimize, as for ``nnx.Optimizer`` (and
      as for the ``nnx.grad`` that makes ``grads``); e.g. ``nnx.Param``.
    bn_stats: ``"unperturbed"`` (default): the model keeps the
      ``nnx.BatchStat`` values of your pass at ``w`` and the perturbed pass's
      are dropped; ``"perturbed"``: the model takes those of the pass at
      ``w + ε`` (on a step that skips the second pass it keeps its own).
    second_pass_rng: ``"same"`` (default): the perturbed pass redraws the keys
      of your unperturbed pass (same dropout masks); ``"fresh"``: it draws new
      keys and the model's RNG counters advance past them. See the module
      docstring for the rules of ``"same"``.
    graph: as for ``nnx.Optimizer``.

  Attributes:
    rng_counts: the model's ``nnx.RngCount`` values at the end of the last
      ``update`` (or at construction), from which ``second_pass_rng="same"``
      replays the unperturbed pass's keys. Part of the optimizer's state (and
      of its checkpoints).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from flax import nnx
    >>> from sam_optax.flax import SAMOptimizer
    >>> x = jax.random.normal(jax.random.key(1), (8, 3))
    >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]])
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = SAMOptimizer(model, sam_optax.sam(optax.sgd(0.1), rho=0.05),
    ...                          wrt=nnx.Param)
    >>> def loss_fn(model):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> for _ in range(5):
    ...   loss, grads = nnx.value_and_grad(loss_fn)(model)
    ...   _ = optimizer.update(model, grads, loss_fn=loss_fn, value=loss)
    ...   print('{:.2E}'.format(loss_fn(model)))
    1.70E+00
    1.10E+00
    7.42E-01
    5.19E-01
    3.71E-01
  """

  def __init__(self, model, tx: optax.GradientTransformation, *, wrt,
               bn_stats: str = "unperturbed", second_pass_rng: str = "same",
               graph: Optional[bool] = None):
    common.check_policy("SAMOptimizer", "bn_stats", bn_stats,
                        common.BN_STATS_POLICIES, common.BN_EXPLAIN)
    common.check_policy("SAMOptimizer", "second_pass_rng", second_pass_rng,
                        common.SECOND_PASS_RNG_POLICIES, common.RNG_EXPLAIN)
    super().__init__(model, tx, wrt=wrt, graph=graph)
    self.bn_stats = bn_stats
    self.second_pass_rng = second_pass_rng
    counts = nnx.as_pure(nnx.state(model, nnx.RngCount, graph=graph))
    self.rng_counts = nnx.data(jax.tree.map(nnx.OptArray, counts))

  def update(self, model, grads, /, *, loss_fn: Optional[Callable] = None,
             **kwargs):
    """One SAM step: ``tx.update`` with the adapted ``loss_fn``, then apply.

    Args:
      model: the model given to the constructor (updated in place).
      grads: the gradient from ``nnx.grad(loss_fn)(model)`` (an ``nnx.State``
        filtered like ``wrt``).
      loss_fn: ``model -> loss`` (or ``(loss, aux)`` if the transform was
        built with ``has_aux=True``) on the current batch, as you
        differentiated it. Required by every transform that makes a second
        pass (all but :func:`sam_optax.msam`). It must use the model it
        receives, and random streams stored in that model (or a key), not an
        ``nnx.Rngs`` passed at call time: the transform calls it inside its
        own ``jax.value_and_grad``, where outside NNX state cannot change.
      **kwargs: forwarded to ``tx.update`` (``value=``, ``batch=``, ...).

    Returns:
      The updates applied to the ``wrt`` params.
    """
    graph = self.graph
    graphdef, params, counts, rest = nnx.split(
        model, self.wrt, nnx.RngCount, ..., graph=graph)
    param_arrays = nnx.as_pure(params)
    grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=graph))
    opt_state_arrays = nnx.as_pure(self.opt_state)
    kwargs_arrays = nnx.as_pure(kwargs)
    rest_arrays = nnx.as_pure(rest)
    counts_now = nnx.as_pure(counts)
    same = self.second_pass_rng == "same"
    counts_in = nnx.as_pure(self.rng_counts) if same else counts_now
    stat_refs = None
    if self.bn_stats == "perturbed":
      stat_refs = common.new_refs(
          nnx.as_pure(nnx.state(model, nnx.BatchStat, graph=graph)))
    count_refs = None if same else common.new_refs(counts_now)

    def model_loss(p, *args):
      copy = nnx.merge(graphdef, p, counts_in, rest_arrays)
      try:
        out = loss_fn(copy, *args)
      except flax_errors.TraceContextError as e:
        raise ValueError(OUTSIDE_STATE_IN_LOSS.format(
            error=f"TraceContextError: {str(e).splitlines()[0]}")) from e
      if stat_refs is not None:
        common.write_refs(stat_refs,
                    nnx.as_pure(nnx.state(copy, nnx.BatchStat, graph=graph)),
                    call="SAMOptimizer", arg="bn_stats", value=self.bn_stats,
                    default="unperturbed")
      if count_refs is not None:
        common.write_refs(count_refs,
                    nnx.as_pure(nnx.state(copy, nnx.RngCount, graph=graph)),
                    call="SAMOptimizer", arg="second_pass_rng",
                    value=self.second_pass_rng, default="same")
      return out

    if loss_fn is not None:
      kwargs_arrays = dict(kwargs_arrays, loss_fn=model_loss)
    try:
      updates, new_opt_state = self.tx.update(
          grad_arrays, opt_state_arrays, param_arrays, **kwargs_arrays)
    except checks.MissingLossFnError:
      # The transform needs `loss_fn` (every method but MSAM): say it here.
      raise TypeError(common.MISSING_LOSS_FN.format(
          call="SAMOptimizer.update",
          example="optimizer.update(model, grads, loss_fn=loss_fn)",
          signature="`loss_fn(model)`", aux="")) from None
    nnx.update(model, optax.apply_updates(param_arrays, updates))
    if stat_refs is not None:
      nnx.update(model, common.read_refs(stat_refs))
    if count_refs is not None:
      nnx.update(model, common.read_refs(count_refs))
    nnx.update(self.opt_state, nnx.state(new_opt_state, graph=graph))
    _set_values(self.rng_counts,
                nnx.as_pure(nnx.state(model, nnx.RngCount, graph=graph)))
    self.step[...] += 1
    return updates
