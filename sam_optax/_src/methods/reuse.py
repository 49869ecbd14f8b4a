"""LookSAM and interval SAM: the second pass only every k-th step.

Both use the machinery's ``second_pass(rule_state, count)`` hook: on steps
where it is false the whole perturbed pass sits in the untaken branch of a
``lax.cond`` and is not executed, so those steps cost one gradient. Both kinds
of step live in one compiled program (no recompilation).
"""


from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import core
from sam_optax._src import forms
from sam_optax._src import numerics
from sam_optax._src.methods import sam as sam_lib

ScalarOrSchedule = core.ScalarOrSchedule


_f32 = numerics.f32


_sam_ascent = sam_lib.sam_ascent


def _every(k):
  def second_pass(state, count):
    del state
    return jnp.equal(jnp.mod(count, k), 0)
  return second_pass


class LookSAMState(NamedTuple):
  """State of LookSAM's rule.

  Attributes:
    g_v: the component of the last SAM gradient ``g_p`` orthogonal to the
      clean gradient ``g`` of that step (zeros before the first SAM step).
  """

  g_v: chex.ArrayTree


def looksam_rule(alpha, k: int) -> base.PerturbationRule:
  """SAM every k steps storing g_v; otherwise d = g + α (‖g‖/‖g_v‖) g_v."""

  def init(params):
    return LookSAMState(g_v=optax.tree.zeros_like(params))

  def combine(grads, perturbed, state, params):
    del params
    coef = numerics.safe_divide(numerics.tree_vdot(grads, perturbed),
                                numerics.tree_vdot(grads, grads))
    g_v = jax.tree.map(
        lambda g, gp, old: (_f32(gp) - coef * _f32(g)).astype(old.dtype),
        grads, perturbed, state.g_v)
    return perturbed, LookSAMState(g_v=g_v)

  def skip(grads, state, params):
    del params
    scale = jnp.asarray(alpha, jnp.float32) * numerics.safe_divide(
        numerics.tree_norm(grads), numerics.tree_norm(state.g_v))
    direction = jax.tree.map(
        lambda g, v: (_f32(g) + scale * _f32(v)).astype(g.dtype), grads, state.g_v)
    return direction, state

  return base.PerturbationRule(
      init=init, ascent=_sam_ascent, unit_norm=True, combine=combine,
      second_pass=_every(k), skip=skip, combine_uses_grad=True)


def interval_rule(k: int) -> base.PerturbationRule:
  """SAM on steps 0, k, 2k, ...; the plain gradient on the others."""

  init = base.empty_init

  return base.PerturbationRule(init=init, ascent=_sam_ascent, unit_norm=True,
                               second_pass=_every(k))


def _looksam(name, *, options, rho, k, alpha):
  k = checks.check_k(name, k)
  checks.check_range(name, "alpha", alpha, hint=" The paper uses alpha=0.7.")
  return core.block(looksam_rule(alpha, k), rho, name, options)


def looksam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    has_aux: bool = False, axis_name: Optional[str] = None,
    m: Optional[int] = None, group_loop: str = "vmap", mask: Any = None,
    track_cosine: bool = False, rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM around any optax optimizer: SAM every k steps, reused between.

  Every k-th step (steps 0, k, 2k, ...) is a SAM step, which also stores the
  part of the SAM gradient orthogonal to the clean one. The other steps cost
  one gradient: they add that stored direction back, rescaled to the current
  gradient's norm:

  .. math::
    \text{SAM step:}\quad g_p = \nabla L(w + \rho\, \hat g),\quad
    g_v = g_p - \frac{g \cdot g_p}{\|g\|_2^2}\, g,\quad u = g_p;
    \qquad
    \text{other steps:}\quad u = g + \alpha\, \frac{\|g\|_2}{\|g_v\|_2}\, g_v.

  Both kinds of step are one compiled program (``lax.cond``); on the other
  steps the second pass is not run, so ``k=5`` costs about 1.2 gradients per
  step.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`look_sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    k: steps from one SAM step to the next, an integer ≥ 1 (``k=1`` is SAM);
      default 5 as in the paper. Structural: under
      ``optax.inject_hyperparams`` list it in ``static_args``.
    alpha: α ≥ 0, the weight of the reused direction; default 0.7 as in the
      paper. ``alpha=0`` gives the plain gradient between SAM steps.
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sam`. Works with
      ``axis_name``: ``g_v`` is computed from device-averaged gradients, so it
      stays replicated.
    rho_scale: per-leaf ρ, as in :func:`asam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state:
    :class:`LookSAMState` inside :class:`SharpnessAwareState`); ``update``
    needs ``loss_fn=`` on every step (it is called on SAM steps only).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2) + jnp.sum(w ** 4) / 4
    >>> tx = sam_optax.looksam(optax.sgd(0.05), rho=0.05, k=2, alpha=0.7)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state, second_pass = tx.init(w), []
    >>> for _ in range(4):  # ∇L(w + ε) is computed every k-th step only
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   second_pass.append(bool(jnp.isfinite(sam_optax.get_info(state).perturbed_loss)))
    >>> second_pass
    [True, False, True, False]

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  return forms.around(_looksam, "sam_optax.looksam", locals())


look_sharpness_aware = forms.chain_block(
    looksam, _looksam, name="look_sharpness_aware",
    summary="LookSAM as a chain block: a SAM step every k steps, reused in between.")


def _interval(name, *, options, rho, k):
  return core.block(interval_rule(checks.check_k(name, k)), rho, name, options)


def interval_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    *,
    has_aux: bool = False, axis_name: Optional[str] = None,
    m: Optional[int] = None, group_loop: str = "vmap", mask: Any = None,
    track_cosine: bool = False, rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Interval SAM around any optax optimizer: SAM every k steps.

  .. math::
    u_t = \begin{cases} \nabla L(w_t + \rho\, \hat g_t) & t \equiv 0 \pmod k \\
    g_t & \text{otherwise.} \end{cases}

  One compiled program for both kinds of step (``lax.cond``); the second pass
  runs on SAM steps only, so ``k=5`` costs about 1.2 gradients per step. The
  cheap baseline of the LookSAM paper ("SAM-k"), also known as composer's
  ``interval``.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`interval_sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    k: steps from one SAM step to the next (integer ≥ 1; ``k=1`` is SAM);
      default 5. Structural: list it in ``static_args`` under
      ``optax.inject_hyperparams``.
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sam`. Stateless:
      works per device and per group.
    rho_scale: per-leaf ρ, as in :func:`asam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``loss_fn=`` on every step (it is called on SAM steps only).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2) + jnp.sum(w ** 4) / 4
    >>> make = optax.inject_hyperparams(sam_optax.interval_sam,
    ...                                 static_args=("k",))
    >>> tx = make(optax.sgd(0.05), rho=0.05, k=2)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> state.hyperparams["rho"] = jnp.array(0.1)  # ρ changed at run time
    >>> updates, state = tx.update(jax.grad(loss)(w), state, w, loss_fn=loss)
    >>> print('{:.3f}'.format(loss(optax.apply_updates(w, updates))))
    7.625

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (the "SAM-k" baseline).

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return forms.around(_interval, "sam_optax.interval_sam", locals())


interval_sharpness_aware = forms.chain_block(
    interval_sam, _interval, name="interval_sharpness_aware",
    summary="Interval SAM as a chain block: SAM every k steps, the plain gradient otherwise.")