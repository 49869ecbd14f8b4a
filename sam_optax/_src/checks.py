"""Every check of a sharpness-aware call, and every message template.

Each message says the call, what is wrong, why, and the exact fix. Knobs are
checked once, at construction, when concrete (``inject_hyperparams`` passes
arrays, which pass unchecked); ρ given as a JAX array is checked when the
state is built (``init``), since ``inject_hyperparams`` also passes its
run-time ρ to the factory. An ``update`` call (its arguments, the state's
shapes, ``mask=`` and ``rho_scale=``) is checked at trace time.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

# --- Message templates (asserted by the tests). ------------------------------

MISSING_LOSS_FN = (
    "`{name}.update` needs the keyword argument `loss_fn` (received none). "
    "A sharpness-aware step re-evaluates the loss at the perturbed params, so "
    "call `tx.update(grads, state, params, loss_fn=loss_fn)` where "
    "`loss_fn(params)` returns the scalar loss of the current batch{aux_hint}."
)


class MissingLossFnError(TypeError):
  """``update`` of a transform that needs ``loss_fn`` was called without it.

  Adapters (the Flax train states and optimizer) catch it to restate the fix in
  their own call; a transform that needs no ``loss_fn`` (MSAM) never raises it.
  """


MISSING_PARAMS = (
    "`{name}.update` needs `params` (received None): the perturbation is "
    "applied to the current params. Call `tx.update(grads, state, params, "
    "loss_fn=loss_fn)`."
)
TREE_MISMATCH = (
    "`{name}.update`: `updates` and `params` have different tree structures "
    "(updates: {updates}; params: {params}). Pass the gradient of `loss_fn` "
    "with respect to exactly the params given to `update`."
)
NON_FLOAT_PARAMS = (
    "`{name}`: params leaf {path} has dtype {dtype}; params must be floating "
    "point: the perturbed pass differentiates `loss_fn` with respect to every "
    "params leaf (as `jax.grad` does, which rejects integer inputs), so "
    "neither `mask=` nor `optax.masked` can exclude an integer leaf. Keep "
    "integer state (counters, indices) out of the params tree: pass it to "
    "`loss_fn` by closure or with the batch."
)
LOSS_RETURNED_TUPLE = (
    "`{name}`: `loss_fn` returned a {kind} of length {n}, but `has_aux=False`. "
    "If it returns `(loss, aux)`, create the transform with `has_aux=True`; "
    "otherwise make `loss_fn` return the scalar loss."
)
LOSS_NOT_AUX_PAIR = (
    "`{name}(..., has_aux=True)`: `loss_fn` must return a pair `(loss, aux)`, "
    "but it returned {got}. Return `(loss, aux)`, or drop `has_aux=True` if "
    "the loss has no auxiliary output."
)
LOSS_NOT_SCALAR = (
    "`{name}`: `loss_fn` must return a scalar loss, but it returned an array "
    "of shape {shape}. Reduce it (for example `jnp.mean(per_example_loss)`)."
)
BAD_VALUE = (
    "`{name}.update(..., value=...)`: value is the unperturbed loss L(w), a "
    "scalar; got a non-scalar {got}. With `has_aux=True`, `jax.value_and_grad` returns "
    "`((loss, aux), grads)`: pass `value=loss`, not the pair."
)
LOSS_NOT_FLOAT = "`{name}`: `loss_fn` must return a floating-point loss, but it returned dtype {dtype}."
BAD_RHO = (
    "`{name}(rho={rho!r})`: ρ must be a finite number ≥ 0 (or an optax "
    "schedule). Use `rho=0.05` for plain SAM; `rho=0` gives the base optimizer."
)
RHO_NOT_A_NUMBER = (
    "`{name}(rho={rho!r})`: ρ must be a float (or a scalar array, or an optax "
    "schedule `count -> ρ`), got {kind}. A value read from a config file "
    "arrives as a string: convert it, `rho=float(value)`."
)
KNOB_NOT_A_NUMBER = (
    "`{name}({arg}={value!r})`: {arg} must be a number, got {kind}. A value "
    "read from a config file arrives as a string: convert it, "
    "`{arg}=float(value)`."
)
BAD_P = (
    "`{name}(p={p!r})`: the perturbation norm p must be > 1 (for example "
    "`p=2`, the default, or `p=float('inf')`); p = 1 has no well-defined "
    "steepest-ascent direction."
)
UNNORMALIZED_P = (
    "`{name}(normalize=False, p={p!r})`: the unnormalized step (USAM) is "
    "`ε = ρ g` and has no norm; drop `p` or use `normalize=True`."
)
AXIS_NOT_BOUND = (
    "`{name}(..., axis_name={axis!r})`: no axis named {axis!r} is bound here. "
    "Call `update` inside `jax.shard_map` or `jax.pmap` over that axis, or "
    "pass `axis_name=None` for single-device (or plain `jit`) training."
)
STATIC_ARG = (
    "`{name}`: `{arg}` is structural (it selects the computation) and cannot "
    "be a traced or injected array. With `optax.inject_hyperparams`, list it "
    "in `static_args`: `optax.inject_hyperparams({name}, "
    "static_args=('{arg}',))(...)`."
)
INSIDE_OPTAX_MASKED = (
    "`{name}` inside `optax.masked`: the masked wrapper hands the transform "
    "only part of the params, but `loss_fn` needs all of them. To perturb "
    "only some leaves, use the transform's own option instead: "
    "`{name}(..., mask=mask)`. (Integer leaves cannot be masked out either "
    "way: keep them out of the params tree.)"
)

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

BAD_GROUP_LOOP = (
    "`{name}(group_loop={loop!r})`: unknown way to run over the groups of m "
    "examples. Use 'vmap' (all groups in one vectorized pass; the default), "
    "'scan' (one group at a time in a loop: memory of one perturbed copy of "
    "the params) or 'unroll' (one group at a time, unrolled into the "
    "compiled program)."
)
BAD_M = (
    "`{name}(m={m!r})`: m is the number of examples per perturbation and must "
    "be a positive integer{alt}."
)
M_WITH_STATEFUL_RULE = (
    "`{name}(m={m})`: this method keeps state across steps and cannot give "
    "each group of examples its own perturbation. Drop `m`, or use "
    "`axis_name` for one perturbation per device."
)
GROUP_LOOP_WITHOUT_M = (
    "`{name}(group_loop={loop!r})`: group_loop says how the groups of m "
    "examples run (in-device m-sharpness), but `m` is not set, so there are no "
    "groups. Set `m=` (and pass `batch=` to `update`), or drop `group_loop`."
)
BAD_AXIS_NAME = (
    "`{name}(axis_name={axis!r})`: expected a mapped axis name (a str, or a "
    "tuple of str), as given to `jax.pmap` or `jax.shard_map`."
)
LEAFWISE_MISMATCH = (
    "`{name}(...)`, argument `{arg}`: the {arg} tree does not match the params "
    "tree (params: {params}; {arg}: {tree}). Give {what} per params leaf, or a "
    "callable `params -> {arg}`."
)
MASK_SELECTS_NOTHING = (
    "`{name}(..., mask=...)`: the mask selects no params leaf (every leaf is "
    "False), so ε would be 0 and every step would be the base optimizer's "
    "at twice the cost. Select at least one leaf{hint}."
)
NORMALIZATION_MASK_HINT = (
    ": `sam_optax.normalization_params_mask` marks a leaf when a module name "
    "in its path (dict keys, attribute names, and the parts of a flat key "
    "such as 'h.0.ln_1.weight', split at '.' and '/') contains 'norm' or is "
    "bn/ln/gn with an optional index or suffix. Name your normalization "
    "layers so, or build the mask with `sam_optax.path_mask(lambda path, "
    "leaf: ...)`"
)
MASK_LEAF_NOT_BOOL = (
    "`{name}(..., mask=...)`: mask leaf {path} is {got}; `mask` takes one "
    "bool per params leaf (True: perturb that leaf, False: leave it "
    "unperturbed). {fix}"
)
MASK_LEAF_ARRAY_FIX = (
    "A mask selects whole leaves: to perturb part of a leaf, split that "
    "leaf into two params leaves."
)
MASK_LEAF_TRACED_FIX = (
    "The mask must be known when the step is traced (it selects the "
    "computation): decide it from the params' paths, shapes and dtypes, not "
    "from their values."
)
MASK_CALLABLE_FAILED = (
    "`{name}(..., mask=<callable>)`: the mask callable raised {error} when "
    "called on the params' shapes and dtypes. A mask callable receives the "
    "params tree with `jax.ShapeDtypeStruct` leaves (`.shape`, `.ndim`, "
    "`.dtype`; paths via `sam_optax.path_mask`), not their values, so that "
    "the same leaves are perturbed at every step, eagerly and under `jit`. "
    "Decide from paths, shapes and dtypes (the original error is chained "
    "below)."
)
STATE_MISMATCH = (
    "`{name}.update`: the optimizer state does not match `params` "
    "({detail}). The state was built by `tx.init` for other params; build "
    "it for the params you pass to `update`: `state = tx.init(params)`."
)
REMOVE_PERTURBATION_MISMATCH = (
    "`sam_optax.remove_perturbation`: `params` do not match the `msam` state "
    "in `opt_state` ({detail}). Pass the params of the training loop that "
    "made `opt_state` (the tree given to `tx.init`, as returned by "
    "`optax.apply_updates`)."
)
BAD_RHO_SCALE = (
    "`{name}(..., rho_scale=...)`: leaf {path} is {leaf!r}; per-leaf ρ "
    "multipliers must be finite numbers ≥ 0 (0 leaves that leaf unperturbed, 1 "
    "keeps ρ)."
)
KNOB_IS_CALLABLE = (
    "`{name}({arg}=<callable>)`: {arg} must be a number (or a scalar array), "
    "not a schedule. To change it during training, build the optimizer with "
    "`optax.inject_hyperparams({name})(...)` and set "
    "`state.hyperparams['{arg}']`."
)
KNOB_IS_BOOL = "`{name}({arg}={value!r})`: expected a number, got a bool."
KNOB_NOT_SCALAR = "`{name}({arg}=...)`: {arg} must be a scalar, got shape {shape}."
KNOB_OUT_OF_RANGE = "`{name}({arg}={value!r})`: {arg} must be a finite number {interval}.{hint}"
BAD_K = (
    "`{name}(k={k!r})`: k is the number of steps from one SAM step to the next "
    "and must be an integer ≥ 1 (k=1 runs SAM on every step). The papers use "
    "k=5."
)
BAD_ASAM_OPERATOR = (
    "`{name}(operator={operator!r})`: unknown normalization operator. Use "
    "'official' (T_w = |w| + η on weight matrices, 1 on biases; the default), "
    "'all' (|w| + η on every leaf) or 'abs' (|w| on every leaf, no η)."
)
EMPTY_BATCH = "`{name}(m={m})`: `batch` has no arrays."
RAGGED_BATCH = (
    "`{name}(m={m})`: every leaf of `batch` needs the same leading batch axis; "
    "got leading sizes {sizes}."
)
RULE_STATE_STRUCTURE = (
    "A perturbation rule's `ascent` must return a rule state with the same "
    "tree structure as the one it received."
)
LR_MAX_NEEDED = (
    "`{name}(..., lr_max=None)`: with a learning-rate schedule, pass its peak "
    "value `lr_max=` (and its final value `lr_min=`), so that ρ goes from "
    "rho_max at the peak to rho_min at the end."
)
LR_MAX_BELOW_MIN = (
    "`{name}(lr_max={lr_max!r}, lr_min={lr_min!r})`: lr_max must be ≥ lr_min "
    "(the peak and the final learning rate)."
)
GET_INFO_NOT_ONE = (
    "`sam_optax.get_info`: expected exactly one sharpness-aware block in the "
    "optimizer state, found {found}. Pass the state returned by a `sam_optax` "
    "transform (or the part of it that belongs to one)."
)
REMOVE_PERTURBATION_NOT_ONE = (
    "`sam_optax.remove_perturbation`: expected the state of exactly one "
    "`sam_optax.msam` in `opt_state`, found {found}. Only MSAM hands back "
    "perturbed params (every other sam_optax transform returns unperturbed "
    "ones, so there is nothing to remove); pass the state returned by "
    "`tx.update` of an `msam` optimizer."
)


# --- Hyper-parameters, at construction. ---------------------------------------

_NUMBER = (numbers.Real, np.ndarray, np.generic)  # concrete, checkable


def concrete(x) -> Optional[np.ndarray]:
  """``x`` as a numpy array if its value is known now; ``None`` if traced."""
  if isinstance(x, jax.Array):
    try:
      return np.asarray(x)
    except jax.errors.JAXTypeError:  # a tracer: known only at run time
      return None
  return np.asarray(x)


def _kind(value) -> str:
  return f"a {type(value).__name__}"


def check_rho(name: str, rho) -> None:
  """ρ at construction: a schedule, or a number / scalar array.

  Python and NumPy numbers are checked here (finite, ≥ 0); any array must be
  a real scalar. The value of a JAX array is checked by
  :func:`check_rho_array` when the state is built (``init``), not here:
  ``optax.inject_hyperparams`` calls the factory at every step with the
  run-time ρ as an array, which is clamped at 0 as documented.
  """
  if callable(rho):
    return
  if isinstance(rho, bool) or not isinstance(rho, _NUMBER + (jax.Array,)):
    raise TypeError(RHO_NOT_A_NUMBER.format(name=name, rho=rho,
                                            kind=_kind(rho)))
  if np.ndim(rho) != 0:
    raise ValueError(KNOB_NOT_SCALAR.format(name=name, arg="rho",
                                            shape=np.shape(rho)))
  dtype = jnp.result_type(rho)
  if dtype == jnp.bool_ or not (jnp.issubdtype(dtype, jnp.integer)
                                or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(RHO_NOT_A_NUMBER.format(
        name=name, rho=rho, kind=f"an array of dtype {dtype}"))
  if not isinstance(rho, jax.Array):
    check_rho_array(name, rho)


def check_rho_array(name: str, rho) -> None:
  """A concrete ρ (a number or array known now) is finite and ≥ 0."""
  if callable(rho):
    return
  v = concrete(rho)
  if v is None:
    return
  v = float(v)
  if not math.isfinite(v) or v < 0:
    raise ValueError(BAD_RHO.format(name=name, rho=rho))


def check_range(name: str, arg: str, value: Any, *, low: float = 0.0,
                high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> None:
  """Raises for a concrete number outside the range; arrays pass unchecked."""
  if callable(value):
    raise TypeError(KNOB_IS_CALLABLE.format(name=name, arg=arg))
  if isinstance(value, bool):
    raise TypeError(KNOB_IS_BOOL.format(name=name, arg=arg, value=value))
  if isinstance(value, (str, bytes)):
    raise TypeError(KNOB_NOT_A_NUMBER.format(name=name, arg=arg, value=value,
                                             kind=_kind(value)))
  if not isinstance(value, _NUMBER):
    return
  if np.ndim(value) != 0:
    raise ValueError(KNOB_NOT_SCALAR.format(name=name, arg=arg,
                                            shape=np.shape(value)))
  v = float(np.asarray(value))
  ok = math.isfinite(v) and (v > low if low_open else v >= low)
  if high is not None:
    ok = ok and (v < high if high_open else v <= high)
  if not ok:
    interval = (f"{'>' if low_open else '≥'} {low:g}" if high is None else
                f"in {'(' if low_open else '['}{low:g}, {high:g}"
                f"{')' if high_open else ']'}")
    raise ValueError(KNOB_OUT_OF_RANGE.format(
        name=name, arg=arg, value=value, hint=hint, interval=interval))


def check_static(name: str, arg: str, value) -> None:
  if isinstance(value, jax.Array):  # a traced or injected array
    raise TypeError(STATIC_ARG.format(name=name, arg=arg))


def is_positive_int(value) -> bool:
  return isinstance(value, numbers.Integral) and value >= 1 and value is not True


def check_k(name: str, k: Any) -> int:  # steps between SAM steps: an int ≥ 1
  check_static(name, "k", k)
  if not is_positive_int(k):
    raise ValueError(BAD_K.format(name=name, k=k))
  return int(k)


def check_p(name: str, p, normalize: bool) -> float:
  """The norm ``p`` of the ρ-ball (``None`` means 2), as a float."""
  if p is None:
    return 2.0
  check_static(name, "p", p)
  try:
    p = float(p)
  except (TypeError, ValueError):
    raise ValueError(BAD_P.format(name=name, p=p)) from None
  if math.isnan(p) or p <= 1:
    raise ValueError(BAD_P.format(name=name, p=p))
  if not normalize and p != 2:
    raise ValueError(UNNORMALIZED_P.format(name=name, p=p))
  return p


def check_choice(template: str, value, choices, **fields) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(template.format(**fields))
  return value


def check_rho_scale(name: str, rho_scale) -> None:
  """Raises for concrete negative or non-finite per-leaf ρ multipliers.

  Concrete leaves (numbers, NumPy and JAX arrays known now) are checked;
  traced ones are used as given.
  """
  if rho_scale is None or callable(rho_scale):
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(rho_scale):
    bad = isinstance(leaf, (bool, str, bytes))
    if not bad and isinstance(leaf, _NUMBER + (jax.Array,)):
      v = concrete(leaf)
      if v is None:
        continue
      v = v.astype(np.float64) if v.dtype != np.bool_ else v
      bad = (v.dtype == np.bool_ or not np.all(np.isfinite(v))
             or np.any(v < 0))
    if bad:
      raise ValueError(BAD_RHO_SCALE.format(
          name=name, path=jax.tree_util.keystr(path), leaf=leaf))


GROUP_LOOPS = ("vmap", "scan", "unroll")


def check_placement(name: str, *, axis_name, m, group_loop,
                    supports_groups: bool = True) -> None:
  """``axis_name``, ``m`` and ``group_loop`` of a transform's factory."""
  check_static(name, "m", m)
  if m is not None:
    if not is_positive_int(m):
      raise ValueError(BAD_M.format(
          name=name, m=m, alt=" (or None for one perturbation per batch)"))
    if not supports_groups:
      raise ValueError(M_WITH_STATEFUL_RULE.format(name=name, m=m))
  check_choice(BAD_GROUP_LOOP, group_loop, GROUP_LOOPS, name=name,
               loop=group_loop)
  if m is None and group_loop != "vmap":
    raise ValueError(GROUP_LOOP_WITHOUT_M.format(name=name, loop=group_loop))
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(BAD_AXIS_NAME.format(name=name, axis=axis_name))


# --- Params and the loss function. ----------------------------------------------

def check_float_params(name: str, params) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(NON_FLOAT_PARAMS.format(
          name=name, path=jax.tree_util.keystr(path) or "<root>", dtype=dtype))


def checked_loss(loss_fn: Callable, has_aux: bool, name: str) -> Callable:
  """Wraps ``loss_fn`` so that it returns ``(loss, aux)`` or raises clearly."""

  def wrapped(*args):
    out = loss_fn(*args)
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = (f"a {type(out).__name__} of length {len(out)}"
               if isinstance(out, (tuple, list)) else
               f"a single value of shape {jnp.shape(out)}")
        raise TypeError(LOSS_NOT_AUX_PAIR.format(name=name, got=got))
      loss, aux = out
    else:
      if isinstance(out, (tuple, list)):
        raise TypeError(LOSS_RETURNED_TUPLE.format(
            name=name, kind=type(out).__name__, n=len(out)))
      loss, aux = out, None
    loss = jnp.asarray(loss)
    if loss.shape != ():
      raise ValueError(LOSS_NOT_SCALAR.format(name=name, shape=loss.shape))
    if not jnp.issubdtype(loss.dtype, jnp.floating):
      raise TypeError(LOSS_NOT_FLOAT.format(name=name, dtype=loss.dtype))
    return loss, aux

  return wrapped


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
  """``loss_fn(params, chunk)`` with ``m``, ``loss_fn(params)`` without.

  Functions whose signature cannot be read are let through.
  """
  if m is not None:
    if _takes_positional(loss_fn, 2) is False:
      raise TypeError(LOSS_FN_ARITY_M.format(
          name=name, m=m, sig=inspect.signature(loss_fn)))
  elif (_takes_positional(loss_fn, 1) is False
        and _takes_positional(loss_fn, 2) is True):
    raise TypeError(LOSS_FN_ARITY_NO_M.format(
        name=name, sig=inspect.signature(loss_fn)))


def resolve_leafwise(name: str, arg: str, value, params, what: str):
  """``value`` (a pytree like params, or ``params -> pytree``) as a pytree."""
  if value is None:
    return None
  tree = value(params) if callable(value) else value
  try:
    jax.tree.map(lambda _, __: None, params, tree)
  except ValueError as e:
    raise ValueError(LEAFWISE_MISMATCH.format(
        name=name, arg=arg, what=what, params=jax.tree.structure(params),
        tree=jax.tree.structure(tree))) from e
  return tree


def abstract(tree):
  """``tree`` with ``jax.ShapeDtypeStruct`` leaves: shapes and dtypes only."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}({text!r})"


def _mask_leaf(name: str, path, leaf) -> bool:
  """One mask leaf as a Python bool, or a clear error naming ``mask``."""
  if isinstance(leaf, (bool, np.bool_)):
    return bool(leaf)
  where = jax.tree_util.keystr(path) or "<root>"
  if isinstance(leaf, (np.ndarray, jax.Array)):
    if np.ndim(leaf) == 0 and jnp.result_type(leaf) == jnp.bool_:
      v = concrete(leaf)
      if v is not None:
        return bool(v)
      got, fix = "a traced bool", MASK_LEAF_TRACED_FIX
    else:
      got = f"an array of shape {np.shape(leaf)} and dtype {jnp.result_type(leaf)}"
      fix = MASK_LEAF_ARRAY_FIX if np.ndim(leaf) else ""
  elif isinstance(leaf, (tuple, list, dict)):
    got, fix = (f"a {type(leaf).__name__} {leaf!r}",
                "A container is not a bool: give one bool for the whole leaf.")
  else:
    got, fix = f"{leaf!r} (a {type(leaf).__name__})", ""
  raise ValueError(MASK_LEAF_NOT_BOOL.format(name=name, path=where, got=got,
                                             fix=fix).rstrip())


def resolve_mask(name: str, mask, params, *, empty_hint: str = ""):
  """``mask=`` as a tree of Python bools like ``params`` (``None``: no mask).

  A callable is called on the params' shapes and dtypes (:func:`abstract`),
  so that it selects the same leaves eagerly and under ``jit``. Raises for a
  mask leaf that is not one concrete bool, and for a mask that selects no
  leaf (``empty_hint`` completes that message).
  """
  if mask is None:
    return None
  if callable(mask):
    try:
      tree = mask(abstract(params))
    except Exception as e:  # the user's callable, shown with its own error
      raise TypeError(MASK_CALLABLE_FAILED.format(
          name=name, error=_first_line(e))) from e
  else:
    tree = mask
  treedef = jax.tree.structure(params)
  try:
    subtrees = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(LEAFWISE_MISMATCH.format(
        name=name, arg="mask", what="one bool", params=treedef,
        tree=jax.tree.structure(tree))) from e
  paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  keep = [_mask_leaf(name, path, leaf) for path, leaf in zip(paths, subtrees)]
  if keep and not any(keep):
    raise ValueError(MASK_SELECTS_NOTHING.format(name=name, hint=empty_hint))
  return jax.tree.unflatten(treedef, keep)


def tree_mismatch(got, want, got_name: str, want_name: str) -> Optional[str]:
  """Where ``got`` differs from ``want`` in tree or leaf shapes; None if not."""
  got_def, want_def = jax.tree.structure(got), jax.tree.structure(want)
  if got_def != want_def:
    return f"{got_name} tree {got_def}; {want_name} tree {want_def}"
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    if tuple(jnp.shape(a)) != tuple(jnp.shape(b)):
      return (f"{got_name} leaf {jax.tree_util.keystr(path) or '<root>'} has "
              f"shape {tuple(jnp.shape(a))}, {want_name} {tuple(jnp.shape(b))}")
  return None


def check_state_like(name: str, state, want) -> None:
  """``state`` has the tree and leaf shapes of ``want`` (trace time only)."""
  detail = tree_mismatch(state, want, "state", "these params give")
  if detail is not None:
    raise ValueError(STATE_MISMATCH.format(name=name, detail=detail))


@functools.lru_cache(maxsize=64)
def _init_shapes(init: Callable, treedef, avals):
  """``init``'s output shapes for params of ``treedef`` and ``avals``."""
  return jax.eval_shape(init, jax.tree.unflatten(
      treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals]))


def check_state_matches(name: str, init: Callable, state, params) -> None:
  """``state`` is shaped like ``init(params)`` (abstractly: nothing runs).

  The shapes ``init`` gives are cached per params layout, so that an eager
  (un-jitted) step does not trace ``init`` again.
  """
  leaves, treedef = jax.tree.flatten(params)
  avals = tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)
  check_state_like(name, state, _init_shapes(init, treedef, avals))


# --- An `update` call. ------------------------------------------------------------

def check_update_call(name: str, *, updates, params, loss_fn, has_aux: bool,
                      m, value=None) -> None:
  """What every ``update`` of a second-pass transform needs."""
  if value is not None and (isinstance(value, (tuple, list, dict))
                            or jnp.shape(value) != ()):
    raise ValueError(BAD_VALUE.format(name=name, got=type(value).__name__))
  if loss_fn is None:
    hint = "; with `has_aux=True` it returns `(loss, aux)`" if has_aux else ""
    if m is not None:
      hint += " (with `m=`, `loss_fn(params, chunk)` and `batch=` are needed)"
    raise MissingLossFnError(MISSING_LOSS_FN.format(name=name,
                                                    aux_hint=hint))
  if params is None:
    raise ValueError(MISSING_PARAMS.format(name=name))
  if any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
    raise ValueError(INSIDE_OPTAX_MASKED.format(name=name))
  if jax.tree.structure(updates) != jax.tree.structure(params):
    raise ValueError(TREE_MISMATCH.format(
        name=name, updates=jax.tree.structure(updates),
        params=jax.tree.structure(params)))
  check_loss_fn_arity(name, loss_fn, m)


def divisors(b: int) -> str:
  ds = [d for d in range(1, b + 1) if b % d == 0]
  return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")


def batch_size(name: str, batch, m: int) -> int:
  """The leading size shared by every leaf of ``batch``; checks that m divides it."""
  if batch is None:
    raise TypeError(MISSING_BATCH.format(name=name, m=m))
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(EMPTY_BATCH.format(name=name, m=m))
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(RAGGED_BATCH.format(name=name, m=m,
                                         sizes=sorted(map(str, sizes))))
  (b,) = sizes
  if b % m:
    raise ValueError(BAD_BATCH_SIZE.format(name=name, m=m, b=b,
                                           divisors=divisors(b)))
  return b


def check_group_grads(name: str, group_grads, params, b: int, m) -> None:
  """``group_grads`` is params-like with ``b // m`` groups in front (needs m)."""
  if group_grads is None:
    return
  if m is None:
    raise ValueError(GROUP_GRADS_WITHOUT_M.format(name=name))
  groups = b // m
  if jax.tree.structure(group_grads) != jax.tree.structure(params):
    raise ValueError(BAD_GROUP_GRADS.format(
        name=name, groups=groups, b=b, m=m,
        got=f"got tree {jax.tree.structure(group_grads)}"))
  for (path, p), g in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(group_grads)):
    want = (groups,) + tuple(jnp.shape(p))
    if tuple(jnp.shape(g)) != want:
      raise ValueError(BAD_GROUP_GRADS.format(
          name=name, groups=groups, b=b, m=m,
          got=f"leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
              f"{tuple(jnp.shape(g))}, expected {want}"))
