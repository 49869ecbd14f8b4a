"""sam_optax: sharpness-aware minimization (SAM) and its family for optax."""

from importlib import metadata as _metadata

from sam_optax._src.methods.sam import sam as sam
from sam_optax._src.methods.sam import sharpness_aware as sharpness_aware
from sam_optax._src.base import PerturbationRule as PerturbationRule
from sam_optax._src.base import SAMInfo as SAMInfo
from sam_optax._src.base import SharpnessAwareState as SharpnessAwareState
from sam_optax._src.core import sharpness_aware_transform as sharpness_aware_transform
from sam_optax._src.groups import group_value_and_grad as group_value_and_grad
from sam_optax._src.distributed import per_device as per_device
from sam_optax._src.info import get_info as get_info
from sam_optax._src.methods.msam import MomentumSAMState as MomentumSAMState
from sam_optax._src.methods.msam import remove_perturbation as remove_perturbation
from sam_optax._src.methods.momentum import GradientEMAState as GradientEMAState
from sam_optax._src.methods.reuse import LookSAMState as LookSAMState
from sam_optax._src.scoped import normalization_params_mask as normalization_params_mask
from sam_optax._src.scoped import path_mask as path_mask
from sam_optax._src.methods.adaptive import adaptive_sharpness_aware as adaptive_sharpness_aware
from sam_optax._src.methods.adaptive import asam as asam
from sam_optax._src.methods.adaptive import fisher_sam as fisher_sam
from sam_optax._src.methods.adaptive import fisher_sharpness_aware as fisher_sharpness_aware
from sam_optax._src.methods.momentum import friendly_sam as friendly_sam
from sam_optax._src.methods.momentum import friendly_sharpness_aware as friendly_sharpness_aware
from sam_optax._src.methods.gap import gap_guided_sharpness_aware as gap_guided_sharpness_aware
from sam_optax._src.methods.gap import gnp as gnp
from sam_optax._src.methods.gap import gradient_norm_penalty as gradient_norm_penalty
from sam_optax._src.methods.gap import gsam as gsam
from sam_optax._src.methods.reuse import interval_sam as interval_sam
from sam_optax._src.methods.reuse import interval_sharpness_aware as interval_sharpness_aware
from sam_optax._src.methods.reuse import look_sharpness_aware as look_sharpness_aware
from sam_optax._src.methods.reuse import looksam as looksam
from sam_optax._src.methods.msam import msam as msam
from sam_optax._src.methods.gap import rho_from_learning_rate as rho_from_learning_rate
from sam_optax._src.methods.momentum import variance_suppressed_sharpness_aware as variance_suppressed_sharpness_aware
from sam_optax._src.methods.momentum import vasso as vasso
from sam_optax import diagnostics as diagnostics  # pylint: disable=g-bad-import-order

__version__ = _metadata.version("sam_optax")

__all__ = (
    "GradientEMAState",
    "LookSAMState",
    "MomentumSAMState",
    "PerturbationRule",
    "SAMInfo",
    "SharpnessAwareState",
    "adaptive_sharpness_aware",
    "asam",
    "diagnostics",
    "fisher_sam",
    "fisher_sharpness_aware",
    "friendly_sam",
    "friendly_sharpness_aware",
    "gap_guided_sharpness_aware",
    "get_info",
    "gnp",
    "gradient_norm_penalty",
    "group_value_and_grad",
    "gsam",
    "interval_sam",
    "interval_sharpness_aware",
    "look_sharpness_aware",
    "looksam",
    "msam",
    "normalization_params_mask",
    "path_mask",
    "per_device",
    "remove_perturbation",
    "rho_from_learning_rate",
    "sam",
    "sharpness_aware",
    "sharpness_aware_transform",
    "variance_suppressed_sharpness_aware",
    "vasso",
)
