"""VaSSO and Friendly-SAM: ε from a moving average of past gradients.

Both keep an exponential moving average (EMA) of the gradient in the rule
state and update it in ``ascent``, from the (masked) gradient of this device.
Under ``axis_name`` the machinery averages that update in the step's one
all-reduce, so the state stays replicated; since the update is linear in
``g`` the result is the EMA of the device-mean gradient, while each device
still perturbs with its own gradient. The state lives across steps, so these
rules cannot give each in-device group of examples its own ε
(``supports_groups=False``).

As in both reference implementations, the EMA starts at the first gradient
(not at zero).
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

ScalarOrSchedule = core.ScalarOrSchedule


_f32 = numerics.f32


class GradientEMAState(NamedTuple):
  """State of the VaSSO and Friendly-SAM rules.

  Attributes:
    ema: moving average of the gradient, like params.
    started: whether ``ema`` holds a gradient yet (False before the first step,
      when the first gradient initializes it).
  """

  ema: chex.ArrayTree
  started: chex.Array


def _init(params):
  return GradientEMAState(ema=optax.tree.zeros_like(params),
                          started=jnp.zeros([], jnp.bool_))


def _ema_update(state, grads, weight_old, weight_new):
  """``where(started, weight_old·ema + weight_new·g, g)`` leaf by leaf."""
  return jax.tree.map(
      lambda e, g: jnp.where(state.started,
                             weight_old * _f32(e) + weight_new * _f32(g),
                             _f32(g)).astype(e.dtype),
      state.ema, grads)


def _unit(tree, like):
  inv = numerics.safe_divide(1.0, numerics.tree_norm(tree))
  return jax.tree.map(lambda x, g: (_f32(x) * inv).astype(g.dtype), tree, like)


def vasso_rule(theta) -> base.PerturbationRule:
  """d_t = (1 − θ) d_{t−1} + θ g_t; ε = ρ d_t/‖d_t‖ (Li & Giannakis, 2023)."""

  def ascent(grads, state, params):
    del params
    theta_ = jnp.asarray(theta, jnp.float32)
    ema = _ema_update(state, grads, 1.0 - theta_, theta_)
    return _unit(ema, grads), GradientEMAState(
        ema=ema, started=jnp.ones([], jnp.bool_))

  return base.PerturbationRule(init=_init, ascent=ascent, supports_groups=False)


def friendly_rule(sigma, decay) -> base.PerturbationRule:
  """m_t = λ m_{t−1} + (1 − λ) g_t; ε = ρ (g − σ m_t)/‖g − σ m_t‖.

  Li et al., 2024.

  On the very first step (no history yet) ε follows ``g``, as in the
  reference implementation.
  """

  def ascent(grads, state, params):
    del params
    decay_ = jnp.asarray(decay, jnp.float32)
    sigma_ = jnp.asarray(sigma, jnp.float32)
    ema = _ema_update(state, grads, decay_, 1.0 - decay_)
    noise = jax.tree.map(
        lambda g, m: jnp.where(state.started, _f32(g) - sigma_ * _f32(m), _f32(g)),
        grads, ema)
    return _unit(noise, grads), GradientEMAState(
        ema=ema, started=jnp.ones([], jnp.bool_))

  return base.PerturbationRule(init=_init, ascent=ascent, supports_groups=False)


def _vasso(name, *, options, rho, theta):
  checks.check_range(name, "theta", theta, high=1.0, low_open=True,
              hint=" θ = 1 is SAM; the reference code uses theta=0.9.")
  return core.block(vasso_rule(theta), rho, name, options)


def _friendly(name, *, options, rho, sigma, decay):
  checks.check_range(name, "sigma", sigma,
              hint=" σ = 0 is SAM; the paper uses sigma=1.")
  checks.check_range(name, "decay", decay, high=1.0, high_open=True,
              hint=" The reference code uses decay=0.95 (the paper's λ).")
  return core.block(friendly_rule(sigma, decay), rho, name, options)


def vasso(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    theta: float = 0.9,
    *,
    has_aux: bool = False, axis_name: Optional[str] = None, mask: Any = None,
    track_cosine: bool = False, rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""VaSSO around any optax optimizer: ε along an EMA of the gradients.

  Variance-suppressed sharpness-aware optimization steadies SAM's inner
  maximization by perturbing along an exponential moving average of the
  gradients instead of the noisy batch gradient:

  .. math::
    d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \qquad
    \varepsilon = \rho\, \frac{d_t}{\|d_t\|_2}, \qquad
    u = \nabla L(w + \varepsilon),

  with :math:`d_0 = g_0`. ``theta=1`` is SAM.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`variance_suppressed_sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    theta: θ in (0, 1], the weight of the newest gradient; default 0.9, the
      reference code's default (its CIFAR scripts also use 0.9).
    has_aux, axis_name, mask, track_cosine: as in
      :func:`sam`. Works with
      ``axis_name``: each device perturbs along its own
      :math:`(1-\theta) d_{t-1} + \theta g_t`, and the stored :math:`d_t` is
      averaged in the step's one all-reduce (so it is the average of the
      device-mean gradients and stays replicated). There is no ``m``: the
      average spans steps, not groups of examples.
    rho_scale: per-leaf ρ, as in :func:`asam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state:
    :class:`GradientEMAState` inside :class:`SharpnessAwareState`); ``update``
    needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.vasso(optax.sgd(0.1), rho=0.05, theta=0.9)
    >>> def step(carry, _):  # a training loop under jax.lax.scan
    ...   w, state = carry
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   return (w, state), loss(w)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> _, losses = jax.lax.scan(step, (w, tx.init(w)), length=4)
    >>> print(' '.join(f'{x:.2f}' for x in losses))
    8.58 5.45 3.45 2.18

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  return forms.around(_vasso, "sam_optax.vasso", locals())


variance_suppressed_sharpness_aware = forms.chain_block(
    vasso, _vasso, name="variance_suppressed_sharpness_aware",
    summary="VaSSO as a chain block: ε along a moving average of the gradients.")


def friendly_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    decay: float = 0.95,
    *,
    has_aux: bool = False, axis_name: Optional[str] = None, mask: Any = None,
    track_cosine: bool = False, rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM (F-SAM) around any optax optimizer.

  F-SAM removes from the batch gradient its full-gradient component, estimated
  by an exponential moving average of past gradients, and perturbs along what
  is left (the batch-specific noise):

  .. math::
    m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad
    \varepsilon = \rho\, \frac{g_t - \sigma m_t}{\|g_t - \sigma m_t\|_2},
    \qquad u = \nabla L(w + \varepsilon).

  On the first step (no history) ε follows :math:`g_0`, and
  :math:`m_0 = g_0`, as in the reference code. ``sigma=0`` is SAM.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`friendly_sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    sigma: σ ≥ 0, how much of the averaged gradient to remove; default 1.0,
      the value used in all the paper's experiments.
    decay: λ in [0, 1), the EMA decay (the paper's λ); default 0.95, the
      reference scripts' value.
    has_aux, axis_name, mask, track_cosine: as in
      :func:`sam`. Works with
      ``axis_name`` like :func:`variance_suppressed_sharpness_aware` (the EMA
      is averaged over devices in the step's one all-reduce). No ``m``.
    rho_scale: per-leaf ρ, as in :func:`asam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"kernel": jnp.array([[1.0, -2.0], [0.5, 1.0]]),
    ...           "bias": jnp.array([0.1, -0.1])}
    >>> def loss(p):
    ...   return jnp.sum((jnp.tanh(p["kernel"]) + p["bias"]) ** 2)
    >>> tx = sam_optax.friendly_sam(optax.sgd(0.1), rho=0.05,
    ...                             mask={"kernel": True, "bias": False})
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            loss_fn=loss)
    >>> print('{:.3f}'.format(sam_optax.get_info(state).perturbation_norm))
    0.050

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.

  .. note::
    The reference code subtracts the average *before* updating it
    (:math:`g_t - \sigma m_{t-1}`); the paper's equation, used here, subtracts
    :math:`m_t`. For σ = 1 (the paper's setting) the two give the same ε,
    since then :math:`g_t - m_t = \lambda (g_t - m_{t-1})`.
  """
  return forms.around(_friendly, "sam_optax.friendly_sam", locals())


friendly_sharpness_aware = forms.chain_block(
    friendly_sam, _friendly, name="friendly_sharpness_aware",
    summary="Friendly-SAM (F-SAM) as a chain block: perturb along the gradient noise.")