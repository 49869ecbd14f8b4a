"""What the benchmarks compare, and the one training step they all run.

The library's methods come from its one list, ``sam_optax._src.registry``
(a new method there is benchmarked without touching this file). The only
names written here are the peers that are not sam_optax methods: the base
optimizer alone (``sgd``), a hand-written SAM step (``hand_sam``) and
``optax.contrib.sam``; and ``sam_m``, the reference SAM with in-device
m-sharpness.

* :func:`build`, :func:`describe`: a method around a base optimizer, at its
  defaults with ρ scaled from SAM's (the training benchmarks).
* :func:`train_step`, :func:`group_step`: the jitted-step bodies
  ``step(params, state, batch) -> (params, state)``.
* :func:`entries`: every peer and method as ``(init, step)`` on one loss
  (the timing benchmarks).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import sam_optax
from sam_optax._src.registry import BY_NAME, METHODS, Method

BASE = "sgd"  # the base optimizer alone
SAM = BY_NAME["sam"]  # the reference: plain SAM, which the peers implement too
GROUPS = 4  # in-device m-sharpness (``sam_m``): m = batch // GROUPS


def names() -> list[str]:
  """The base optimizer, then every method of the library's list."""
  return [BASE] + [m.name for m in METHODS]


def settings(method: Method) -> dict[str, Any]:
  """The wrapper's numeric defaults, static ones (``k``) included, in order."""
  numeric = {**method.defaults(), **{a: None for a in method.static_args}}
  return {arg: p.default for arg, p in inspect.signature(method.wrapper).parameters.items()
          if arg in numeric}


def period() -> int:
  """Steps that hold whole periods of every every-k method (LookSAM, ...)."""
  return math.lcm(*(int(settings(m)[a]) for m in METHODS for a in m.static_args))


def rho_scale(method: Method) -> float:
  """The method's default ρ over SAM's (ASAM's ρ is relative to ``|w|``)."""
  return round(method.defaults()["rho"] / SAM.defaults()["rho"], 6)


def describe(name: str, rho: Optional[float] = None) -> str:
  """The settings, e.g. ``'ρ = 3, eta = 0.01'`` (``rho``: SAM's ρ, scaled)."""
  if name == BASE:
    return "base optimizer alone"
  method = BY_NAME[name]
  parts = []
  for arg, value in settings(method).items():
    if arg == "rho":
      scale = rho_scale(method)
      if rho is not None:
        parts.append(f"ρ = {rho * scale:g}")
      elif scale != 1:
        parts.append(f"ρ × {scale:g}")
    else:
      parts.append(f"{arg} = {value:g}" if isinstance(value, float) else f"{arg} = {value}")
  return ", ".join(parts)


def build(name: str, base: optax.GradientTransformation, rho: Optional[float] = None):
  """``name`` around ``base`` at its defaults; ``rho`` is SAM's, scaled
  (:func:`rho_scale`). ``'sgd'`` is ``base`` alone."""
  if name == BASE:
    return base
  method = BY_NAME[name]
  kwargs = {} if rho is None else {"rho": rho * rho_scale(method)}
  return method.wrapper(base, **kwargs)


def unperturbed(params, opt_state):
  """The params to evaluate: MSAM hands back perturbed params, the rest do not."""
  try:
    return sam_optax.remove_perturbation(params, opt_state)
  except ValueError:  # no MSAM state
    return params


def train_step(tx, loss: Callable, params_fn: Callable = lambda p: p) -> Callable:
  """Batch gradient, ``tx.update`` (``loss_fn=``, ``value=``), apply.

  ``loss(params, batch)``; the base optimizer ignores the extra arguments.
  ``params_fn`` maps the params before the gradient (``per_device``).
  """

  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(params_fn(params))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
    return optax.apply_updates(params, updates), state

  return step


def group_step(tx, loss: Callable, m: int, group_loop: str = "vmap",
               params_fn: Callable = lambda p: p) -> Callable:
  """In-device m-sharpness: per-group gradients from
  ``sam_optax.group_value_and_grad`` passed as ``group_grads=`` (two passes).

  ``params_fn`` maps the params before the gradient (``per_device``).
  """
  value_and_grads = sam_optax.group_value_and_grad(loss, m, group_loop=group_loop)

  def step(params, state, batch):
    _, grads, group_grads = value_and_grads(params_fn(params), batch)
    updates, state = tx.update(grads, state, params, loss_fn=loss, batch=batch,
                               group_grads=group_grads)
    return optax.apply_updates(params, updates), state

  return step


# --- Peers and methods on one loss (timing) -------------------------------------


class Entry(NamedTuple):
  """One row of a timing table: ``make(loss, base, batch) -> (init, step)``."""
  name: str
  passes: float  # forward/backward passes per step
  make: Callable[[Callable, optax.GradientTransformation, int], tuple[Callable, Callable]]


def _hand_sam(loss, base, batch):
  rho = SAM.defaults()["rho"]

  def step(params, state, b):
    grads = jax.grad(loss)(params, b)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                        for g in jax.tree.leaves(grads)))
    scale = rho / jnp.maximum(norm, 1e-12)
    perturbed = jax.tree.map(lambda p, g: (p + scale * g).astype(p.dtype), params, grads)
    updates, state = base.update(jax.grad(loss)(perturbed, b), state, params)
    return optax.apply_updates(params, updates), state

  return base.init, step


def _optax_contrib_sam(loss, base, batch):
  tx = optax.contrib.sam(
      base, optax.chain(optax.contrib.normalize(), optax.sgd(SAM.defaults()["rho"])),
      sync_period=2, opaque_mode=True)

  def step(params, state, b):
    grads = jax.grad(loss)(params, b)
    grad_fn = jax.grad(lambda p, _: loss(p, b))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return tx.init, step


def _method(method: Method):
  def make(loss, base, batch):
    tx = method.wrapper(base)
    return tx.init, train_step(tx, loss)
  return make


def _in_device(loss, base, batch):
  tx = SAM.wrapper(base, m=batch // GROUPS)
  return tx.init, group_step(tx, loss, batch // GROUPS)


def entries(batch: int) -> dict[str, Entry]:
  """Every peer and method for a batch of ``batch`` examples, in table order:
  ``sgd``, ``hand_sam``, ``optax_contrib_sam``, the library's list, ``sam_m``
  (when ``batch`` splits into :data:`GROUPS` groups)."""
  out = [Entry(BASE, 1.0, lambda loss, base, batch: (base.init, train_step(base, loss))),
         Entry("hand_sam", SAM.passes, _hand_sam),
         Entry("optax_contrib_sam", SAM.passes, _optax_contrib_sam)]
  out += [Entry(m.name, m.passes, _method(m)) for m in METHODS]
  if batch % GROUPS == 0:
    out.append(Entry(f"{SAM.name}_m", SAM.passes, _in_device))
  return {e.name: e for e in out}


def entry_names() -> list[str]:
  """Names :func:`entries` may return (for ``--methods``)."""
  return list(entries(GROUPS))


def parse(text: str, choices: Sequence[str], flag: str, error: Callable[[str], Any]
          ) -> list[str]:
  """``'all'`` or a comma-separated subset of ``choices`` (else ``error(...)``)."""
  if text.strip() == "all":
    return list(choices)
  chosen = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in choices]
  if unknown:
    error(f"{flag} {','.join(unknown)}: not available; choose from {','.join(choices)} "
          "(or 'all')")
  return chosen
