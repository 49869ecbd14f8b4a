"""The statistics of the last sharpness-aware step, for a training loop's logger."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sam_optax._src import base
from sam_optax._src import info as info_lib


def step_statistics(opt_state, *, prefix: str = "") -> dict[str, jax.Array]:
  r"""The statistics of the last sharpness-aware step, as a dict of scalars.

  Reads the :class:`~sam_optax.SAMInfo` that every sharpness-aware transform
  keeps in its state (found anywhere inside ``opt_state``, as
  :func:`sam_optax.get_info` does) and returns it as a flat dict, ready for a
  logger. With :math:`g = \nabla L(w)`, :math:`\varepsilon` the perturbation
  and :math:`g_{\mathrm{SAM}} = \nabla L(w + \varepsilon)`:

  .. math::
    \text{sharpness} = L(w + \varepsilon) - L(w), \qquad
    \text{cosine} = \frac{\langle g, g_{\mathrm{SAM}} \rangle}
                         {\|g\|_2\, \|g_{\mathrm{SAM}}\|_2}.

  Keys (all float32 scalars): ``loss`` (:math:`L(w)`, from ``value=``),
  ``perturbed_loss`` (:math:`L(w+\varepsilon)`), ``sharpness``, ``grad_norm``
  (:math:`\|g\|_2`), ``perturbation_norm`` (:math:`\|\varepsilon\|_2`),
  ``perturbed_grad_norm`` (:math:`\|g_{\mathrm{SAM}}\|_2`), ``cosine`` and
  ``rho``. ``loss`` and ``sharpness`` are ``nan`` unless ``update`` got
  ``value=`` (the unperturbed loss), ``cosine`` unless the transform was made
  with ``track_cosine=True``; with per-device perturbations
  (``axis_name``) or groups (``m=``) each is the mean over perturbations.

  It is pure pytree access, so it works inside ``jax.jit`` (return the dict
  from the jitted step) as well as outside.

  Args:
    opt_state: the state of a chain or wrapper that contains exactly one
      sharpness-aware transform, or a :class:`~sam_optax.SAMInfo` itself.
    prefix: prepended to every key, e.g. ``"sam/"``.

  Returns:
    A ``dict[str, jax.Array]`` of float32 scalars, keys in the order above.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> w = jnp.array([3.0, 4.0])
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.5, track_cosine=True)
    >>> value, g = jax.value_and_grad(loss)(w)
    >>> _, state = tx.update(g, tx.init(w), w, loss_fn=loss, value=value)
    >>> stats = sam_optax.diagnostics.step_statistics(state)
    >>> for k in ('sharpness', 'perturbation_norm', 'grad_norm', 'cosine'):
    ...   print(k, '{:.2E}'.format(stats[k]))
    sharpness 5.25E+00
    perturbation_norm 5.00E-01
    grad_norm 1.00E+01
    cosine 1.00E+00

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  info = opt_state if isinstance(opt_state, base.SAMInfo) else info_lib.get_info(opt_state)
  return {prefix + k: jnp.asarray(v, jnp.float32) for k, v in info._asdict().items()}
