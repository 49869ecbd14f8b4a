"""GSAM and the gradient-norm penalty: SAM's ε, a different final direction.

Both perturb as SAM does (``ε = ρ g/‖g‖``) and then mix the clean gradient
``g`` back into the direction, so both read ``g`` in ``combine``
(``combine_uses_grad``: under ``axis_name`` it is all-reduced together with
``∇L(w + ε)``, in the same all-reduce op).

At ``ρ = 0`` (``g_p = g`` exactly) both return exactly ``g``: the projection
coefficient is a ratio of two identical dot products (exactly 1), and the
penalty is written ``g + α (g_p − g)``.
"""


from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import messages
from sam_optax._src import core
from sam_optax._src import forms
from sam_optax._src import numerics
from sam_optax._src.methods import sam as sam_lib

ScalarOrSchedule = core.ScalarOrSchedule


_f32 = numerics.f32


_sam_ascent = sam_lib.sam_ascent


def gsam_rule(alpha) -> base.PerturbationRule:
  """d = g_p − α g_⊥, g_⊥ = g − (g·g_p/‖g_p‖²) g_p (Zhuang et al., 2022)."""

  def combine(grads, perturbed, state, params):
    del params
    alpha_ = jnp.asarray(alpha, jnp.float32)
    coef = numerics.safe_divide(numerics.tree_vdot(grads, perturbed),
                                numerics.tree_vdot(perturbed, perturbed))
    direction = jax.tree.map(
        lambda g, gp: (_f32(gp) - alpha_ * (_f32(g) - coef * _f32(gp))
                       ).astype(gp.dtype),
        grads, perturbed)
    return direction, state

  return base.PerturbationRule(init=base.empty_init, ascent=_sam_ascent,
                               unit_norm=True,
                               combine=combine, combine_uses_grad=True)


def gnp_rule(alpha) -> base.PerturbationRule:
  """d = (1 − α) g + α g_p, computed as g + α (g_p − g) (Zhao et al., 2022)."""

  def combine(grads, perturbed, state, params):
    del params
    alpha_ = jnp.asarray(alpha, jnp.float32)
    direction = jax.tree.map(
        lambda g, gp: (_f32(g) + alpha_ * (_f32(gp) - _f32(g))).astype(gp.dtype),
        grads, perturbed)
    return direction, state

  return base.PerturbationRule(init=base.empty_init, ascent=_sam_ascent,
                               unit_norm=True,
                               combine=combine, combine_uses_grad=True)


def _gsam(name, *, options, rho, alpha):
  checks.check_range(name, "alpha", alpha,
              hint=" α = 0 gives SAM; the paper uses 0.01–0.6.")
  return core.block(gsam_rule(alpha), rho, name, options)


def _gnp(name, *, options, rho, alpha):
  checks.check_range(name, "alpha", alpha, high=1.0,
              hint=" α = 0 is the plain gradient, α = 1 is SAM; the paper "
              "uses 0.8.")
  return core.block(gnp_rule(alpha), rho, name, options)


def rho_from_learning_rate(
    learning_rate: ScalarOrSchedule,
    rho_max: float,
    rho_min: float = 0.0,
    *,
    lr_max: Optional[float] = None,
    lr_min: float = 0.0,
) -> optax.Schedule:
  r"""A ρ schedule proportional to a learning-rate schedule (as GSAM uses).

  .. math::
    \rho_t = \max\Big(0,\ \rho_{\min} + (\rho_{\max} - \rho_{\min})
    \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}}\Big),

  where :math:`\eta_t` is ``learning_rate(t)``. During a warmup that starts
  below ``lr_min``, the formula would give a negative ρ; it is clamped at 0
  (the reference implementation lets it go negative). Pass the result as
  ``rho=`` to any sam_optax transform; it also works under
  ``optax.inject_hyperparams``.

  Examples:
    >>> import optax, sam_optax
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, end_value=1e-3)
    >>> rho = sam_optax.rho_from_learning_rate(lr, rho_max=0.6, rho_min=0.1,
    ...                                        lr_max=0.1, lr_min=1e-3)
    >>> print('{:.2E} {:.2E} {:.2E}'.format(rho(0), rho(10), rho(100)))
    9.49E-02 6.00E-01 1.00E-01

  Args:
    learning_rate: the learning rate, a number or an optax schedule (the same
      one given to the base optimizer).
    rho_max: ρ at ``lr_max`` (≥ 0). The paper's ViT-B/32 setting is 0.6.
    rho_min: ρ at ``lr_min`` (≥ 0). The paper's ViT-B/32 setting is 0.1.
    lr_max: the peak learning rate. Required for a schedule; for a constant
      learning rate it defaults to that constant (then ρ is ``rho_max``).
    lr_min: the final learning rate; default 0.

  Returns:
    An optax schedule ``count -> ρ_t`` (float32).

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  name = "sam_optax.rho_from_learning_rate"
  for arg, value in (("rho_max", rho_max), ("rho_min", rho_min),
                     ("lr_min", lr_min)):
    checks.check_range(name, arg, value)
  if lr_max is None:
    if callable(learning_rate):
      raise ValueError(messages.LR_MAX_NEEDED.format(name=name))
    lr_max = learning_rate
  checks.check_range(name, "lr_max", lr_max)
  span = float(lr_max) - float(lr_min)
  if span < 0:
    raise ValueError(messages.LR_MAX_BELOW_MIN.format(
        name=name, lr_max=lr_max, lr_min=lr_min))

  def schedule(count):
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, jnp.float32)
    if span == 0:
      rho = jnp.full((), rho_max, jnp.float32)
    else:
      rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / span
    return jnp.maximum(jnp.asarray(rho, jnp.float32), 0.0)

  return schedule


def gsam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    *,
    has_aux: bool = False, axis_name: Optional[str] = None,
    m: Optional[int] = None, group_loop: str = "vmap", mask: Any = None,
    track_cosine: bool = False, rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GSAM (surrogate-gap guided SAM) around any optax optimizer.

  Surrogate-gap guided SAM descends the perturbed loss as SAM does, and also
  decreases the *surrogate gap* :math:`L(w + \varepsilon) - L(w)` by an ascent
  step along the part of the clean gradient orthogonal to the perturbed one
  (which leaves the perturbed loss unchanged to first order):

  .. math::
    g_p = \nabla L\big(w + \rho_t\, g/\|g\|_2\big), \qquad
    g_\perp = g - \frac{g \cdot g_p}{\|g_p\|_2^2}\, g_p, \qquad
    u = g_p - \alpha\, g_\perp.

  The paper ties :math:`\rho_t` to the learning rate; build that schedule with
  :func:`rho_from_learning_rate`. At ``g = 0``, ε = 0 and ``u = g_p``.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`gap_guided_sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0, a float or a schedule (for example
      ``rho_from_learning_rate(lr, rho_max=0.6, rho_min=0.1, lr_max=...)``,
      the paper's ViT-B/32 setting); run-time values below 0 are clamped to 0.
      Default 0.05.
    alpha: α ≥ 0, the strength of the gap ascent; α = 0 is SAM. Default 0.1
      (the paper searches 0.01–0.3 for ResNets and uses 0.6 for ViT-B/32).
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sam`. Works with
      ``axis_name``: ``g`` and ``g_p`` are averaged over devices (one
      all-reduce) before the decomposition.
    rho_scale: per-leaf ρ, as in :func:`asam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> lr = optax.linear_schedule(0.1, 0.01, 5)
    >>> rho = sam_optax.rho_from_learning_rate(lr, rho_max=0.1, rho_min=0.02,
    ...                                        lr_max=0.1, lr_min=0.01)
    >>> tx = sam_optax.gsam(optax.sgd(lr), rho=rho, alpha=0.1)
    >>> def train_step(_, carry):  # a whole loop under jax.lax.fori_loop
    ...   w, state = carry
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w, loss_fn=loss)
    ...   return optax.apply_updates(w, updates), state
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> w, state = jax.lax.fori_loop(0, 5, train_step, (w, tx.init(w)))
    >>> print('{:.2E}'.format(loss(w)))
    3.24E+00

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.

  .. note::
    Under ``axis_name`` the reference implementations decompose each
    device's own ``g`` against its own ``g_p`` and then average the results;
    here the device-averaged ``g`` and ``g_p`` are decomposed (GSAM of the
    global batch, with per-device perturbations). On one device both agree.
  """
  return forms.around(_gsam, "sam_optax.gsam", locals())


gap_guided_sharpness_aware = forms.chain_block(
    gsam, _gsam, name="gap_guided_sharpness_aware",
    summary="GSAM as a chain block: SAM plus an ascent on the surrogate gap.")


def gnp(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.1,
    alpha: float = 0.8,
    *,
    has_aux: bool = False, axis_name: Optional[str] = None,
    m: Optional[int] = None, group_loop: str = "vmap", mask: Any = None,
    track_cosine: bool = False, rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-norm penalty (GNP) around any optax optimizer.

  Penalizing the gradient norm, :math:`L(w) + \lambda \|\nabla L(w)\|_2`, has
  the gradient :math:`g + \lambda H \hat g`; a finite difference with step ρ
  turns it into an interpolation between the clean and the SAM gradient,
  with :math:`\alpha = \lambda / \rho`:

  .. math::
    g_p = \nabla L\big(w + \rho\, g/\|g\|_2\big), \qquad
    u = (1 - \alpha)\, g + \alpha\, g_p.

  ``alpha=1`` is SAM, ``alpha=0`` the plain gradient.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`gradient_norm_penalty` goes first in a chain.
    rho: the finite-difference radius ρ ≥ 0 (the paper's r); default 0.1,
      the paper's CIFAR setting.
    alpha: α in [0, 1]; default 0.8, the paper's setting.
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sam`. Works with
      ``axis_name`` (the mix is linear, so averaging before or after it
      agrees).
    rho_scale: per-leaf ρ, as in :func:`asam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(jnp.cosh(w))
    >>> tx = optax.chain(  # the block first, then clipping, then SGD
    ...     sam_optax.gradient_norm_penalty(rho=0.1, alpha=0.8),
    ...     optax.clip_by_global_norm(1.0),
    ...     optax.sgd(0.5))
    >>> w = jnp.array([2.0, -1.0, 0.5])
    >>> state = tx.init(w)
    >>> updates, state = tx.update(jax.grad(loss)(w), state, w, loss_fn=loss)
    >>> print('{:.3f}'.format(optax.global_norm(updates)))
    0.500

  References:
    Zhao et al., `Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning <https://arxiv.org/abs/2202.03599>`_,
    ICML 2022.
  """
  return forms.around(_gnp, "sam_optax.gnp", locals())


gradient_norm_penalty = forms.chain_block(
    gnp, _gnp, name="gradient_norm_penalty",
    summary="Gradient-norm penalty (GNP) as a chain block: between SGD and SAM.")