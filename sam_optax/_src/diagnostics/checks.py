"""Checks and messages of the diagnostics that no transform shares.

Where a diagnostic's input means what a transform's does, the diagnostics use
the core's check and message (:mod:`sam_optax._src.checks`): ``m``, ``loss_fn``,
params, an empty or ragged batch.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sam_optax._src import checks
from sam_optax._src import messages


BAD_POSITIVE_INT = (
    "`{name}({arg}={value!r})`: {arg} {meaning} and must be a positive Python "
    "integer (it fixes the shape of the computation, so it cannot be a traced "
    "array). Use for example `{arg}={example}`."
)
BAD_RADIUS = (
    "`{name}(rho={rho!r})`: ρ is the radius of the perturbation ball and must "
    "be a finite number ≥ 0. Pass the radius you train with, for example "
    "`rho=0.05`."
)
BAD_STEP_SIZE = (
    "`{name}(step_size={step_size!r})`: the ascent step size η must be a "
    "finite number > 0, or None for η = ρ."
)
M_NOT_DIVIDING_BATCH = (
    "`{name}(m={m})`: m (examples per perturbation) must divide the batch "
    "size, but the batch has {b} examples. Pick m among the divisors of {b} "
    "({divisors}), or pass `m=None` for one group."
)
NO_PARAMS = (
    "`{name}`: `params` has no array leaves, or only leaves of size 0, so "
    "there is no parameter to measure (the Hessian is 0×0). Pass the model's "
    "params pytree."
)
VECTOR_NOT_LIKE_PARAMS = (
    "`{name}`: `vector` must be a pytree of the same structure as `params`; "
    "got {vector} for params {params}."
)
BAD_EIGENVALUE_COUNT = (
    "`{name}(k={k!r}, num_iters={num_iters!r})`: k eigenvalues need at least k "
    "Lanczos steps and at most as many as there are parameters ({dim}). Use "
    "1 ≤ k ≤ num_iters ≤ {dim}, for example `k={k_ex}, num_iters={it_ex}`."
)
BAD_HESSIAN_METHOD = (
    "`{name}(method={method!r})`: unknown method; use `method='lanczos'` "
    "(default, accurate, keeps num_iters vectors) or `method='power'` (keeps "
    "two vectors)."
)
BAD_LABELS = (
    "`{name}`: `labels` must be a 1-D integer array of class indices with one "
    "entry per example; got shape {shape} and dtype {dtype} for {n} examples."
)
LABEL_OUT_OF_RANGE = (
    "`{name}`: `{arg}` must hold class indices 0 ≤ y < num_classes ({c}); "
    "entry {index} is {value}. Map the labels to 0, 1, ..., num_classes − 1 "
    "(and pass `num_classes=` if some class is absent from them)."
)
NON_FINITE_FEATURES = (
    "`{name}`: `{arg}` has {count} non-finite value(s) (NaN or ±inf), the "
    "first in example {index}; the probe would be fitted on garbage. Drop or "
    "repair those examples."
)
NUM_CLASSES_NEEDED = (
    "`{name}`: the labels are traced (inside `jax.jit`), so the number of "
    "classes cannot be read from them. Pass `num_classes=` explicitly."
)
TEST_SET_HALF = (
    "`{name}`: pass both `test_features` and `test_labels`, or neither (then "
    "the accuracy is measured on the training features)."
)
TEST_FEATURES_WIDTH = (
    "`{name}`: `test_features` have {d_test} features per example but "
    "`features` have {d}."
)
BAD_L2 = (
    "`{name}(l2={l2!r})`: the relative ridge strength must be a finite number "
    "> 0 (it keeps the probe well posed). Use for example `l2=1e-3`."
)
BAD_TRAIN_FRACTION = (
    "`{name}(train_fraction={train_fraction!r})`: the probe is fitted on this "
    "fraction of each probe set and tested on the rest, so it must be in "
    "(0, 1). Use for example `train_fraction=0.5`."
)
BAD_PROBES = (
    "`{name}`: `probes` must be a non-empty dict "
    "`{{feature name: (inputs, labels)}}`."
)
PROBE_SET_TOO_SMALL = (
    "`{name}`: probe set {key!r} has {n} examples, too few to split with "
    "train_fraction={train_fraction}."
)
BAD_TWO_LAYER_SHAPES = (
    "`{name}`: expected `kernel` of shape [d_in, hidden] and `head` of shape "
    "[hidden] or [hidden, d_out]; got {kernel} and {head}."
)
BAD_BLOCK_MASK = (
    "`{name}`: the boolean mask of block {key!r} has shape {shape}; it needs "
    "one entry per input ({d_in})."
)
BAD_BLOCK_INDICES = (
    "`{name}`: the coordinates of block {key!r} must be a slice, a 1-D "
    "sequence of integer input indices or a boolean mask of length {d_in} "
    "(concrete, not traced); got {got}."
)
BLOCK_INDEX_OUT_OF_RANGE = (
    "`{name}`: block {key!r} lists input index {index}, but `kernel` has "
    "{d_in} inputs (rows); indices must be in [0, {d_in}) (negative ones "
    "count from the end, down to −{d_in})."
)
BLOCK_INDEX_REPEATED = (
    "`{name}`: block {key!r} lists input {index} more than once; each input "
    "belongs in a block once (a repeat would count its weights twice)."
)
PROBE_NOT_PAIR = (
    "`{name}`: probe set {key!r} must be a pair `(inputs, labels)`; got a "
    "{kind}."
)
REPRESENTATION_NOT_ARRAY = (
    "`{name}`: `representation_fn(params, inputs)` must return one array of "
    "features `[n, ...]` (n = examples); for probe set {key!r} it returned "
    "{got}. Return the one representation to probe (e.g. `outputs[0]`)."
)
REPRESENTATION_WRONG_LENGTH = (
    "`{name}`: `representation_fn(params, inputs)` returned features of shape "
    "{shape} for probe set {key!r}, whose labels have {n} entries; it must "
    "return one row of features per example."
)


def check_positive_int(name: str, arg: str, value, meaning: str,
                       example) -> int:
  """A count that shapes a diagnostic's computation: a Python int ≥ 1."""
  if not checks.is_positive_int(value):
    raise ValueError(BAD_POSITIVE_INT.format(
        name=name, arg=arg, value=value, meaning=meaning, example=example))
  return int(value)


def check_group_size(name: str, m) -> Optional[int]:
  """A diagnostic's ``m``: examples per perturbation, or None for one group."""
  if m is None:
    return None
  if not checks.is_positive_int(m):
    raise ValueError(messages.BAD_M.format(
        name=name, m=m, alt=" (or None for one group: the whole batch)"))
  return int(m)


def check_radius(name: str, rho) -> None:
  """A diagnostic's ρ: the rule of :func:`checks.check_rho`, said of a radius."""
  try:
    checks.check_rho(name, rho)
  except ValueError:
    raise ValueError(BAD_RADIUS.format(name=name, rho=rho)) from None


def check_positive(template: str, name: str, arg: str, value, **fields) -> None:
  """A concrete finite number > 0 (the core's :func:`checks.check_range`).

  Raises ``ValueError(template)`` otherwise, bools and callables included;
  arrays that are not concrete numbers (possibly traced) are let through.
  """
  try:
    checks.check_range(name, arg, value, low=0.0, low_open=True)
  except (TypeError, ValueError):
    raise ValueError(template.format(name=name, **{arg: value}, **fields)) from None


def whole_batch_size(name: str, batch, m: Optional[int]) -> int:
  """The leading size b of a diagnostic's ``batch``; m (None: b) divides it.

  As :func:`checks.batch_size` (whose messages an empty or ragged batch gets), but
  the batch is the whole one, not a device's share of it.
  """
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    return checks.batch_size(name, () if batch is None else batch, m)  # raises
  (b,) = sizes
  if m is not None and b % m:
    raise ValueError(M_NOT_DIVIDING_BATCH.format(
        name=name, m=m, b=b, divisors=checks.divisors(b)))
  return b
