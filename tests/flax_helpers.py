"""Flax models, data and the Linen SAM step shared by the Flax and checkpoint tests.

Apart from `tests/helpers.py` so that the tests that do not use Flax run
without it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from sklearn.datasets import load_digits


@functools.lru_cache(maxsize=None)
def digits():
  """The 8×8 digits, flattened to 64 features in [0, 1], and their labels."""
  x, y = load_digits(return_X_y=True)
  return (x / 16.0).astype(np.float32), y.astype(np.int32)


def avg_pool(x):
  """2×2 average pooling (flax's `avg_pool` divides by an integer count)."""
  with jax.numpy_dtype_promotion("standard"):
    return nn.avg_pool(x, (2, 2), (2, 2))


class LinenNet(nn.Module):
  """Conv(8, 3×3) or Dense(32) → BatchNorm → ReLU → (2×2 pool) → Dropout → Dense(10).

  Attributes:
    conv: the convolutional net on 8×8×1 images; else the MLP on flat inputs.
    dropout: the dropout rate.
  """

  conv: bool = True
  dropout: float = 0.3
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.conv:
      x = nn.Conv(8, (3, 3), **kw)(x)
    else:
      x = nn.Dense(32, **kw)(x.reshape((x.shape[0], -1)))
    with jax.numpy_dtype_promotion("standard"):  # flax's BatchNorm: bf16 - f32 mean
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, **kw)(x)
    x = nn.relu(x)
    if self.conv:
      x = avg_pool(x)
      x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(10, **kw)(x)


def xent(logits, y):
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def linen_loss(state, x, y, key):
  """The usual Linen BatchNorm+dropout loss: returns `(loss, updates)`."""
  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": key})
    return xent(logits, y), updates
  return loss_fn


def linen_sam_step(state, x, y, key):
  """One step of a `SAMTrainStateWithBatchStats` (not jitted).

  Returns:
    `(new state, loss, grads)`.
  """
  loss_fn = linen_loss(state, x, y, key)
  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, loss_fn=loss_fn, value=loss,
                                batch_stats=updates["batch_stats"])
  return state, loss, grads
