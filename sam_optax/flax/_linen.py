"""Linen: train states whose ``apply_gradients`` runs one SAM step."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from sam_optax._src import checks
from sam_optax.flax import _common as common

# --- Error messages (asserted by the tests). --------------------------------

FIELD_IN_EXTRA_ARGS = (
    "`{cls}.apply_gradients({names}=...)`: {quoted} {verb} a field of the "
    "train state, but the extra keyword arguments of `apply_gradients` go to "
    "`tx.update` (unlike `flax.training.train_state.TrainState`, where they "
    "replace fields). To replace a field, pass it in `replace`: "
    "`state.apply_gradients(grads=grads, loss_fn=loss_fn, "
    "replace={{{example}}})`."
)
REPLACE_RESERVED = (
    "`{cls}.apply_gradients(replace=...)`: {quoted} cannot be replaced here: "
    "the step itself sets {them}.{hint}"
)
MISSING_BATCH_STATS = (
    "`SAMTrainStateWithBatchStats.apply_gradients` needs `batch_stats` "
    "(received none): the batch statistics of your unperturbed pass, which the "
    "state keeps. Differentiate with `(loss, updates), grads = "
    "jax.value_and_grad(loss_fn, has_aux=True)(state.params)` and pass "
    "`batch_stats=updates['batch_stats']`."
)
NO_BATCH_STATS_AUX = (
    "`SAMTrainStateWithBatchStats.apply_gradients(loss_fn=...)`: the model has "
    "mutable `batch_stats`, so `loss_fn` must return `(loss, updates)` with the "
    "updated statistics in `updates['batch_stats']` (or `(loss, (updates, "
    "...))`), but it returned {got}. In `loss_fn`, call `state.apply_fn("
    "{{'params': params, 'batch_stats': state.batch_stats}}, x, train=True, "
    "mutable=['batch_stats'])`, which returns `(outputs, updates)`, return "
    "`loss, updates`, and build the transform with `has_aux=True`."
)
OVERWRITE_WITH_GRADIENT_UNSUPPORTED = (
    "`{cls}.apply_gradients`: params with an `overwrite_with_gradient` "
    "collection are not supported (the SAM perturbation would have to skip "
    "them). Use `flax.training.train_state.TrainState` for such params."
)
REPLACE_NOT_MAPPING = (
    "`{cls}.apply_gradients(replace=...)`: expected a mapping from field "
    "names to new values, got {type}."
)


def _sam_apply(state, *, cls, grads, loss_fn, value, replace, extra_args,
               reserved=("step", "params", "opt_state"), reserved_hint=""):
  """Checks the call and runs ``tx.update``; returns (params, opt_state)."""
  fields = set(state.__dataclass_fields__)
  clashes = sorted(k for k in extra_args if k in fields)
  if clashes:
    quoted = ", ".join(f"`{k}`" for k in clashes)
    raise TypeError(FIELD_IN_EXTRA_ARGS.format(
        cls=cls, names=", ".join(clashes), quoted=quoted,
        verb="is" if len(clashes) == 1 else "are",
        example=", ".join(f"'{k}': ..." for k in clashes)))
  if replace is not None:
    if not isinstance(replace, Mapping):
      raise TypeError(REPLACE_NOT_MAPPING.format(
          cls=cls, type=type(replace).__name__))
    clashes = sorted(k for k in replace if k in reserved)
    if clashes:
      raise ValueError(REPLACE_RESERVED.format(
          cls=cls, quoted=", ".join(f"`{k}`" for k in clashes),
          them=", ".join(f"`{k}`" for k in reserved), hint=reserved_hint))
  if (isinstance(grads, Mapping)
      and train_state.OVERWRITE_WITH_GRADIENT in grads):
    raise ValueError(OVERWRITE_WITH_GRADIENT_UNSUPPORTED.format(cls=cls))
  if value is not None:
    extra_args = dict(extra_args, value=value)
  if loss_fn is not None:
    extra_args = dict(extra_args, loss_fn=loss_fn)
  try:
    updates, new_opt_state = state.tx.update(
        grads, state.opt_state, state.params, **extra_args)
  except checks.MissingLossFnError:
    # The transform needs `loss_fn` (every method but MSAM): say it here.
    bn = isinstance(state, SAMTrainStateWithBatchStats)
    raise TypeError(common.MISSING_LOSS_FN.format(
        call=f"{cls}.apply_gradients",
        example=("state.apply_gradients(grads=grads, loss_fn=loss_fn"
                 + (", batch_stats=updates['batch_stats'])" if bn else ")")),
        signature="`loss_fn(params)`",
        aux=(" and the updated statistics, `(loss, updates)`" if bn else ""))
    ) from None
  return optax.apply_updates(state.params, updates), new_opt_state


class SAMTrainState(train_state.TrainState):
  """A Flax ``TrainState`` whose ``apply_gradients`` runs one SAM step.

  ``flax.training.train_state.TrainState.apply_gradients`` sends its extra
  keyword arguments to ``.replace()``, so no ``loss_fn`` can reach the
  optimizer. This subclass sends them to ``tx.update`` instead and takes the
  fields to replace as one explicit ``replace`` mapping. Create it as usual,
  with ``tx`` any :func:`sam_optax.sam` (or a chain containing
  :func:`sam_optax.sharpness_aware`):

  .. code-block:: python

    state = SAMTrainState.create(apply_fn=model.apply, params=params,
                                 tx=sam_optax.sam(optax.adam(1e-3), rho=0.05))

  The step is

  .. math::
    w_{t+1} = w_t + \\operatorname{tx}\\big(g_t;\\ \\nabla L(w_t + \\varepsilon_t)
    \\big), \\qquad g_t = \\nabla L(w_t),

  where ``tx`` calls ``loss_fn`` at ``w + ε`` itself. The state holds only
  the unperturbed params. For Linen models with BatchNorm use
  :class:`SAMTrainStateWithBatchStats`. Dropout: the transform calls exactly
  the ``loss_fn`` you pass, so one closing over the key of your unperturbed
  pass gives the same masks in both passes (the default of the reference
  implementation); pass one closing over another key for fresh masks.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, sam_optax
    >>> from sam_optax.flax import SAMTrainState
    >>> x = jax.random.normal(jax.random.key(1), (8, 3))
    >>> y = x @ jnp.array([[1.0], [-2.0], [0.5]])
    >>> model = nn.Dense(1)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> state = SAMTrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=sam_optax.sam(optax.sgd(0.1), rho=0.05))
    >>> for _ in range(5):
    ...   def loss_fn(params):
    ...     return jnp.mean((state.apply_fn({'params': params}, x) - y) ** 2)
    ...   loss, grads = jax.value_and_grad(loss_fn)(state.params)
    ...   state = state.apply_gradients(grads=grads, loss_fn=loss_fn, value=loss)
    ...   print('{:.2E}'.format(loss_fn(state.params)))
    1.89E+00
    1.42E+00
    1.08E+00
    8.32E-01
    6.44E-01
  """

  def apply_gradients(self, *, grads, loss_fn: Optional[Callable] = None,
                      value=None, replace: Optional[Mapping[str, Any]] = None,
                      **extra_args):
    """One SAM step: ``tx.update`` with ``loss_fn``, then apply the updates.

    Args:
      grads: the gradient of ``loss_fn`` at ``self.params`` (same tree).
      loss_fn: ``params -> loss`` (or ``(loss, aux)`` if the transform was
        built with ``has_aux=True``) on the current batch; the transform calls
        it at the perturbed params. Required by every transform that makes a
        second pass (all but :func:`sam_optax.msam`, which needs none).
      value: optional unperturbed loss ``L(w)``, forwarded as ``value=`` (it
        gives :attr:`sam_optax.SAMInfo.sharpness`).
      replace: optional mapping of other dataclass fields to new values, as
        ``.replace(**replace)``. ``step``, ``params`` and ``opt_state`` are set
        by the step and may not appear here.
      **extra_args: forwarded to ``tx.update`` (e.g. ``batch=`` with ``m=``).
        A name that is a field of the state raises a ``TypeError`` (use
        ``replace``): Flax's ``TrainState`` would have replaced it.

    Returns:
      The new state: ``step + 1``, updated ``params`` and ``opt_state``, and
      the fields in ``replace`` replaced.
    """
    params, opt_state = _sam_apply(
        self, cls=type(self).__name__, grads=grads, loss_fn=loss_fn,
        value=value, replace=replace, extra_args=extra_args)
    return self.replace(step=self.step + 1, params=params,
                        opt_state=opt_state, **(replace or {}))


def _batch_stats_of(out):
  """``aux['batch_stats']`` from ``loss_fn``'s output, or a clear error."""
  if isinstance(out, (tuple, list)) and len(out) == 2:
    aux = out[1]
    if isinstance(aux, Mapping) and "batch_stats" in aux:
      return aux["batch_stats"]
    if (isinstance(aux, (tuple, list)) and aux and isinstance(aux[0], Mapping)
        and "batch_stats" in aux[0]):
      return aux[0]["batch_stats"]
    got = f"`(loss, aux)` with aux of type {type(aux).__name__} and no 'batch_stats'"
  elif isinstance(out, (tuple, list)):
    got = f"a {type(out).__name__} of length {len(out)}"
  else:
    got = f"a single value of shape {jnp.shape(out)} (no aux)"
  raise TypeError(NO_BATCH_STATS_AUX.format(got=got))


class SAMTrainStateWithBatchStats(SAMTrainState):
  """:class:`SAMTrainState` for Linen models with BatchNorm.

  Holds the running averages in ``batch_stats``. Your ``loss_fn`` runs the
  model in train mode with ``mutable=['batch_stats']`` and returns
  ``(loss, updates)`` (or ``(loss, (updates, anything))``), so build the
  transform with ``has_aux=True``. Pass the statistics of your own
  (unperturbed) pass as ``batch_stats=``:

  .. code-block:: python

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {'params': params, 'batch_stats': state.batch_stats}, x,
          train=True, mutable=['batch_stats'], rngs={'dropout': key})
      return cross_entropy(logits, y), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(grads=grads, loss_fn=loss_fn, value=loss,
                                  batch_stats=updates['batch_stats'])

  Attributes:
    batch_stats: the BatchNorm running averages.
    bn_stats: ``"unperturbed"`` (default) keeps the statistics of your pass at
      ``w`` (the ``batch_stats=`` argument) and discards those of the
      transform's pass at ``w + ε``; ``"perturbed"`` keeps the latter (falling
      back to the former on a step that skips the second pass). Static: set
      it in :meth:`create`. See the module docstring for why the default.
  """

  batch_stats: Any = None
  bn_stats: str = struct.field(pytree_node=False, default="unperturbed")

  @classmethod
  def create(cls, *, apply_fn, params, tx, batch_stats,
             bn_stats: str = "unperturbed", **kwargs):
    """Creates the state with ``step=0`` and an initialized ``opt_state``.

    Args:
      apply_fn: usually ``model.apply``.
      params: the ``'params'`` collection.
      tx: a sharpness-aware optax transform built with ``has_aux=True``.
      batch_stats: the ``'batch_stats'`` collection.
      bn_stats: ``"unperturbed"`` (default) or ``"perturbed"``: whose batch
        statistics a step keeps.
      **kwargs: other fields of a subclass.
    """
    common.check_policy("SAMTrainStateWithBatchStats.create", "bn_stats",
                        bn_stats, common.BN_STATS_POLICIES, common.BN_EXPLAIN)
    return super().create(apply_fn=apply_fn, params=params, tx=tx,
                          batch_stats=batch_stats, bn_stats=bn_stats, **kwargs)

  def apply_gradients(self, *, grads, loss_fn: Optional[Callable] = None,
                      batch_stats=None, value=None,
                      replace: Optional[Mapping[str, Any]] = None,
                      **extra_args):
    """One SAM step that also updates ``batch_stats`` by the ``bn_stats`` policy.

    Args:
      grads: the gradient of ``loss_fn`` at ``self.params``.
      loss_fn: ``params -> (loss, updates)`` with ``updates['batch_stats']``
        (or ``(loss, (updates, ...))``), run in train mode on the current
        batch. Required, except with :func:`sam_optax.msam` (no second
        pass).
      batch_stats: the statistics of your unperturbed pass,
        ``updates['batch_stats']``. Required.
      value, replace, **extra_args: as in :meth:`SAMTrainState.apply_gradients`
        (``batch_stats`` may not appear in ``replace``).

    Returns:
      The new state.
    """
    cls = type(self).__name__
    common.check_policy(f"{cls}.create", "bn_stats", self.bn_stats,
                        common.BN_STATS_POLICIES, common.BN_EXPLAIN)
    if batch_stats is None:  # also without loss_fn (MSAM): the state keeps them
      raise TypeError(MISSING_BATCH_STATS)
    refs = None
    if loss_fn is not None:
      keep_perturbed = self.bn_stats == "perturbed"
      if keep_perturbed:
        refs = common.new_refs(batch_stats)

      def checked_loss_fn(params, *args):
        out = loss_fn(params, *args)
        stats = _batch_stats_of(out)
        if keep_perturbed:
          common.write_refs(refs, stats, call=f"{cls}.create", arg="bn_stats",
                      value=self.bn_stats, default="unperturbed")
        return out
    else:
      checked_loss_fn = None
    params, opt_state = _sam_apply(
        self, cls=cls, grads=grads, loss_fn=checked_loss_fn, value=value,
        replace=replace, extra_args=extra_args,
        reserved=("step", "params", "opt_state", "batch_stats"),
        reserved_hint=" Pass the new statistics as `batch_stats=`.")
    new_stats = batch_stats if refs is None else common.read_refs(refs)
    return self.replace(step=self.step + 1, params=params,
                        opt_state=opt_state, batch_stats=new_stats,
                        **(replace or {}))
