"""Public SAM transforms: the chain block and the optimizer wrapper."""

from __future__ import annotations

from typing import Any, Optional

import optax

from sam_optax._src import checks
from sam_optax._src import core
from sam_optax._src.rules import normalized

ScalarOrSchedule = core.ScalarOrSchedule


def sharpness_aware(
    rho: ScalarOrSchedule = 0.05,
    *,
    p: Optional[float] = None,
    normalize: bool = True,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    rho_scale: Any = None,
    track_cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Turns the batch gradient into the SAM gradient ``∇L(w + ε)``: a chain block.

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
  params.

  Args:
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
      recomputed). Memory: b/m perturbed copies of the params (one with
      ``group_loop='scan'``). Structural, like ``p``.
    group_loop: with ``m``, how the groups are run: ``'vmap'`` (default; all
      groups in one vectorized pass), ``'scan'`` (one group at a time in a
      ``jax.lax.scan``: one perturbed copy alive, for large models) or
      ``'unroll'`` (one group at a time as straight-line code: compile time
      grows with b/m; on XLA:CPU the fastest for convolutions). The same
      math either way; pass the same value to
      :func:`sam_optax.group_value_and_grad`.
    mask: pytree of bools like params (or ``params -> pytree``); only True
      leaves are perturbed, and ε is normalized over them alone.
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
    >>> tx = optax.chain(sam_optax.sharpness_aware(rho=0.05),
    ...                  optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> w = jnp.array([3.0, -2.0])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   value, grads = jax.value_and_grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss, value=value)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    1.23E+01
    1.16E+01
    1.09E+01
    1.03E+01
    9.64E+00

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

    Andriushchenko & Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022 (USAM).
  """
  return _normalized_block("sam_optax.sharpness_aware", rho, p=p,
                           normalize=normalize, has_aux=has_aux,
                           axis_name=axis_name, m=m, group_loop=group_loop,
                           mask=mask, rho_scale=rho_scale,
                           track_cosine=track_cosine)


def _normalized_block(name, rho, *, p, normalize, **options):
  p = checks.check_p(name, p, normalize)
  return core.sharpness_aware_transform(
      normalized.normalized(p, normalize=normalize), rho, name=name, **options)


def sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    *,
    p: Optional[float] = None,
    normalize: bool = True,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    rho_scale: Any = None,
    track_cosine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM around any optax optimizer.

  The same as ``optax.chain(sharpness_aware(rho, ...), base_optimizer)``: each
  ``update`` is one whole SAM step. It takes the batch gradient ``g`` at ``w``,
  evaluates ``u = ∇L(w + ε)`` with ``ε = ρ g/‖g‖`` by calling ``loss_fn``, and
  returns the base optimizer's update for ``u`` at the unperturbed ``w``:

  .. math::
    w_{t+1} = w_t + \operatorname{base}\big(\nabla L(w_t + \rho\,
    g_t / \|g_t\|_2)\big).

  Args:
    base_optimizer: any optax transformation (``optax.sgd``, ``optax.adamw``,
      a chain, ...).
    rho: the radius ρ ≥ 0 (float or schedule); ``rho=0`` gives exactly
      ``base_optimizer``.
    p, normalize, has_aux, axis_name, m, group_loop, mask, rho_scale,
      track_cosine: as in :func:`sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``loss_fn=`` (``params -> loss``, or ``(params, chunk) -> loss`` with
    ``m``).

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
  """
  return optax.chain(
      _normalized_block("sam_optax.sam", rho, p=p, normalize=normalize,
                        has_aux=has_aux, axis_name=axis_name, m=m,
                        group_loop=group_loop, mask=mask, rho_scale=rho_scale,
                        track_cosine=track_cosine),
      base_optimizer,
  )
