"""Offline data: digits and MNIST-1D with label noise, and batches for timing."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Data:
  x_train: np.ndarray
  y_train: np.ndarray  # noisy labels
  y_train_clean: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def _add_noise(x_train, y_train, x_test, y_test, noise, rng, classes=10) -> Data:
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  x_train = ((x_train - mean) / std).astype(np.float32)
  x_test = ((x_test - mean) / std).astype(np.float32)
  noisy = y_train.copy()
  flip = rng.random(len(noisy)) < noise
  noisy[flip] = rng.integers(0, classes, size=int(flip.sum()))
  return Data(x_train, noisy.astype(np.int32), y_train.astype(np.int32), x_test,
              y_test.astype(np.int32))


def _digits():
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  return load_digits(return_X_y=True)


def noisy_digits(noise: float, seed: int, test_fraction: float = 0.3) -> Data:
  """Digits, standardized; a fraction ``noise`` of training labels made random.

  A random label may equal the true one, so the fraction of wrong labels is
  ``0.9 · noise`` (the convention of the label-noise literature).
  """
  x, y = _digits()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))
  x, y = x[order].astype(np.float32), y[order]
  n_test = int(len(x) * test_fraction)
  return _add_noise(x[n_test:], y[n_test:], x[:n_test], y[:n_test], noise, rng)


_MNIST1D = None


def noisy_mnist1d(noise: float, seed: int, n_train: Optional[int] = None) -> Data:
  """MNIST-1D (generated offline from its default arguments), with label noise.

  The data set itself is the package's fixed default (4000 train / 1000 test
  sequences of length 40); ``seed`` only draws the noisy labels (and the
  subset, with ``n_train``).
  """
  global _MNIST1D
  if _MNIST1D is None:
    from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=import-outside-toplevel
    _MNIST1D = make_dataset(get_dataset_args())
  d = _MNIST1D
  rng = np.random.default_rng(seed)
  x, y = np.asarray(d["x"], np.float32), np.asarray(d["y"])
  if n_train is not None:
    keep = rng.permutation(len(x))[:n_train]
    x, y = x[keep], y[keep]
  return _add_noise(x, y, np.asarray(d["x_test"], np.float32),
                    np.asarray(d["y_test"]), noise, rng)


def stack(datas: Sequence[Data]) -> Data:
  """Stacks runs' data sets (same shapes) along a new leading axis."""
  return Data(*(np.stack([getattr(d, f.name) for d in datas])
                for f in dataclasses.fields(Data)))


def random_batch(shape: Sequence[int], batch: int, dtype=jnp.float32, classes: int = 10,
                 seed: int = 1):
  """``(x, y)``: Gaussian inputs of ``shape`` and uniform labels (for timing)."""
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch,) + tuple(shape), dtype)
  y = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch,), 0, classes)
  return x, y


def digits_batch(shape: Sequence[int], batch: int, dtype=jnp.float32, seed: int = 0):
  """``(x, y)``: ``batch`` standardized digits (for timing on real data)."""
  assert tuple(shape) == (64,), shape
  x, y = _digits()
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  idx = np.random.default_rng(seed).choice(len(x), batch, replace=False)
  return jnp.asarray(x[idx], dtype), jnp.asarray(y[idx], jnp.int32)
