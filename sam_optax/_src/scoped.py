"""Scoped perturbations: which leaves a sharpness-aware step perturbs, and how far.

Every sharpness-aware transform takes ``mask=`` (perturb only the leaves
marked True; ε is normalized over them alone) and ``rho_scale=`` (per-leaf ρ).
Both accept a pytree like params or a callable ``params -> pytree`` (for
``mask``, called on the params' shapes and dtypes, not their values). A
:class:`Scope` owns them for the core: it restricts the gradient to the masked
leaves and turns the rule's unit direction into ε. This module also builds
mask callables from the params' paths.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from sam_optax._src import checks
from sam_optax._src import messages
from sam_optax._src import numerics

Path = Tuple[str, ...]

# A path component naming a normalization layer: anything containing "norm"
# (BatchNorm_0, LayerNorm_3, GroupNorm, RMSNorm, final_norm, norm1, ...) or a
# conventional short name (bn, bn1, bn_2, ln, ln_f, ln1, gn, gn3).
_NORM_COMPONENT = re.compile(r"norm|^(bn|ln|gn)(_?\d+|_[a-z0-9]+)?$", re.IGNORECASE)


class Scope(NamedTuple):
  """``mask=`` and ``rho_scale=`` of a transform, resolved against the params.

  Attributes:
    mask: a pytree of bools like params, or ``None`` (every leaf).
    rho_scale: a pytree of numbers like params, or ``None`` (1 everywhere).
  """

  mask: Any = None
  rho_scale: Any = None

  @classmethod
  def resolve(cls, name: str, params, *, mask=None, rho_scale=None) -> "Scope":
    """Resolves callables ``params -> pytree`` and checks the trees.

    A mask callable sees the params' shapes and dtypes only (the same leaves
    eagerly and under ``jit``); every mask leaf must be one bool, and at
    least one must be True. Concrete ``rho_scale`` leaves must be ≥ 0.
    """
    hint = (messages.NORMALIZATION_MASK_HINT
            if mask is normalization_params_mask else "")
    rho_scale = checks.resolve_leafwise(name, "rho_scale", rho_scale, params,
                                        "one number")
    checks.check_rho_scale(name, rho_scale)
    return cls(mask=checks.resolve_mask(name, mask, params, empty_hint=hint),
               rho_scale=rho_scale)

  def restrict(self, tree):
    """``tree`` with the leaves outside the mask set to zero."""
    if self.mask is None:
      return tree
    return jax.tree.map(lambda x, keep: x if keep else jnp.zeros_like(x),
                        tree, self.mask)

  def perturbation(self, direction, rho):
    """ε = ρ · s_l · d_l on the masked leaves, 0 on the others."""
    eps = numerics.tree_scale(self.restrict(direction), rho)
    if self.rho_scale is None:
      return eps
    return jax.tree.map(
        lambda e, s: (e * jnp.asarray(s, jnp.float32)).astype(e.dtype),
        eps, self.rho_scale)

  def perturbation_norm(self, eps, restricted_grads, rho, unit_norm: bool):
    """‖ε‖₂; without a pass over the params when the rule's d has norm 1."""
    if unit_norm and self.rho_scale is None:
      # ‖ε‖ = ρ‖d‖ = ρ (0 at g = 0).
      return jnp.where(numerics.tree_norm(restricted_grads) > 0, rho, 0.0)
    return numerics.tree_norm(eps)


def _key_name(entry) -> str:
  """A path entry as a string: the dict key, attribute name or index."""
  tu = jax.tree_util
  if isinstance(entry, (tu.DictKey, tu.FlattenedIndexKey)):
    return str(entry.key)
  if isinstance(entry, tu.GetAttrKey):
    return str(entry.name)
  if isinstance(entry, tu.SequenceKey):
    return str(entry.idx)
  return str(entry)


def path_mask(predicate: Callable[[Path, Any], bool]) -> Callable[[Any], Any]:
  """A mask from a predicate on each leaf's path, for ``mask=``/``rho_scale=``.

  ``predicate(path, leaf)`` receives the leaf's path as a tuple of strings
  (dict keys, attribute names and sequence indices, outermost first) and the
  leaf, and returns a bool (or, for ``rho_scale``, a number). As ``mask=``,
  the transform calls it on the params' shapes and dtypes: ``leaf`` is then a
  ``jax.ShapeDtypeStruct`` (``.shape``, ``.ndim``, ``.dtype``), not an array,
  so that the mask is the same at every step, eagerly and under ``jit``.

  Examples:
    >>> import jax.numpy as jnp, sam_optax
    >>> params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}
    >>> only_kernels = sam_optax.path_mask(lambda path, leaf: path[-1] == 'kernel')
    >>> only_kernels(params)
    {'dense': {'bias': False, 'kernel': True}}

  Args:
    predicate: ``(path: tuple[str, ...], leaf) -> bool``.

  Returns:
    A callable ``params -> pytree`` like params, to pass as ``mask=`` (or
    ``rho_scale=``) to any sam_optax transform.
  """

  def mask_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: predicate(tuple(_key_name(e) for e in path), leaf),
        params)

  return mask_fn


# Separators inside one flat key ("h.0.ln_1.weight", "encoder/LayerNorm/scale").
_KEY_SEPARATORS = re.compile(r"[./]")


def _is_normalization_path(path: Path, leaf) -> bool:
  del leaf
  parts = [part for key in path for part in _KEY_SEPARATORS.split(key)]
  return any(_NORM_COMPONENT.search(part) for part in parts[:-1])


def normalization_params_mask(params) -> Any:
  r"""SAM-ON: a mask selecting only normalization-layer params.

  Müller et al. (2023) found that perturbing only the normalization layers'
  affine params (BatchNorm/LayerNorm scale and bias, a tiny fraction of the
  weights) matches or beats perturbing all of them. Pass this function itself
  as ``mask=``:

  .. math::
    \varepsilon_l = \rho\, \frac{g_l}{\|g_{\text{norm}}\|_2}
    \text{ for normalization leaves } l, \qquad \varepsilon_l = 0
    \text{ otherwise}.

  A leaf is a normalization param if a module in its path (every component but
  the last) contains ``norm`` (``BatchNorm_0``, ``LayerNorm_1``, ``GroupNorm``,
  ``RMSNorm``, ``final_norm``, ``norm1``, ...; case-insensitive) or is one of
  the short names ``bn``, ``ln``, ``gn`` with an optional index or suffix
  (``bn1``, ``bn_2``, ``ln_f``). Flat keys are split at ``.`` and ``/`` first,
  so a dict converted from PyTorch (``{'h.0.ln_1.weight': ...}``) is read as
  the path ``h, 0, ln_1, weight``. This covers Flax Linen, NNX and PyTorch
  naming; for other names build a mask with :func:`sam_optax.path_mask`. A
  transform refuses a mask that selects no leaf (a model without such names).

  Examples:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> params = {'Conv_0': {'kernel': jnp.ones((3, 3, 1, 4))},
    ...           'BatchNorm_0': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}}
    >>> sam_optax.normalization_params_mask(params)
    {'BatchNorm_0': {'bias': True, 'scale': True}, 'Conv_0': {'kernel': False}}
    >>> tx = sam_optax.sam(optax.sgd(0.1), rho=0.05,
    ...                    mask=sam_optax.normalization_params_mask)

  Args:
    params: a pytree of params.

  Returns:
    A pytree of bools like ``params``.

  References:
    Müller et al., `Normalization Layers Are All That Sharpness-Aware
    Minimization Needs <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023.

  .. note::
    Under ``optax.inject_hyperparams`` a callable argument is taken for a
    schedule; list ``mask`` in ``static_args`` (or pass the mask tree,
    ``mask=sam_optax.normalization_params_mask(params)``).
  """
  return path_mask(_is_normalization_path)(params)
