"""The one list of sam_optax's methods, read by the tests and the benchmarks.

Private to the library: users call the public functions. A new method adds one
:class:`Method` to :data:`METHODS`; the tests fail if a public method is
missing from the list, or if the list names something that is not public.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Optional

from sam_optax._src.methods import adaptive
from sam_optax._src.methods import gap
from sam_optax._src.methods import momentum
from sam_optax._src.methods import msam
from sam_optax._src.methods import reuse
from sam_optax._src.methods import sam


class Method(NamedTuple):
  """One public method.

  Attributes:
    name: the public name of the wrapper (``sam_optax.<name>``).
    wrapper: ``(base_optimizer, rho, ...) -> GradientTransformationExtraArgs``.
    block: the chain-block form ``(rho, ...) -> ...`` (``None`` for a method
      that turns gradients into the final update and so must wrap the rest of
      the chain, like MSAM).
    static_args: structural arguments that ``optax.inject_hyperparams`` must
      be told about (``static_args=``).
    passes: forward/backward passes per step at the defaults (2 for SAM;
      ``1 + 1/k`` for a method that runs the second pass every k-th step).
    takes_m: whether it takes ``m=`` (in-device m-sharpness).
    takes_axis_name: whether it takes ``axis_name=`` (per-device ε).
    second_pass: whether ``update`` calls ``loss_fn`` (and so requires it).
    example: keyword arguments for a small, fast configuration in which the
      method differs visibly from its neighbours (tests and benchmarks).
  """

  name: str
  wrapper: Callable[..., Any]
  block: Optional[Callable[..., Any]]
  static_args: tuple[str, ...] = ()
  passes: float = 2.0
  takes_m: bool = True
  takes_axis_name: bool = True
  second_pass: bool = True
  example: Mapping[str, Any] = {}

  @property
  def block_name(self) -> Optional[str]:
    return None if self.block is None else self.block.__name__

  def defaults(self) -> dict[str, Any]:
    """The wrapper's numeric hyper-parameters and their defaults (ρ included)."""
    out = {}
    for arg, p in inspect.signature(self.wrapper).parameters.items():
      if (p.kind is p.POSITIONAL_OR_KEYWORD and arg != "base_optimizer"
          and isinstance(p.default, (int, float))
          and not isinstance(p.default, bool) and arg not in self.static_args):
        out[arg] = p.default
    return out

  def build(self, base_optimizer, **kwargs):
    """The wrapper around ``base_optimizer`` at the :attr:`example` settings."""
    return self.wrapper(base_optimizer, **{**self.example, **kwargs})


METHODS: tuple[Method, ...] = (
    Method("sam", sam.sam, sam.sharpness_aware),
    Method("asam", adaptive.asam, adaptive.adaptive_sharpness_aware),
    Method("fisher_sam", adaptive.fisher_sam, adaptive.fisher_sharpness_aware),
    Method("gsam", gap.gsam, gap.gap_guided_sharpness_aware,
           example={"alpha": 0.3}),
    Method("gnp", gap.gnp, gap.gradient_norm_penalty),
    Method("looksam", reuse.looksam, reuse.look_sharpness_aware,
           static_args=("k",), passes=1.2, example={"k": 3}),
    Method("interval_sam", reuse.interval_sam,
           reuse.interval_sharpness_aware, static_args=("k",), passes=1.2,
           example={"k": 3}),
    Method("vasso", momentum.vasso,
           momentum.variance_suppressed_sharpness_aware, takes_m=False,
           example={"theta": 0.5}),
    Method("friendly_sam", momentum.friendly_sam,
           momentum.friendly_sharpness_aware, takes_m=False),
    Method("msam", msam.msam, None, passes=1.0, takes_m=False,
           takes_axis_name=False, second_pass=False),
)

BY_NAME: Mapping[str, Method] = {method.name: method for method in METHODS}

# Public names that are not methods (the machinery, helpers, states).
NOT_METHODS = frozenset({
    "GradientEMAState", "LookSAMState", "MomentumSAMState", "PerturbationRule",
    "SAMInfo", "SharpnessAwareState", "diagnostics", "get_info",
    "group_value_and_grad", "normalization_params_mask", "path_mask",
    "per_device", "remove_perturbation", "rho_from_learning_rate",
    "sharpness_aware_transform",
})
