"""Many runs of one method trained at once: ``vmap`` over runs, ``scan`` over steps."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import methods
from benchmarks.harness import models as models_lib
from benchmarks.harness.data import Data


def train_runs(tx: optax.GradientTransformation, data: Data, seeds: Sequence[int], *,
               epochs: int, batch_size: int, sizes: Optional[Sequence[int]] = None,
               model: Optional[models_lib.Model] = None,
               stop_at_loss: Optional[float] = None, snapshot_losses: Sequence[float] = (),
               progress=None) -> dict:
  """Trains ``len(seeds)`` models with ``tx`` at once (one compilation).

  The model is ``model``, or an MLP with layer ``sizes``.

  ``data`` holds one data set per run, stacked (:func:`.data.stack`). Every
  step is :func:`.methods.train_step` on a mini-batch, so any ``sam_optax``
  transform fits. With ``stop_at_loss``, a run's params are frozen after the
  first epoch that ends with a full-batch training loss (on its noisy labels)
  at or below that value. With ``snapshot_losses``, a run's params are also
  saved after the first epoch that ends at or below each of these losses.

  Returns:
    A dict of numpy arrays with a leading run axis: ``curve`` (clean test
    accuracy after every epoch, ``[runs, epochs]``), ``train_loss`` (after
    every epoch), ``train_acc_noisy``, ``train_acc_clean``, ``stop_epoch``
    (``epochs`` if never stopped) and ``params`` (the final params, with
    MSAM's perturbation removed); with ``snapshot_losses``, ``snapshots``
    (one stacked params per loss; a run that never got there holds its final
    params) and ``snapshot_epoch`` (``[losses, runs]``, 0 if never reached).
    When every run has stopped, training ends early (``curve`` is shorter).
  """
  if model is None:
    model = models_lib.mlp(sizes)
  loss = models_lib.cross_entropy(model.apply)
  acc = models_lib.accuracy(model.apply)
  step = methods.train_step(tx, loss)
  runs = len(seeds)
  n = data.x_train.shape[1]
  steps = n // batch_size

  @jax.jit
  def init(seeds):
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    params = jax.vmap(model.init)(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
    return params, jax.vmap(tx.init)(params), keys

  params, state, keys = init(jnp.asarray(seeds))

  def evaluate(params, state, x, y, xt, yt, yc):
    w = methods.unperturbed(params, state)
    return (params, state, w, acc(w, (xt, yt)), loss(w, (x, y)), acc(w, (x, y)),
            acc(w, (x, yc)))

  def one_epoch(params, state, key, x, y, xt, yt, yc):
    order = jax.random.permutation(key, n)[:steps * batch_size].reshape(steps, batch_size)

    def body(carry, idx):
      return step(*carry, (x[idx], y[idx])), None

    (params, state), _ = jax.lax.scan(body, (params, state), order)
    return evaluate(params, state, x, y, xt, yt, yc)

  def epoch(params, state, key, e, frozen, x, y, xt, yt, yc):
    key = jax.random.fold_in(key, e + 1)
    new = one_epoch(params, state, key, x, y, xt, yt, yc)
    if stop_at_loss is None:
      return new
    keep = lambda a, b: jax.tree.map(lambda u, v: jnp.where(frozen, u, v), a, b)
    return keep(evaluate(params, state, x, y, xt, yt, yc), new)

  epoch = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, None, 0, 0, 0, 0, 0, 0)))
  arrays = [jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test,
                                     data.y_train_clean)]
  frozen = np.zeros((runs,), bool)
  stop_epoch = np.full((runs,), epochs)
  curve, train_loss = [], []
  snapshots = [None] * len(snapshot_losses)
  snapshot_epoch = np.zeros((len(snapshot_losses), runs), int)
  w = params
  for e in range(epochs):
    params, state, w, test_acc, loss_e, acc_noisy, acc_clean = epoch(
        params, state, keys, e, frozen, *arrays)
    loss_e = np.asarray(loss_e)
    curve.append(np.asarray(test_acc))
    train_loss.append(loss_e)
    for i, target in enumerate(snapshot_losses):
      new = (loss_e <= target) & (snapshot_epoch[i] == 0)
      if new.any():
        snapshots[i] = _select_runs(new, w, snapshots[i])
        snapshot_epoch[i][new] = e + 1
    if stop_at_loss is not None:
      reached = (loss_e <= stop_at_loss) & ~frozen
      stop_epoch[reached] = e + 1
      frozen = frozen | reached
    if progress is not None:
      progress.update(1)
    if stop_at_loss is not None and bool(np.all(frozen)):
      if progress is not None:
        progress.update(epochs - e - 1)
      break
  for i, snap in enumerate(snapshots):
    snapshots[i] = _select_runs(snapshot_epoch[i] == 0, w, snap)
  return {
      "curve": np.stack(curve, 1),
      "snapshots": snapshots,
      "snapshot_epoch": snapshot_epoch,
      "train_loss": np.stack(train_loss, 1),
      "train_acc_noisy": np.asarray(acc_noisy),
      "train_acc_clean": np.asarray(acc_clean),
      "stop_epoch": stop_epoch,
      "params": w,
  }


def _select_runs(which: np.ndarray, new, old):
  """Stacked params: ``new`` for the runs in ``which``, ``old`` (if any) for the others."""
  new = jax.tree.map(np.asarray, new)
  if old is None:
    return new
  return jax.tree.map(
      lambda a, b: np.where(which.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)
