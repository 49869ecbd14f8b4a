"""ASAM and Fisher-SAM: SAM's ascent step in a rescaled geometry.

Both replace SAM's Euclidean ρ-ball by an ellipsoid: ASAM scales it by the
size of each weight, Fisher-SAM by a diagonal Fisher estimate. Both are
stateless, so they work per device (``axis_name``) and per group (``m``).
Every division is by a guarded norm: a zero gradient gives ε = 0.
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

ScalarOrSchedule = core.ScalarOrSchedule


# The three published definitions of ASAM's normalization operator T_w.
ASAM_OPERATORS = ("official", "all", "abs")


_f32 = numerics.f32


# Marks a leaf where T_w = 1 (g is used as is). Not None: params may have None
# leaves of their own (filtered pytrees), which every tree map skips.
_UNIT = object()


def asam_operator(params, eta, operator: str = "official"):
  """``T_w`` leaf by leaf, in float32; ``_UNIT`` where ``T_w = 1``.

  * ``"official"``: ``|w| + η`` on leaves with ``ndim ≥ 2`` (kernels,
    embeddings), ``1`` on leaves with ``ndim ≤ 1`` (biases, norm scales).
  * ``"all"``: ``|w| + η`` on every leaf.
  * ``"abs"``: ``|w|`` on every leaf (no η).
  """
  eta = jnp.asarray(eta, jnp.float32)

  def op(w):
    if operator == "official" and jnp.ndim(w) <= 1:
      return _UNIT
    t = jnp.abs(_f32(w))
    return t if operator == "abs" else t + eta

  return jax.tree.map(op, params)


def asam_rule(eta, *, operator: str = "official") -> base.PerturbationRule:
  """ε = ρ T_w² g / ‖T_w g‖₂ (Kwon et al., 2021)."""

  def ascent(grads, state, params):
    t = asam_operator(params, eta, operator)
    tg = jax.tree.map(lambda g, t_: _f32(g) if t_ is _UNIT else _f32(g) * t_,
                      grads, t)
    inv = numerics.safe_divide(1.0, numerics.tree_norm(tg))
    d = jax.tree.map(
        lambda g, x, t_: ((x if t_ is _UNIT else x * t_) * inv).astype(g.dtype),
        grads, tg, t)
    return d, state

  return base.PerturbationRule(init=base.empty_init, ascent=ascent)


def fisher_rule(eta) -> base.PerturbationRule:
  """ε = ρ (g/(1 + η g²)) / sqrt(g·(g/(1 + η g²))) (Kim et al., 2022)."""

  def ascent(grads, state, params):
    del params
    eta_ = jnp.asarray(eta, jnp.float32)
    pre = jax.tree.map(lambda g: _f32(g) / (1.0 + eta_ * jnp.square(_f32(g))), grads)
    quad = numerics.tree_vdot(grads, pre)
    inv = numerics.safe_divide(1.0, jnp.sqrt(jnp.maximum(quad, 0.0)))
    d = jax.tree.map(lambda g, p: (p * inv).astype(g.dtype), grads, pre)
    return d, state

  return base.PerturbationRule(init=base.empty_init, ascent=ascent)


def _asam(name, *, options, rho, eta, operator):
  checks.check_choice(messages.BAD_ASAM_OPERATOR, operator,
                      ASAM_OPERATORS, name=name, operator=operator)
  checks.check_range(name, "eta", eta, hint=" The paper uses eta=0.01.")
  return core.block(asam_rule(eta, operator=operator), rho, name, options)


def _fisher(name, *, options, rho, eta):
  checks.check_range(name, "eta", eta, hint=" The paper uses eta=1.0.")
  return core.block(fisher_rule(eta), rho, name, options)


def asam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    operator: str = "official", has_aux: bool = False,
    axis_name: Optional[str] = None, m: Optional[int] = None,
    group_loop: str = "vmap", mask: Any = None, track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ASAM around any optax optimizer (adaptive, scale-invariant SAM).

  Adaptive SAM measures the neighborhood relative to the size of each weight,
  so rescaling a layer (which leaves the network's function unchanged under
  ReLU or normalization) leaves the sharpness unchanged. With the elementwise
  normalization operator :math:`T_w`:

  .. math::
    T_w = |w| + \eta \ \ (T_w = 1 \text{ on biases}), \qquad
    \varepsilon = \rho\, \frac{T_w^2\, g}{\|T_w\, g\|_2}, \qquad
    u = \nabla L(w + \varepsilon).

  ρ is about ten times SAM's (the paper uses 0.5 on CIFAR-10 and 1.0 on
  CIFAR-100). At ``g = 0``, ε is exactly 0.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`adaptive_sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0 (float or optax schedule); default 0.5 as in the
      paper. ``rho=0`` gives exactly the incoming gradient.
    eta: η ≥ 0, keeps :math:`T_w > 0` on zero weights; default 0.01 as in the
      paper. Under ``operator='abs'`` it is unused.
    operator: which published definition of :math:`T_w`. ``'official'``
      (default, the authors' code): :math:`|w| + \eta` on leaves with
      ``ndim ≥ 2`` (kernels, embeddings), 1 on leaves with ``ndim ≤ 1``
      (biases, normalization scales). ``'all'``: :math:`|w| + \eta` on every
      leaf. ``'abs'``: :math:`|w|` on every leaf, no η (``davda54/sam`` with
      ``adaptive=True``). Structural.
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sam`. Stateless:
      works per device (``axis_name``) and per group of ``m`` examples.
    rho_scale: per-leaf ρ: a pytree of numbers ≥ 0 like params (or
      ``params -> pytree``); each leaf's ε is multiplied by its number.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    >>> y = jnp.array([1.0, -1.0, 0.0])
    >>> loss = lambda w: jnp.mean((x @ w - y) ** 2)
    >>> tx = sam_optax.asam(optax.sgd(0.05), rho=0.5, eta=0.01)
    >>> @jax.jit
    ... def step(w, state):
    ...   value, grads = jax.value_and_grad(loss)(w)  # L(w) feeds the info
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss, value=value)
    ...   return optax.apply_updates(w, updates), state
    >>> w = jnp.array([0.5, 0.5])
    >>> w, state = step(w, tx.init(w))
    >>> info = sam_optax.get_info(state)
    >>> print(f'loss {info.loss:.3f}, sharpness {info.sharpness:.3f}')
    loss 1.500, sharpness 3.127

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

  .. note::
    The authors' code decides by parameter *name*: every PyTorch parameter
    called ``weight`` gets :math:`|w| + \eta`, including BatchNorm's and
    LayerNorm's scale, and biases get 1. Pytrees have no such convention, so
    ``'official'`` decides by rank: 1-D leaves (biases and normalization
    scales) get :math:`T_w = 1`. This is the authors' rule exactly on models
    whose only 1-D params are biases; on a model with normalization layers it
    differs on their scales (on a small MLP with a LayerNorm, ε is 0.14 off
    in relative norm). No option reproduces the name-based rule there:
    ``'all'`` also rescales the biases (0.98 off on that MLP), and ``mask``
    and ``rho_scale`` remove or scale a leaf's ε after normalization but do
    not change its :math:`T_w` inside the norm :math:`\|T_w g\|_2`.
  """
  return forms.around(_asam, "sam_optax.asam", locals())


adaptive_sharpness_aware = forms.chain_block(
    asam, _asam, name="adaptive_sharpness_aware",
    summary="ASAM as a chain block: the SAM gradient in a scale-invariant ρ-ball.")


def fisher_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.1,
    eta: float = 1.0,
    *,
    has_aux: bool = False, axis_name: Optional[str] = None,
    m: Optional[int] = None, group_loop: str = "vmap", mask: Any = None,
    track_cosine: bool = False, rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Fisher-SAM around any optax optimizer.

  Fisher-SAM replaces SAM's Euclidean ball by the ellipsoid
  :math:`\varepsilon^\top F \varepsilon \le \rho^2` of a diagonal Fisher
  estimate :math:`F = I + \eta\, \mathrm{diag}(f)`, with :math:`f = g^2` the
  squared batch gradient:

  .. math::
    \varepsilon = \rho\, \frac{g / (1 + \eta f)}
    {\sqrt{g \cdot \big(g / (1 + \eta f)\big)}}, \qquad
    u = \nabla L(w + \varepsilon).

  At ``g = 0``, ε is exactly 0; ``eta=0`` gives SAM.

  Args:
    base_optimizer: any optax transformation (``optax.sgd``,
      ``optax.adamw``, a chain, ...). Without it, the chain block
      :func:`fisher_sharpness_aware` goes first in a chain.
    rho: the radius ρ ≥ 0 (the paper's γ); default 0.1, the paper's setting.
    eta: η ≥ 0, the weight of the Fisher term; default 1.0, the paper's
      setting (η = 0 is SAM).
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sam`. Stateless:
      works per device (``axis_name``) and per group of ``m`` examples (each
      uses its own gradient for ``f``).
    rho_scale: per-leaf ρ, as in :func:`asam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    >>> y = jnp.array([1.0, -1.0, 0.0])
    >>> def loss(w):  # (loss, aux): here the fraction of small residuals
    ...   err = x @ w - y
    ...   return jnp.mean(err ** 2), jnp.mean(jnp.abs(err) < 0.5)
    >>> tx = sam_optax.fisher_sam(optax.sgd(0.1, momentum=0.5), rho=0.1,
    ...                           eta=1.0, has_aux=True)
    >>> w = jnp.zeros(2)
    >>> state = tx.init(w)
    >>> for _ in range(20):
    ...   (value, hits), grads = jax.value_and_grad(loss, has_aux=True)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    >>> print(f'{value:.3f} {hits:.2f}')
    0.017 1.00

  References:
    Kim et al., `Fisher SAM: Information Geometry and Sharpness Aware
    Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022.

  .. note::
    ``f`` is the square of the (mini-)batch gradient, the paper's
    gradient-magnitude approximation; it is recomputed at every step (no
    moving average), which keeps the method stateless.
  """
  return forms.around(_fisher, "sam_optax.fisher_sam", locals())


fisher_sharpness_aware = forms.chain_block(
    fisher_sam, _fisher, name="fisher_sharpness_aware",
    summary="Fisher-SAM as a chain block: the ρ-ball of the Fisher information metric.")