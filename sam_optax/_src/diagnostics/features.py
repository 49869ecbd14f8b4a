"""Feature probes: how much a model uses each of several feature blocks.

The balanced-feature-learning view of SAM (Springer et al., ICLR 2024).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import numerics
from sam_optax._src.diagnostics import checks as diag_checks
from sam_optax._src.diagnostics import common


def _labels_1d(name, labels, n):
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != n or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(diag_checks.BAD_LABELS.format(name=name, shape=labels.shape,
                                       dtype=labels.dtype, n=n))
  return labels


def _concrete(x):
  """``x`` as a numpy array, or None if it is traced (inside ``jax.jit``)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _check_finite(name, arg, x):
  """Raises if the concrete features ``x`` ``[n, d]`` hold a NaN or ±inf."""
  if isinstance(x, jax.core.Tracer) or bool(jnp.all(jnp.isfinite(x))):
    return
  bad = ~np.isfinite(np.asarray(x))
  if bad.any():
    raise ValueError(diag_checks.NON_FINITE_FEATURES.format(
        name=name, arg=arg, count=int(bad.sum()),
        index=int(np.flatnonzero(bad.any(axis=1))[0])))


def _check_label_range(name, arg, y, c):
  """Raises if the concrete labels ``y`` leave ``[0, c)``."""
  y = _concrete(y)
  if y is None:
    return
  bad = np.flatnonzero((y < 0) | (y >= c))
  if bad.size:
    raise ValueError(diag_checks.LABEL_OUT_OF_RANGE.format(
        name=name, arg=arg, c=c, index=int(bad[0]), value=int(y[bad[0]])))


def _num_classes(name, num_classes, *label_arrays):
  if num_classes is not None:
    return diag_checks.check_positive_int(name, "num_classes", num_classes,
                                     "is the number of classes", 2)
  try:
    return max(int(np.max(np.asarray(y))) for y in label_arrays) + 1
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    raise ValueError(diag_checks.NUM_CLASSES_NEEDED.format(name=name)) from None


def linear_probe_accuracy(
    features,
    labels,
    *,
    test_features=None,
    test_labels=None,
    num_classes: Optional[int] = None,
    l2: float = 1e-3,
) -> jax.Array:
  r"""Accuracy of a closed-form ridge linear probe on ``features``.

  How linearly decodable the labels are from a representation. The probe is
  ridge regression onto one-hot targets :math:`Y` with an unpenalized bias,
  solved in closed form (no iterative training, no randomness):

  .. math::
    W = \big(\bar X^\top \bar X + \lambda\, \tfrac{\operatorname{tr}
        (\bar X^\top \bar X)}{d}\, I\big)^{-1} \bar X^\top \bar Y, \qquad
    \hat y(x) = \operatorname{argmax}_c\, \big((x - \mu_X) W + \mu_Y\big)_c,

  where :math:`\bar X, \bar Y` are the centered features and targets and
  :math:`\lambda` is ``l2`` (relative to the mean feature variance, so the
  probe does not depend on the scale of the features). When there are more
  features than examples the equivalent dual form is solved instead.

  Features must be finite and labels in ``[0, num_classes)``: a NaN feature
  or a label of −1 raises ``ValueError``. Under ``jax.jit`` (traced inputs,
  which cannot be checked) the accuracy is NaN instead.

  Args:
    features: ``[n, ...]`` array (flattened to ``[n, d]``), e.g. a layer's
      activations.
    labels: ``[n]`` integer class indices.
    test_features: optional held-out ``[n_test, ...]`` features; the accuracy
      is measured on them (recommended: training accuracy of a probe with
      ``d ≳ n`` is close to 1 for any features).
    test_labels: ``[n_test]`` labels of ``test_features``.
    num_classes: number of classes; default read from the labels (pass it
      under ``jax.jit``).
    l2: relative ridge strength λ > 0, default 1e-3.

  Returns:
    The accuracy in ``[0, 1]``, a float32 scalar (NaN for traced non-finite
    features or out-of-range labels).

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> x = jax.random.normal(jax.random.key(0), (200, 5), jnp.float32)
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> acc = sam_optax.diagnostics.linear_probe_accuracy(x[:100], y[:100],
    ...     test_features=x[100:], test_labels=y[100:])
    >>> print('{:.2E}'.format(acc))
    9.60E-01

  References:
    Alain & Bengio, `Understanding intermediate layers using linear classifier
    probes <https://arxiv.org/abs/1610.01644>`_, 2016.
  """
  name = common.PREFIX + "linear_probe_accuracy"
  x = jnp.asarray(features)
  n = x.shape[0] if x.ndim else 0
  x = numerics.f32(jnp.reshape(x, (n, -1)))
  y = _labels_1d(name, labels, n)
  if (test_features is None) != (test_labels is None):
    raise ValueError(diag_checks.TEST_SET_HALF.format(name=name))
  if test_features is None:
    xt, yt = x, y
  else:
    xt = jnp.asarray(test_features)
    xt = jnp.reshape(xt, (xt.shape[0], -1)).astype(x.dtype)
    if xt.shape[1] != x.shape[1]:
      raise ValueError(diag_checks.TEST_FEATURES_WIDTH.format(
          name=name, d_test=xt.shape[1], d=x.shape[1]))
    yt = _labels_1d(name, test_labels, xt.shape[0])
  diag_checks.check_positive(diag_checks.BAD_L2, name, "l2", l2)
  c = _num_classes(name, num_classes, y, yt)
  _check_finite(name, "features", x)
  _check_label_range(name, "labels", y, c)
  if test_features is not None:
    _check_finite(name, "test_features", xt)
    _check_label_range(name, "test_labels", yt, c)
  return jax.jit(lambda *args: _ridge_probe(*args, c))(x, y, xt, yt, l2)


def _ridge_probe(x, y, xt, yt, l2, c):
  """The computation of :func:`linear_probe_accuracy`."""
  n, d = x.shape
  targets = jax.nn.one_hot(y, c, dtype=x.dtype)
  mu_x, mu_y = jnp.mean(x, 0), jnp.mean(targets, 0)
  xc, yc = x - mu_x, targets - mu_y
  variance = jnp.sum(xc * xc) / d
  ridge = l2 * jnp.where(variance > 0, variance, 1.0)
  if d <= n:
    w = jnp.linalg.solve(xc.T @ xc + ridge * jnp.eye(d, dtype=x.dtype), xc.T @ yc)
  else:
    w = xc.T @ jnp.linalg.solve(xc @ xc.T + ridge * jnp.eye(n, dtype=x.dtype), yc)
  pred = jnp.argmax((xt - mu_x) @ w + mu_y, axis=-1).astype(yt.dtype)
  accuracy = jnp.mean((pred == yt).astype(jnp.float32))
  # What the eager checks raise for: NaN, not a number that looks measured.
  valid = (jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(xt))
           & jnp.all((y >= 0) & (y < c)) & jnp.all((yt >= 0) & (yt < c)))
  return jnp.where(valid, accuracy, jnp.nan)


def feature_reliance(
    representation_fn: Callable,
    params,
    probes: Mapping[str, tuple[Any, Any]],
    *,
    train_fraction: float = 0.5,
    num_classes: Optional[int] = None,
    l2: float = 1e-3,
) -> dict[str, jax.Array]:
  r"""Per-feature linear-probe accuracy of a model's representation.

  Measures how well a representation :math:`\phi_w` encodes each of several
  features (the "feature quality" of Springer et al.). For each named
  feature, ``probes`` holds inputs in which only that feature carries the
  probe's label (for two blocks: the other block is shuffled across examples,
  or replaced by noise) together with that label. The representation of the
  first ``train_fraction`` of the examples trains a
  :func:`linear_probe_accuracy` probe; the accuracy on the rest is reported:

  .. math::
    \operatorname{reliance}_j = \operatorname{acc}\big(\text{probe trained on }
      \phi_w(x^{(j)}_{\mathrm{train}}),\ \text{tested on }
      \phi_w(x^{(j)}_{\mathrm{test}})\big).

  Chance level means the representation has not learned feature ``j``; SAM's
  balanced feature learning shows as higher accuracy on the feature that
  plain training neglects. For a two-layer network the weights themselves
  give a cheaper answer: :func:`block_contributions`.

  Args:
    representation_fn: ``(params, inputs) -> [n, ...]`` features (e.g. the
      penultimate layer, or the model's outputs): one array, not a tuple.
    params: the model's params.
    probes: ``{feature name: (inputs, labels)}``, ``labels`` ``[n]`` integers.
      Shuffle the examples beforehand: the split is by position.
    train_fraction: fraction of each probe set used to fit the probe, in
      ``(0, 1)``; default 0.5.
    num_classes: number of classes; default read from the labels.
    l2: relative ridge strength of the probe.

  Returns:
    ``{feature name: held-out probe accuracy}`` (float32 scalars).

  Examples:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> y = jax.random.bernoulli(k1, jnp.float32(0.5), (400,)).astype(jnp.int32)
    >>> noise = jax.random.normal(k2, (400, 2), jnp.float32)
    >>> sign = (2 * y - 1)[:, None].astype(jnp.float32)
    >>> easy_only = jnp.concatenate([sign + 0.1 * noise[:, :1], noise[:, 1:]], 1)
    >>> hard_only = jnp.concatenate([noise[:, :1], sign + 0.1 * noise[:, 1:]], 1)
    >>> rep = lambda w, x: jnp.tanh(x @ w)  # a representation that ignores block 2
    >>> w = jnp.array([[1.0, -1.0], [0.0, 0.0]], jnp.float32)
    >>> out = sam_optax.diagnostics.feature_reliance(
    ...     rep, w, {'easy': (easy_only, y), 'hard': (hard_only, y)})
    >>> print({k: '{:.2E}'.format(v) for k, v in out.items()})
    {'easy': '1.00E+00', 'hard': '5.05E-01'}

  References:
    Springer, Nagarajan & Raghunathan, `Sharpness-Aware Minimization Enhances
    Feature Quality via Balanced Feature Learning
    <https://arxiv.org/abs/2405.20439>`_, ICLR 2024.

    Kirichenko, Izmailov & Wilson, `Last Layer Re-Training is Sufficient for
    Robustness to Spurious Correlations <https://arxiv.org/abs/2204.02937>`_,
    ICLR 2023.
  """
  name = common.PREFIX + "feature_reliance"
  if not (isinstance(train_fraction, numbers.Real) and 0 < train_fraction < 1):
    raise ValueError(diag_checks.BAD_TRAIN_FRACTION.format(
        name=name, train_fraction=train_fraction))
  if not isinstance(probes, Mapping) or not probes:
    raise ValueError(diag_checks.BAD_PROBES.format(name=name))
  out = {}
  for key, probe in probes.items():
    if not (isinstance(probe, (tuple, list)) and len(probe) == 2):
      raise ValueError(diag_checks.PROBE_NOT_PAIR.format(
          name=name, key=key, kind=type(probe).__name__))
    inputs, labels = probe
    labels = jnp.asarray(labels)
    feats = representation_fn(params, inputs)
    if not isinstance(feats, (jax.Array, np.ndarray)) or feats.ndim == 0:
      got = (f"a {type(feats).__name__} of length {len(feats)}"
             if isinstance(feats, (tuple, list)) else
             f"a {type(feats).__name__} of shape {jnp.shape(feats)}"
             if hasattr(feats, "shape") else f"a {type(feats).__name__}")
      raise TypeError(diag_checks.REPRESENTATION_NOT_ARRAY.format(
          name=name, key=key, got=got))
    n = feats.shape[0]
    if labels.ndim == 1 and labels.shape[0] != n:
      raise ValueError(diag_checks.REPRESENTATION_WRONG_LENGTH.format(
          name=name, key=key, shape=feats.shape, n=labels.shape[0]))
    n_train = int(round(train_fraction * n))
    if not 0 < n_train < n:
      raise ValueError(diag_checks.PROBE_SET_TOO_SMALL.format(
          name=name, key=key, n=n, train_fraction=train_fraction))
    out[key] = linear_probe_accuracy(
        feats[:n_train], labels[:n_train], test_features=feats[n_train:],
        test_labels=labels[n_train:], num_classes=num_classes, l2=l2)
  return out


Indices = Union[slice, Sequence[int], np.ndarray, jax.Array]


def block_contributions(kernel, head, blocks: Mapping[str, Indices]) -> dict[str, jax.Array]:
  r"""How much a two-layer network's output draws on each block of inputs.

  For :math:`f(x) = \sum_j v_j\, \sigma(w_j^\top x + b_j)` with hidden units
  :math:`j` (``kernel[:, j]`` is :math:`w_j`, ``head[j]`` is :math:`v_j`),
  the contribution of the input coordinates :math:`B` is

  .. math::
    c_B = \sum_j \|v_j\|_2\, \|w_{j,B}\|_2,

  the weight a unit puts on the block times how much the output uses that
  unit. If each unit reads a single block (unit ``e`` the easy block, unit
  ``h`` the hard one) the ratio :math:`c_h / c_e = |v_h|\,\|w_h\| /
  (|v_e|\,\|w_e\|)` is the hard-over-easy reliance of the balanced-feature
  experiment: near 0 when the network ignores the hard feature (plain
  gradient descent, simplicity bias), larger under SAM.

  Args:
    kernel: first-layer weights ``[d_in, hidden]`` (the ``x @ kernel``
      convention of ``flax.linen.Dense``).
    head: second-layer weights ``[hidden]`` or ``[hidden, d_out]``.
    blocks: ``{block name: input coordinates}``; coordinates as a slice, a
      list of distinct ints in ``[-d_in, d_in)`` (negative ones count from
      the end) or a boolean mask of length ``d_in``. An index out of range or
      repeated raises ``ValueError``; an empty block (``[]``, an empty slice
      or an all-False mask) reads no weight and contributes 0.

  Returns:
    ``{block name: c_B}`` (float32 scalars).

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> kernel = jnp.array([[2.0, 0.0], [0.0, 0.3]])  # rows: x_easy, x_hard
    >>> head = jnp.array([1.5, 0.5])
    >>> c = sam_optax.diagnostics.block_contributions(
    ...     kernel, head, {'easy': [0], 'hard': [1]})
    >>> print('{:.2E}'.format(c['hard'] / c['easy']))
    5.00E-02

  References:
    Springer, Nagarajan & Raghunathan, `Sharpness-Aware Minimization Enhances
    Feature Quality via Balanced Feature Learning
    <https://arxiv.org/abs/2405.20439>`_, ICLR 2024.
  """
  name = common.PREFIX + "block_contributions"
  kernel = jnp.asarray(kernel)
  head = jnp.asarray(head)
  if kernel.ndim != 2 or head.ndim not in (1, 2) or head.shape[0] != kernel.shape[1]:
    raise ValueError(diag_checks.BAD_TWO_LAYER_SHAPES.format(
        name=name, kernel=kernel.shape, head=head.shape))
  kernel, head = numerics.f32(kernel), numerics.f32(head)
  head_norms = jnp.abs(head) if head.ndim == 1 else jnp.linalg.norm(head, axis=1)
  out = {}
  for key, idx in blocks.items():
    if not isinstance(idx, slice):
      idx = _block_rows(name, key, idx, kernel.shape[0])
    rows = kernel[idx]
    out[key] = jnp.sum(head_norms * jnp.linalg.norm(rows, axis=0))
  return out


def _block_rows(name, key, idx, d_in) -> np.ndarray:
  """The input indices of block ``key`` (a list or a mask), checked."""
  bad = diag_checks.BAD_BLOCK_INDICES
  if isinstance(idx, jax.core.Tracer):
    raise TypeError(bad.format(name=name, key=key, d_in=d_in, got="a traced array"))
  try:
    idx = np.asarray(idx)
  except (TypeError, ValueError):
    raise TypeError(bad.format(name=name, key=key, d_in=d_in,
                               got=f"a {type(idx).__name__}")) from None
  if idx.dtype == bool:
    if idx.shape != (d_in,):
      raise ValueError(diag_checks.BAD_BLOCK_MASK.format(
          name=name, key=key, shape=idx.shape, d_in=d_in))
    return np.flatnonzero(idx)
  if idx.size == 0:  # `[]` is a float64 array to numpy: no input, contribution 0.
    return np.zeros((0,), np.int32)
  if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
    raise TypeError(bad.format(name=name, key=key, d_in=d_in,
                               got=f"shape {idx.shape} and dtype {idx.dtype}"))
  outside = idx[(idx < -d_in) | (idx >= d_in)]
  if outside.size:
    raise ValueError(diag_checks.BLOCK_INDEX_OUT_OF_RANGE.format(
        name=name, key=key, index=int(outside[0]), d_in=d_in))
  rows = idx % d_in
  unique, counts = np.unique(rows, return_counts=True)
  if (counts > 1).any():
    raise ValueError(diag_checks.BLOCK_INDEX_REPEATED.format(
        name=name, key=key, index=int(unique[counts > 1][0])))
  return rows
