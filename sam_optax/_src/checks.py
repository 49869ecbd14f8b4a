"""Every check of a sharpness-aware call (the messages are in :mod:`messages`).

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

from sam_optax._src import messages

# --- Errors. -------------------------------------------------------------------

class MissingLossFnError(TypeError):
  """``update`` of a transform that needs ``loss_fn`` was called without it.

  Adapters (the Flax train states and optimizer) catch it to restate the fix in
  their own call; a transform that needs no ``loss_fn`` (MSAM) never raises it.
  """


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
    raise TypeError(messages.RHO_NOT_A_NUMBER.format(name=name, rho=rho,
                                            kind=_kind(rho)))
  if np.ndim(rho) != 0:
    raise ValueError(messages.KNOB_NOT_SCALAR.format(name=name, arg="rho",
                                            shape=np.shape(rho)))
  dtype = jnp.result_type(rho)
  if dtype == jnp.bool_ or not (jnp.issubdtype(dtype, jnp.integer)
                                or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(messages.RHO_NOT_A_NUMBER.format(
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
    raise ValueError(messages.BAD_RHO.format(name=name, rho=rho))


def check_range(name: str, arg: str, value: Any, *, low: float = 0.0,
                high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> None:
  """Raises for a concrete number outside the range; arrays pass unchecked."""
  if callable(value):
    raise TypeError(messages.KNOB_IS_CALLABLE.format(name=name, arg=arg))
  if isinstance(value, bool):
    raise TypeError(messages.KNOB_IS_BOOL.format(name=name, arg=arg, value=value))
  if isinstance(value, (str, bytes)):
    raise TypeError(messages.KNOB_NOT_A_NUMBER.format(name=name, arg=arg, value=value,
                                             kind=_kind(value)))
  if not isinstance(value, _NUMBER):
    return
  if np.ndim(value) != 0:
    raise ValueError(messages.KNOB_NOT_SCALAR.format(name=name, arg=arg,
                                            shape=np.shape(value)))
  v = float(np.asarray(value))
  ok = math.isfinite(v) and (v > low if low_open else v >= low)
  if high is not None:
    ok = ok and (v < high if high_open else v <= high)
  if not ok:
    interval = (f"{'>' if low_open else '≥'} {low:g}" if high is None else
                f"in {'(' if low_open else '['}{low:g}, {high:g}"
                f"{')' if high_open else ']'}")
    raise ValueError(messages.KNOB_OUT_OF_RANGE.format(
        name=name, arg=arg, value=value, hint=hint, interval=interval))


def check_static(name: str, arg: str, value) -> None:
  if isinstance(value, jax.Array):  # a traced or injected array
    raise TypeError(messages.STATIC_ARG.format(name=name, arg=arg))


def is_positive_int(value) -> bool:
  return isinstance(value, numbers.Integral) and value >= 1 and value is not True


def check_k(name: str, k: Any) -> int:  # steps between SAM steps: an int ≥ 1
  check_static(name, "k", k)
  if not is_positive_int(k):
    raise ValueError(messages.BAD_K.format(name=name, k=k))
  return int(k)


def check_p(name: str, p, normalize: bool) -> float:
  """The norm ``p`` of the ρ-ball (``None`` means 2), as a float."""
  if p is None:
    return 2.0
  check_static(name, "p", p)
  try:
    p = float(p)
  except (TypeError, ValueError):
    raise ValueError(messages.BAD_P.format(name=name, p=p)) from None
  if math.isnan(p) or p <= 1:
    raise ValueError(messages.BAD_P.format(name=name, p=p))
  if not normalize and p != 2:
    raise ValueError(messages.UNNORMALIZED_P.format(name=name, p=p))
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
      raise ValueError(messages.BAD_RHO_SCALE.format(
          name=name, path=jax.tree_util.keystr(path), leaf=leaf))


GROUP_LOOPS = ("vmap", "scan", "unroll")


def check_placement(name: str, *, axis_name, m, group_loop,
                    supports_groups: bool = True) -> None:
  """``axis_name``, ``m`` and ``group_loop`` of a transform's factory."""
  check_static(name, "m", m)
  if m is not None:
    if not is_positive_int(m):
      raise ValueError(messages.BAD_M.format(
          name=name, m=m, alt=" (or None for one perturbation per batch)"))
    if not supports_groups:
      raise ValueError(messages.M_WITH_STATEFUL_RULE.format(name=name, m=m))
  check_choice(messages.BAD_GROUP_LOOP, group_loop, GROUP_LOOPS, name=name,
               loop=group_loop)
  if m is None and group_loop != "vmap":
    raise ValueError(messages.GROUP_LOOP_WITHOUT_M.format(name=name, loop=group_loop))
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(messages.BAD_AXIS_NAME.format(name=name, axis=axis_name))


# --- Params and the loss function. ----------------------------------------------

def check_float_params(name: str, params) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(messages.NON_FLOAT_PARAMS.format(
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
        raise TypeError(messages.LOSS_NOT_AUX_PAIR.format(name=name, got=got))
      loss, aux = out
    else:
      if isinstance(out, (tuple, list)):
        raise TypeError(messages.LOSS_RETURNED_TUPLE.format(
            name=name, kind=type(out).__name__, n=len(out)))
      loss, aux = out, None
    loss = jnp.asarray(loss)
    if loss.shape != ():
      raise ValueError(messages.LOSS_NOT_SCALAR.format(name=name, shape=loss.shape))
    if not jnp.issubdtype(loss.dtype, jnp.floating):
      raise TypeError(messages.LOSS_NOT_FLOAT.format(name=name, dtype=loss.dtype))
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
      raise TypeError(messages.LOSS_FN_ARITY_M.format(
          name=name, m=m, sig=inspect.signature(loss_fn)))
  elif (_takes_positional(loss_fn, 1) is False
        and _takes_positional(loss_fn, 2) is True):
    raise TypeError(messages.LOSS_FN_ARITY_NO_M.format(
        name=name, sig=inspect.signature(loss_fn)))


def resolve_leafwise(name: str, arg: str, value, params, what: str):
  """``value`` (a pytree like params, or ``params -> pytree``) as a pytree."""
  if value is None:
    return None
  tree = value(params) if callable(value) else value
  try:
    jax.tree.map(lambda _, __: None, params, tree)
  except ValueError as e:
    raise ValueError(messages.LEAFWISE_MISMATCH.format(
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
      got, fix = "a traced bool", messages.MASK_LEAF_TRACED_FIX
    else:
      got = f"an array of shape {np.shape(leaf)} and dtype {jnp.result_type(leaf)}"
      fix = messages.MASK_LEAF_ARRAY_FIX if np.ndim(leaf) else ""
  elif isinstance(leaf, (tuple, list, dict)):
    got, fix = (f"a {type(leaf).__name__} {leaf!r}",
                "A container is not a bool: give one bool for the whole leaf.")
  else:
    got, fix = f"{leaf!r} (a {type(leaf).__name__})", ""
  raise ValueError(messages.MASK_LEAF_NOT_BOOL.format(name=name, path=where, got=got,
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
      raise TypeError(messages.MASK_CALLABLE_FAILED.format(
          name=name, error=_first_line(e))) from e
  else:
    tree = mask
  treedef = jax.tree.structure(params)
  try:
    subtrees = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(messages.LEAFWISE_MISMATCH.format(
        name=name, arg="mask", what="one bool", params=treedef,
        tree=jax.tree.structure(tree))) from e
  paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  keep = [_mask_leaf(name, path, leaf) for path, leaf in zip(paths, subtrees)]
  if keep and not any(keep):
    raise ValueError(messages.MASK_SELECTS_NOTHING.format(name=name, hint=empty_hint))
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
    raise ValueError(messages.STATE_MISMATCH.format(name=name, detail=detail))


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
    raise ValueError(messages.BAD_VALUE.format(name=name, got=type(value).__name__))
  if loss_fn is None:
    hint = "; with `has_aux=True` it returns `(loss, aux)`" if has_aux else ""
    if m is not None:
      hint += " (with `m=`, `loss_fn(params, chunk)` and `batch=` are needed)"
    raise MissingLossFnError(messages.MISSING_LOSS_FN.format(name=name,
                                                    aux_hint=hint))
  if params is None:
    raise ValueError(messages.MISSING_PARAMS.format(name=name))
  if any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
    raise ValueError(messages.INSIDE_OPTAX_MASKED.format(name=name))
  if jax.tree.structure(updates) != jax.tree.structure(params):
    raise ValueError(messages.TREE_MISMATCH.format(
        name=name, updates=jax.tree.structure(updates),
        params=jax.tree.structure(params)))
  check_loss_fn_arity(name, loss_fn, m)


def divisors(b: int) -> str:
  ds = [d for d in range(1, b + 1) if b % d == 0]
  return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")


def batch_size(name: str, batch, m: int) -> int:
  """The leading size shared by every leaf of ``batch``; checks that m divides it."""
  if batch is None:
    raise TypeError(messages.MISSING_BATCH.format(name=name, m=m))
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(messages.EMPTY_BATCH.format(name=name, m=m))
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(messages.RAGGED_BATCH.format(name=name, m=m,
                                         sizes=sorted(map(str, sizes))))
  (b,) = sizes
  if b % m:
    raise ValueError(messages.BAD_BATCH_SIZE.format(name=name, m=m, b=b,
                                           divisors=divisors(b)))
  return b


def check_group_grads(name: str, group_grads, params, b: int, m) -> None:
  """``group_grads`` is params-like with ``b // m`` groups in front (needs m)."""
  if group_grads is None:
    return
  if m is None:
    raise ValueError(messages.GROUP_GRADS_WITHOUT_M.format(name=name))
  groups = b // m
  if jax.tree.structure(group_grads) != jax.tree.structure(params):
    raise ValueError(messages.BAD_GROUP_GRADS.format(
        name=name, groups=groups, b=b, m=m,
        got=f"got tree {jax.tree.structure(group_grads)}"))
  for (path, p), g in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(group_grads)):
    want = (groups,) + tuple(jnp.shape(p))
    if tuple(jnp.shape(g)) != want:
      raise ValueError(messages.BAD_GROUP_GRADS.format(
          name=name, groups=groups, b=b, m=m,
          got=f"leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
              f"{tuple(jnp.shape(g))}, expected {want}"))
