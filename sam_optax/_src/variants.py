r"""The SAM family: ASAM, Fisher-SAM, GSAM, GNP, LookSAM, interval, VaSSO, F-SAM, MSAM.

Each method is a small :class:`~sam_optax.PerturbationRule` (in
``sam_optax._src.rules``) run by the one shared machinery
(:func:`sam_optax.sharpness_aware_transform`), except MSAM, which needs no
second pass and owns its momentum. Every method comes twice:

* a *chain block* (``adaptive_sharpness_aware``, ...) that turns the batch
  gradient into the method's direction; put it first in an ``optax.chain``;
* a *wrapper* named after the paper (``asam``, ...) equal to
  ``optax.chain(block, base_optimizer)``.

Hyper-parameters such as ``rho``, ``alpha``, ``eta`` are plain arguments, so
``optax.inject_hyperparams(sam_optax.gsam)(...)`` can change them during
training. Structural arguments (``k``, ``m``, ``operator``) select the
computation and cannot be injected; list them in ``static_args``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import checks
from sam_optax._src import core
from sam_optax._src import msam as msam_lib
from sam_optax._src.rules import adaptive
from sam_optax._src.rules import gap
from sam_optax._src.rules import momentum as momentum_rules
from sam_optax._src.rules import reuse

ScalarOrSchedule = core.ScalarOrSchedule


# --- Validation of hyper-parameters (concrete values only). ------------------


def _block(name, rule, rho, *, has_aux, axis_name, m, group_loop, mask,
           track_cosine, rho_scale):
  return core.sharpness_aware_transform(
      rule, rho, name=name, has_aux=has_aux, axis_name=axis_name, m=m,
      group_loop=group_loop, mask=mask, track_cosine=track_cosine,
      rho_scale=rho_scale)


# --- ASAM ---------------------------------------------------------------------


def _asam_rule(name, eta, operator):
  checks.check_choice(checks.BAD_ASAM_OPERATOR, operator,
                      adaptive.ASAM_OPERATORS, name=name, operator=operator)
  checks.check_range(name, "eta", eta, hint=" The paper uses eta=0.01.")
  return adaptive.asam(eta, operator=operator)


def adaptive_sharpness_aware(
    rho: ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    operator: str = "official",
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ASAM as a chain block: the SAM gradient in a scale-invariant ρ-ball.

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
      :func:`sharpness_aware`. Stateless:
      works per device (``axis_name``) and per group of ``m`` examples.
    rho_scale: per-leaf ρ: a pytree of numbers ≥ 0 like params (or
      ``params -> pytree``); each leaf's ε is multiplied by its number.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.adaptive_sharpness_aware(rho=0.5),
    ...                  optax.sgd(0.1))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    7.34E+00
    4.03E+00
    2.24E+00
    1.28E+00
    7.54E-01

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

  .. note::
    The authors' code decides by parameter *name*: every PyTorch parameter
    called ``weight`` gets :math:`|w| + \eta`, including BatchNorm's scale.
    Pytrees have no such convention, so ``'official'`` decides by rank: 1-D
    leaves (biases and normalization scales) get :math:`T_w = 1`. For the
    name-based rule exactly, use ``operator='all'`` with ``mask`` or
    ``rho_scale`` as needed.
  """
  name = "sam_optax.adaptive_sharpness_aware"
  return _block(name, _asam_rule(name, eta, operator), rho, has_aux=has_aux,
                axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def asam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    operator: str = "official",
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ASAM around any optax optimizer (adaptive, scale-invariant SAM).

  ``optax.chain(adaptive_sharpness_aware(rho, eta, ...), base_optimizer)``:

  .. math::
    \varepsilon = \rho\, \frac{T_w^2\, g}{\|T_w\, g\|_2},\quad
    T_w = |w| + \eta\ (1 \text{ on biases}), \qquad
    w_{t+1} = w_t + \operatorname{base}\big(\nabla L(w_t + \varepsilon)\big).

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0; default 0.5 (the paper's CIFAR-10 value).
    eta: η ≥ 0; default 0.01.
    operator, has_aux, axis_name, m, group_loop, mask, track_cosine, rho_scale: as in
      :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.asam(optax.sgd(0.1), rho=0.5, eta=0.01)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    7.34E+00
    4.03E+00
    2.24E+00
    1.28E+00
    7.54E-01

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  name = "sam_optax.asam"
  return optax.chain(
      _block(name, _asam_rule(name, eta, operator), rho, has_aux=has_aux,
             axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


# --- Fisher-SAM -----------------------------------------------------------------


def _fisher_rule(name, eta):
  checks.check_range(name, "eta", eta, hint=" The paper uses eta=1.0.")
  return adaptive.fisher(eta)


def fisher_sharpness_aware(
    rho: ScalarOrSchedule = 0.1,
    eta: float = 1.0,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Fisher-SAM as a chain block: the ρ-ball of the Fisher information metric.

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
    rho: the radius ρ ≥ 0 (the paper's γ); default 0.1, the paper's setting.
    eta: η ≥ 0, the weight of the Fisher term; default 1.0, the paper's
      setting (η = 0 is SAM).
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sharpness_aware`. Stateless:
      works per device (``axis_name``) and per group of ``m`` examples (each
      uses its own gradient for ``f``).
    rho_scale: per-leaf ρ, as in :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.fisher_sharpness_aware(rho=0.1, eta=1.0),
    ...                  optax.sgd(0.1))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.61E+00
    5.49E+00
    3.49E+00
    2.21E+00
    1.39E+00

  References:
    Kim et al., `Fisher SAM: Information Geometry and Sharpness Aware
    Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022.

  .. note::
    ``f`` is the square of the (mini-)batch gradient, the paper's
    gradient-magnitude approximation; it is recomputed at every step (no
    moving average), which keeps the method stateless.
  """
  name = "sam_optax.fisher_sharpness_aware"
  return _block(name, _fisher_rule(name, eta), rho, has_aux=has_aux,
                axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def fisher_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.1,
    eta: float = 1.0,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Fisher-SAM around any optax optimizer.

  ``optax.chain(fisher_sharpness_aware(rho, eta, ...), base_optimizer)``:

  .. math::
    \varepsilon = \rho\, \frac{g / (1 + \eta g^2)}
    {\sqrt{g \cdot (g / (1 + \eta g^2))}}, \qquad
    w_{t+1} = w_t + \operatorname{base}\big(\nabla L(w_t + \varepsilon)\big).

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0; default 0.1.
    eta: η ≥ 0; default 1.0.
    has_aux, axis_name, m, group_loop, mask, track_cosine, rho_scale: as in
      :func:`fisher_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.fisher_sam(optax.sgd(0.1), rho=0.1, eta=1.0)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.61E+00
    5.49E+00
    3.49E+00
    2.21E+00
    1.39E+00

  References:
    Kim et al., `Fisher SAM: Information Geometry and Sharpness Aware
    Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022.
  """
  name = "sam_optax.fisher_sam"
  return optax.chain(
      _block(name, _fisher_rule(name, eta), rho, has_aux=has_aux,
             axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


# --- GSAM and the gradient-norm penalty ------------------------------------------


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
      raise ValueError(checks.LR_MAX_NEEDED.format(name=name))
    lr_max = learning_rate
  checks.check_range(name, "lr_max", lr_max)
  span = float(lr_max) - float(lr_min)
  if span < 0:
    raise ValueError(checks.LR_MAX_BELOW_MIN.format(
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


def _gsam_rule(name, alpha):
  checks.check_range(name, "alpha", alpha,
              hint=" α = 0 gives SAM; the paper uses 0.01–0.6.")
  return gap.gsam(alpha)


def gap_guided_sharpness_aware(
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GSAM as a chain block: SAM plus an ascent on the surrogate gap.

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
    rho: the radius ρ ≥ 0, a float or a schedule (for example
      ``rho_from_learning_rate(lr, rho_max=0.6, rho_min=0.1, lr_max=...)``,
      the paper's ViT-B/32 setting); run-time values below 0 are clamped to 0.
      Default 0.05.
    alpha: α ≥ 0, the strength of the gap ascent; α = 0 is SAM. Default 0.1
      (the paper searches 0.01–0.3 for ResNets and uses 0.6 for ViT-B/32).
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sharpness_aware`. Works with
      ``axis_name``: ``g`` and ``g_p`` are averaged over devices (one
      all-reduce) before the decomposition.
    rho_scale: per-leaf ρ, as in :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.gap_guided_sharpness_aware(0.05, alpha=0.1),
    ...                  optax.sgd(0.1))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.58E+00
    5.45E+00
    3.45E+00
    2.18E+00
    1.37E+00

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.

  .. note::
    Under ``axis_name`` the reference implementations decompose each
    device's own ``g`` against its own ``g_p`` and then average the results;
    here the device-averaged ``g`` and ``g_p`` are decomposed (GSAM of the
    global batch, with per-device perturbations). On one device both agree.
  """
  name = "sam_optax.gap_guided_sharpness_aware"
  return _block(name, _gsam_rule(name, alpha), rho, has_aux=has_aux,
                axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def gsam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GSAM (surrogate-gap guided SAM) around any optax optimizer.

  ``optax.chain(gap_guided_sharpness_aware(rho, alpha, ...), base_optimizer)``:

  .. math::
    g_p = \nabla L(w + \rho_t\, \hat g), \quad
    g_\perp = g - \frac{g \cdot g_p}{\|g_p\|^2} g_p, \quad
    w_{t+1} = w_t + \operatorname{base}(g_p - \alpha\, g_\perp).

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0 or a schedule (see :func:`rho_from_learning_rate`).
    alpha: α ≥ 0; default 0.1.
    has_aux, axis_name, m, group_loop, mask, track_cosine, rho_scale: as in
      :func:`gap_guided_sharpness_aware`.

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
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.52E+00
    5.89E+00
    4.44E+00
    3.64E+00
    3.24E+00

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  name = "sam_optax.gsam"
  return optax.chain(
      _block(name, _gsam_rule(name, alpha), rho, has_aux=has_aux,
             axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


def _gnp_rule(name, alpha):
  checks.check_range(name, "alpha", alpha, high=1.0,
              hint=" α = 0 is the plain gradient, α = 1 is SAM; the paper "
              "uses 0.8.")
  return gap.gradient_norm_penalty(alpha)


def gradient_norm_penalty(
    rho: ScalarOrSchedule = 0.1,
    alpha: float = 0.8,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-norm penalty (GNP) as a chain block: between SGD and SAM.

  Penalizing the gradient norm, :math:`L(w) + \lambda \|\nabla L(w)\|_2`, has
  the gradient :math:`g + \lambda H \hat g`; a finite difference with step ρ
  turns it into an interpolation between the clean and the SAM gradient,
  with :math:`\alpha = \lambda / \rho`:

  .. math::
    g_p = \nabla L\big(w + \rho\, g/\|g\|_2\big), \qquad
    u = (1 - \alpha)\, g + \alpha\, g_p.

  ``alpha=1`` is SAM, ``alpha=0`` the plain gradient.

  Args:
    rho: the finite-difference radius ρ ≥ 0 (the paper's r); default 0.1,
      the paper's CIFAR setting.
    alpha: α in [0, 1]; default 0.8, the paper's setting.
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sharpness_aware`. Works with
      ``axis_name`` (the mix is linear, so averaging before or after it
      agrees).
    rho_scale: per-leaf ρ, as in :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.gradient_norm_penalty(0.1, alpha=0.8),
    ...                  optax.sgd(0.1))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.55E+00
    5.39E+00
    3.39E+00
    2.12E+00
    1.32E+00

  References:
    Zhao et al., `Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning <https://arxiv.org/abs/2202.03599>`_,
    ICML 2022.
  """
  name = "sam_optax.gradient_norm_penalty"
  return _block(name, _gnp_rule(name, alpha), rho, has_aux=has_aux,
                axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def gnp(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.1,
    alpha: float = 0.8,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-norm penalty (GNP) around any optax optimizer.

  ``optax.chain(gradient_norm_penalty(rho, alpha, ...), base_optimizer)``:

  .. math::
    w_{t+1} = w_t + \operatorname{base}\big((1 - \alpha)\, g
    + \alpha\, \nabla L(w_t + \rho\, \hat g)\big).

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0; default 0.1.
    alpha: α in [0, 1]; default 0.8.
    has_aux, axis_name, m, group_loop, mask, track_cosine, rho_scale: as in
      :func:`gradient_norm_penalty`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.gnp(optax.sgd(0.1), rho=0.1, alpha=0.8)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.55E+00
    5.39E+00
    3.39E+00
    2.12E+00
    1.32E+00

  References:
    Zhao et al., `Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning <https://arxiv.org/abs/2202.03599>`_,
    ICML 2022.
  """
  name = "sam_optax.gnp"
  return optax.chain(
      _block(name, _gnp_rule(name, alpha), rho, has_aux=has_aux,
             axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


# --- LookSAM and interval SAM ------------------------------------------------------


def _looksam_rule(name, k, alpha):
  k = checks.check_k(name, k)
  checks.check_range(name, "alpha", alpha, hint=" The paper uses alpha=0.7.")
  return reuse.looksam(alpha, k)


def look_sharpness_aware(
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM as a chain block: a SAM step every k steps, reused in between.

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
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    k: steps from one SAM step to the next, an integer ≥ 1 (``k=1`` is SAM);
      default 5 as in the paper. Structural: under
      ``optax.inject_hyperparams`` list it in ``static_args``.
    alpha: α ≥ 0, the weight of the reused direction; default 0.7 as in the
      paper. ``alpha=0`` gives the plain gradient between SAM steps.
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sharpness_aware`. Works with
      ``axis_name``: ``g_v`` is computed from device-averaged gradients, so it
      stays replicated.
    rho_scale: per-leaf ρ, as in :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state:
    :class:`LookSAMState` inside :class:`SharpnessAwareState`); ``update``
    needs ``loss_fn=`` on every step (it is called on SAM steps only).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2) + jnp.sum(w ** 4) / 4
    >>> tx = optax.chain(sam_optax.look_sharpness_aware(0.05, k=2),
    ...                  optax.sgd(0.05))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    7.95E+00
    6.50E+00
    4.50E+00
    3.52E+00
    2.78E+00

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  name = "sam_optax.look_sharpness_aware"
  return _block(name, _looksam_rule(name, k, alpha), rho, has_aux=has_aux,
                axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def looksam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM around any optax optimizer: SAM every k steps, reused between.

  ``optax.chain(look_sharpness_aware(rho, k, alpha, ...), base_optimizer)``;
  between SAM steps the direction is
  :math:`g + \alpha (\|g\|/\|g_v\|)\, g_v`, one gradient per step.

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0; default 0.05.
    k: steps from one SAM step to the next (≥ 1, structural); default 5.
    alpha: α ≥ 0; default 0.7.
    has_aux, axis_name, m, group_loop, mask, track_cosine, rho_scale: as in
      :func:`look_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2) + jnp.sum(w ** 4) / 4
    >>> tx = sam_optax.looksam(optax.sgd(0.05), rho=0.05, k=2, alpha=0.7)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    7.95E+00
    6.50E+00
    4.50E+00
    3.52E+00
    2.78E+00

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  name = "sam_optax.looksam"
  return optax.chain(
      _block(name, _looksam_rule(name, k, alpha), rho, has_aux=has_aux,
             axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


def interval_sharpness_aware(
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Interval SAM as a chain block: SAM every k steps, the plain gradient otherwise.

  .. math::
    u_t = \begin{cases} \nabla L(w_t + \rho\, \hat g_t) & t \equiv 0 \pmod k \\
    g_t & \text{otherwise.} \end{cases}

  One compiled program for both kinds of step (``lax.cond``); the second pass
  runs on SAM steps only, so ``k=5`` costs about 1.2 gradients per step. The
  cheap baseline of the LookSAM paper ("SAM-k"), also known as composer's
  ``interval``.

  Args:
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    k: steps from one SAM step to the next (integer ≥ 1; ``k=1`` is SAM);
      default 5. Structural: list it in ``static_args`` under
      ``optax.inject_hyperparams``.
    has_aux, axis_name, m, group_loop, mask, track_cosine: as in
      :func:`sharpness_aware`. Stateless:
      works per device and per group.
    rho_scale: per-leaf ρ, as in :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``loss_fn=`` on every step (it is called on SAM steps only).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2) + jnp.sum(w ** 4) / 4
    >>> tx = optax.chain(sam_optax.interval_sharpness_aware(0.05, k=2),
    ...                  optax.sgd(0.05))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    7.95E+00
    5.25E+00
    3.82E+00
    2.99E+00
    2.40E+00

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (the "SAM-k" baseline).

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  name = "sam_optax.interval_sharpness_aware"
  return _block(name, reuse.interval(checks.check_k(name, k)), rho, has_aux=has_aux,
                axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def interval_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 5,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    m: Optional[int] = None,
    group_loop: str = "vmap",
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Interval SAM around any optax optimizer: SAM every k steps.

  ``optax.chain(interval_sharpness_aware(rho, k, ...), base_optimizer)``: the
  SAM gradient on steps 0, k, 2k, ..., the plain gradient on the others.

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0; default 0.05.
    k: steps from one SAM step to the next (≥ 1, structural); default 5.
    has_aux, axis_name, m, group_loop, mask, track_cosine, rho_scale: as in
      :func:`interval_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2) + jnp.sum(w ** 4) / 4
    >>> tx = sam_optax.interval_sam(optax.sgd(0.05), rho=0.05, k=2)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    7.95E+00
    5.25E+00
    3.82E+00
    2.99E+00
    2.40E+00

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (the "SAM-k" baseline).
  """
  name = "sam_optax.interval_sam"
  return optax.chain(
      _block(name, reuse.interval(checks.check_k(name, k)), rho, has_aux=has_aux,
             axis_name=axis_name, m=m, group_loop=group_loop, mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


# --- VaSSO and Friendly-SAM ----------------------------------------------------------


def _vasso_rule(name, theta):
  checks.check_range(name, "theta", theta, high=1.0, low_open=True,
              hint=" θ = 1 is SAM; the reference code uses theta=0.9.")
  return momentum_rules.vasso(theta)


def variance_suppressed_sharpness_aware(
    rho: ScalarOrSchedule = 0.05,
    theta: float = 0.9,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""VaSSO as a chain block: ε along a moving average of the gradients.

  Variance-suppressed sharpness-aware optimization steadies SAM's inner
  maximization by perturbing along an exponential moving average of the
  gradients instead of the noisy batch gradient:

  .. math::
    d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \qquad
    \varepsilon = \rho\, \frac{d_t}{\|d_t\|_2}, \qquad
    u = \nabla L(w + \varepsilon),

  with :math:`d_0 = g_0`. ``theta=1`` is SAM.

  Args:
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    theta: θ in (0, 1], the weight of the newest gradient; default 0.9, the
      reference code's default (its CIFAR scripts also use 0.9).
    has_aux, axis_name, mask, track_cosine: as in
      :func:`sharpness_aware`. Works with
      ``axis_name``: each device perturbs along its own
      :math:`(1-\theta) d_{t-1} + \theta g_t`, and the stored :math:`d_t` is
      averaged in the step's one all-reduce (so it is the average of the
      device-mean gradients and stays replicated). There is no ``m``: the
      average spans steps, not groups of examples.
    rho_scale: per-leaf ρ, as in :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state:
    :class:`GradientEMAState` inside :class:`SharpnessAwareState`); ``update``
    needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(
    ...     sam_optax.variance_suppressed_sharpness_aware(0.05, theta=0.9),
    ...     optax.sgd(0.1))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.58E+00
    5.45E+00
    3.45E+00
    2.18E+00
    1.37E+00

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  name = "sam_optax.variance_suppressed_sharpness_aware"
  return _block(name, _vasso_rule(name, theta), rho, has_aux=has_aux,
                axis_name=axis_name, m=None, group_loop="vmap", mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def vasso(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    theta: float = 0.9,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""VaSSO around any optax optimizer: ε along an EMA of the gradients.

  ``optax.chain(variance_suppressed_sharpness_aware(rho, theta, ...), base)``:

  .. math::
    d_t = (1 - \theta) d_{t-1} + \theta g_t, \qquad
    w_{t+1} = w_t + \operatorname{base}\big(\nabla L(w_t + \rho\, d_t/\|d_t\|)\big).

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0; default 0.05.
    theta: θ in (0, 1]; default 0.9.
    has_aux, axis_name, mask, track_cosine, rho_scale: as in
      :func:`variance_suppressed_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.vasso(optax.sgd(0.1), rho=0.05, theta=0.9)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.58E+00
    5.45E+00
    3.45E+00
    2.18E+00
    1.37E+00

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  name = "sam_optax.vasso"
  return optax.chain(
      _block(name, _vasso_rule(name, theta), rho, has_aux=has_aux,
             axis_name=axis_name, m=None, group_loop="vmap", mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


def _friendly_rule(name, sigma, decay):
  checks.check_range(name, "sigma", sigma,
              hint=" σ = 0 is SAM; the paper uses sigma=1.")
  checks.check_range(name, "decay", decay, high=1.0, high_open=True,
              hint=" The reference code uses decay=0.95 (the paper's λ).")
  return momentum_rules.friendly(sigma, decay)


def friendly_sharpness_aware(
    rho: ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    decay: float = 0.95,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM (F-SAM) as a chain block: perturb along the gradient noise.

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
    rho: the radius ρ ≥ 0 (float or schedule); default 0.05.
    sigma: σ ≥ 0, how much of the averaged gradient to remove; default 1.0,
      the value used in all the paper's experiments.
    decay: λ in [0, 1), the EMA decay (the paper's λ); default 0.95, the
      reference scripts' value.
    has_aux, axis_name, mask, track_cosine: as in
      :func:`sharpness_aware`. Works with
      ``axis_name`` like :func:`variance_suppressed_sharpness_aware` (the EMA
      is averaged over devices in the step's one all-reduce). No ``m``.
    rho_scale: per-leaf ρ, as in :func:`adaptive_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(sam_optax.friendly_sharpness_aware(0.05),
    ...                  optax.sgd(0.1))
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.58E+00
    5.54E+00
    3.58E+00
    2.32E+00
    1.51E+00

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.

  .. note::
    The reference code subtracts the average *before* updating it
    (:math:`g_t - \sigma m_{t-1}`); the paper's equation, used here, subtracts
    :math:`m_t`. For σ = 1 (the paper's setting) the two give the same ε,
    since then :math:`g_t - m_t = \lambda (g_t - m_{t-1})`.
  """
  name = "sam_optax.friendly_sharpness_aware"
  return _block(name, _friendly_rule(name, sigma, decay), rho, has_aux=has_aux,
                axis_name=axis_name, m=None, group_loop="vmap", mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale)


def friendly_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    decay: float = 0.95,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    mask: Any = None,
    track_cosine: bool = False,
    rho_scale: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM (F-SAM) around any optax optimizer.

  ``optax.chain(friendly_sharpness_aware(rho, sigma, decay, ...), base)``:

  .. math::
    m_t = \lambda m_{t-1} + (1 - \lambda) g_t, \qquad
    w_{t+1} = w_t + \operatorname{base}\Big(\nabla L\big(w_t + \rho\,
    \tfrac{g_t - \sigma m_t}{\|g_t - \sigma m_t\|}\big)\Big).

  Args:
    base_optimizer: any optax transformation.
    rho: the radius ρ ≥ 0; default 0.05.
    sigma: σ ≥ 0; default 1.0.
    decay: λ in [0, 1); default 0.95.
    has_aux, axis_name, mask, track_cosine, rho_scale: as in
      :func:`friendly_sharpness_aware`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``loss_fn=``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.friendly_sam(optax.sgd(0.1), rho=0.05)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(w)))
    8.58E+00
    5.54E+00
    3.58E+00
    2.32E+00
    1.51E+00

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  name = "sam_optax.friendly_sam"
  return optax.chain(
      _block(name, _friendly_rule(name, sigma, decay), rho, has_aux=has_aux,
             axis_name=axis_name, m=None, group_loop="vmap", mask=mask,
             track_cosine=track_cosine, rho_scale=rho_scale),
      base_optimizer)


# --- MSAM ---------------------------------------------------------------------------


def msam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.3,
    momentum: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM: SAM along the negative momentum, one gradient per step.

  MSAM perturbs the weights along the direction they are moving in (the
  negative momentum), which needs no extra gradient: the params this
  optimizer hands back are already the perturbed ones, :math:`\tilde w =
  w + \varepsilon`, and the gradient you compute at them is MSAM's gradient.
  With the momentum :math:`v` (``v ← μ v + g``, kept by MSAM itself):

  .. math::
    g_t = \nabla L(\tilde w_t), \quad v_{t+1} = \mu v_t + g_t, \quad
    w_{t+1} = w_t + \operatorname{base}(g_t), \quad
    \tilde w_{t+1} = w_{t+1} - \rho\, \frac{v_{t+1}}{\|v_{t+1}\|_2}.

  The base optimizer sees the unperturbed :math:`w_t` (for weight decay).
  With ``optax.sgd(lr, momentum=μ)`` and the same ``momentum=μ`` this is the
  paper's MSAM; with ``optax.adamw(lr, b1=β)`` and ``momentum=β`` it is the
  paper's AdamW-MSAM (the perturbation follows Adam's first moment).

  **Unperturbed params.** Evaluate, and finish training, with
  :func:`sam_optax.remove_perturbation`:
  ``params = sam_optax.remove_perturbation(params, opt_state)``.

  Args:
    base_optimizer: the optimizer that makes the step (typically
      ``optax.sgd(lr, momentum=0.9)``). MSAM turns gradients into the final
      params update, so it must wrap the whole chain (put gradient clipping
      or weight decay inside ``base_optimizer``), not sit first in it.
    rho: the radius ρ ≥ 0 (float or schedule). Default 0.3, the reference
      code's default; the paper's CIFAR and ImageNet runs use 3 (the
      momentum direction needs a much larger ρ than SAM's gradient
      direction). ``rho=0`` is exactly ``base_optimizer``.
    momentum: μ in [0, 1), the decay of MSAM's momentum; match the base
      optimizer's (``momentum`` of ``optax.sgd``, ``b1`` of ``optax.adamw``).
      Default 0.9.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state
    :class:`MomentumSAMState`). ``update(grads, state, params)`` takes the
    gradient at the params you hold and needs no ``loss_fn``; ``value=`` is
    recorded as ``info.perturbed_loss`` and passed on to the base.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss(w):
    ...   return jnp.sum((w - 1.0) ** 2)
    >>> tx = sam_optax.msam(optax.sgd(0.1, momentum=0.5), rho=0.1, momentum=0.5)
    >>> w = jnp.array([[3.0, -2.0], [0.5, 1.5]])
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(w)
    ...   updates, state = tx.update(grads, state, w)
    ...   w = optax.apply_updates(w, updates)
    ...   print('{:.2E}'.format(loss(sam_optax.remove_perturbation(w, state))))
    8.64E+00
    4.02E+00
    1.34E+00
    2.71E-01
    1.40E-02

  References:
    Becker et al., `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.

  .. note::
    MSAM has no ``axis_name``: its perturbation comes from the (replicated)
    momentum, not from a per-device gradient, so use it like any optax
    optimizer under data parallelism (average the gradients as usual). It
    keeps its own momentum buffer (one params-sized buffer beside the base
    optimizer's); the reference SGD version shares one buffer, and applies
    weight decay at the perturbed params.
  """
  name = "sam_optax.msam"
  checks.check_range(name, "momentum", momentum, high=1.0, high_open=True,
              hint=" Use the base optimizer's momentum, for example 0.9.")
  return msam_lib.momentum_sam(base_optimizer, rho, momentum, name=name)
