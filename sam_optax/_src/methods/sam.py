"""SAM itself: ε along the gradient, normalized in a p-norm (or not: USAM).
"""


from __future__ import annotations

from typing import Any, Optional

import optax

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import core
from sam_optax._src import forms
from sam_optax._src import numerics

ScalarOrSchedule = core.ScalarOrSchedule


def normalized(p: float = 2.0, *, normalize: bool = True) -> base.PerturbationRule:
  """ε = ρ · sign(g)|g|^{q-1}/‖g‖_q^{q-1} (``normalize=True``) or ε = ρ g (USAM)."""

  init = base.empty_init

  if normalize:
    def ascent(grads, state, params):
      del params
      return numerics.dual_direction(grads, p), state
  else:
    def ascent(grads, state, params):
      del params
      return grads, state

  return base.PerturbationRule(init=init, ascent=ascent,
                               unit_norm=normalize and p == 2)


def sam_ascent(grads, state, params):
  """Plain SAM's ascent direction ``g/‖g‖₂`` (0 at ``g = 0``), for reuse."""
  del params
  return numerics.dual_direction(grads, 2.0), state


def _sam(name, *, options, rho, p, normalize):
  return core.block(normalized(checks.check_p(name, p, normalize), normalize=normalize), rho, name, options)


def sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    *,
    p: Optional[float] = None,
    normalize: bool = True,
    has_aux: bool = False, axis_name: Optional[str] = None,
    m: Optional[int] = None, group_loop: str = "vmap", mask: Any = None,
    rho_scale: Any = None, track_cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM around any optax optimizer.

  Sharpness-aware minimization minimizes the worst loss in a ρ-ball around the
  weights. To first order the worst point is reached by one normalized ascent
  step, and the gradient there is handed on (to the rest of the chain) as if it
  were the gradient at ``w``:

  .. math::
    \varepsilon = \rho\, \frac{\operatorname{sign}(g)\,|g|^{q-1}}{\|g\|_q^{q-1}}
    \quad (\tfrac1p + \tfrac1q = 1;\ \ \varepsilon = \rho\, g / \|g\|_2
    \text{ for } p = 2), \qquad
    u = \nabla L(w + \varepsilon).

  With ``normalize=False`` (USAM) :math:`\varepsilon = \rho g`. At ``g = 0``,
  ε is exactly 0. Put it first in an ``optax.chain``; the members after it
  (clipping, weight decay, the base optimizer) see ``u`` and the unperturbed
  params. A member placed before it would be undone (the block recomputes the
  gradient from ``loss_fn``): to clip or decay the SAM gradient, put that
  member after the block, or pass the chain as ``base_optimizer``.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0, a float or an optax schedule of the step count.
      Run-time values below 0 (from a schedule or ``inject_hyperparams``) are
      clamped to 0; ``rho=0`` gives exactly the incoming gradient.
    p: the norm of the ρ-ball, ``p > 1``; ``None`` (default) means 2; also
      ``float('inf')``. Structural: under ``optax.inject_hyperparams`` list it
      in ``static_args``.
    normalize: ``False`` gives unnormalized SAM (USAM), ``ε = ρ g``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux of the perturbed
      pass is discarded.
    axis_name: name of the ``pmap``/``shard_map`` axis over which the batch is
      split. Each device then perturbs with its own gradient (m-sharpness with
      m = per-device batch) and only ``∇L(w + ε)`` is all-reduced (mean).
      ``update`` must run inside that mapped function. Under ``shard_map``,
      differentiate with respect to ``sam_optax.per_device(params, axis)``
      (``jax.grad`` w.r.t. replicated params sums over devices). Under plain
      ``jit`` with a sharded batch leave it ``None``: one ε for the global
      batch (m = global batch).
    m: examples per perturbation inside one device (m-sharpness). ``update``
      then needs ``batch=`` and calls ``loss_fn(params, chunk)`` per group.
      Pass ``group_grads=`` from :func:`sam_optax.group_value_and_grad` to
      keep a step at two passes (otherwise the per-group gradients are
      recomputed, group by group inside the loop). Memory: b/m perturbed
      copies of the params with ``'vmap'``, b/m params-sized buffers for
      supplied ``group_grads``; with ``group_loop='scan'`` and no
      ``group_grads=``, a hand-written fused loop's whatever b/m. Group k is
      examples k·m … (k+1)·m - 1 of the batch (of the global batch under
      ``jit`` with a sharded batch, whose devices each run their own
      groups). Structural, like ``p``.
    group_loop: with ``m``, how the groups are run: ``'vmap'`` (default; all
      groups in one vectorized pass), ``'scan'`` (one group at a time in a
      ``jax.lax.scan``, for large models: without ``group_grads=`` each
      group's gradient, ε, perturbed gradient and accumulation run in turn,
      so memory does not grow with b/m; a third pass) or ``'unroll'`` (one
      group at a time as straight-line code: compile time grows with b/m,
      memory is not bounded like ``'scan'``'s; on XLA:CPU the fastest for
      convolutions). The same math either way; pass the same value to
      :func:`sam_optax.group_value_and_grad`.
    mask: pytree of bools like params (or ``params -> pytree``, called on
      the params' shapes and dtypes, not their values); only True leaves are
      perturbed, and ε is normalized over them alone. A mask that selects no
      leaf is an error.
    rho_scale: per-leaf ρ: a pytree of non-negative numbers like params (or
      ``params -> pytree``); leaf ε is multiplied by its number after
      normalization (``None``: 1 everywhere).
    track_cosine: also record ``cos(g, ∇L(w + ε))`` in the step's
      :class:`SAMInfo` (costs one params-sized buffer during the step;
      ``nan`` when off).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn=`` (required), and optionally ``value=`` (the unperturbed loss,
    for the sharpness gap) and ``batch=`` (with ``m``). Other keyword
    arguments are ignored.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.sam(optax.sgd(0.1, momentum=0.5), rho=0.05)
    >>> w = jnp.array([3.0, -2.0])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.26E+00
    3.70E+00
    1.11E+00
    1.59E-01
    3.75E-04

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Andriushchenko & Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022 (USAM).
  """
  return forms.around(_sam, "sam_optax.sam", locals())


sharpness_aware = forms.chain_block(
    sam, _sam, name="sharpness_aware",
    summary="Turns the batch gradient into the SAM gradient ``∇L(w + ε)``: a chain block.")