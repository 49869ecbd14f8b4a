"""SAM steps for Flax: a Linen train state and an NNX optimizer.

Flax is an optional dependency (``pip install 'sam_optax[flax]'``), so
``import sam_optax`` does not import this module. Import it explicitly::

  import sam_optax.flax                     # or
  from sam_optax import flax as sam_flax

What it provides:

* :class:`SAMTrainState`: a ``flax.training.train_state.TrainState`` whose
  ``apply_gradients`` hands ``loss_fn`` (and any other keyword argument) on to
  the optimizer, as a sharpness-aware transform needs.
* :class:`SAMTrainStateWithBatchStats`: the same with a ``batch_stats`` field,
  for Linen models with BatchNorm.
* :class:`SAMOptimizer`: an ``nnx.Optimizer`` whose ``update`` takes the usual
  model-taking ``loss_fn(model)`` and adapts it to the params-taking loss the
  transform calls.

The optimizer itself is any :func:`sam_optax.sam` or chain containing
:func:`sam_optax.sharpness_aware` (or a variant); this module only moves
arguments and model state around it.

Batch statistics (BatchNorm): policy ``bn_stats``
-------------------------------------------------
A SAM step evaluates the model twice on the same batch: at the weights ``w``
(your own forward/backward pass) and at the perturbed weights ``w + ε`` (the
transform's pass). Both run in train mode, so each normalizes by its batch's own
statistics and the perturbed gradient is the gradient of the same train-mode
loss. Of the running averages the two passes produce, the default
``bn_stats="unperturbed"`` keeps those of the first pass and discards the
second's:

* ``w + ε`` is never the model's weights: statistics measured there describe
  activations of weights the model will not have;
* updating the averages in both passes would count every batch twice and change
  the effective BatchNorm momentum.

This is what the reference implementation of SAM does (it keeps the state of the
unperturbed pass), and what PyTorch users emulate by setting the BatchNorm
momentum to 0 for the second pass. ``bn_stats="perturbed"`` keeps the
statistics of the perturbed pass instead. On a step where the transform skips
its second pass (e.g. a variant that perturbs only every k steps) there are no
perturbed statistics and the unperturbed ones are kept.

Randomness (dropout): the second pass's key
-------------------------------------------
By default the perturbed pass draws the **same** random numbers (dropout masks)
as the unperturbed pass: ε is chosen by ascending one sampled loss, and the
gradient at ``w + ε`` is then taken of that same sampled loss. The reference
implementation of SAM passes the same PRNG key to both passes.

* Linen: the transform calls exactly the ``loss_fn`` you pass. Pass the function
  you differentiated (it closes over its dropout key): same masks. For fresh
  masks pass a ``loss_fn`` closing over another key, e.g.
  ``functools.partial(loss, rng=jax.random.fold_in(rng, 1))``.
* NNX: random streams live in the model, so the choice is
  ``SAMOptimizer(..., second_pass_rng="same" | "fresh")``. ``"same"`` rewinds
  the model's RNG counters to where they stood at the end of the previous
  ``update`` (or at construction), so the perturbed pass redraws the keys of
  your unperturbed pass, provided that pass is the only use of the model's
  random streams between two updates. ``"fresh"`` continues the streams: the
  perturbed pass draws new keys, and the model's counters advance past them so
  the next step does not reuse them.

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (reference
  code: ``google-research/sam``).
"""

try:
  from flax import nnx
  from flax import struct
  from flax.training import train_state
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
  raise ImportError(
      "`sam_optax.flax` needs Flax, an optional dependency of sam_optax "
      f"({e}). Install it with `pip install 'sam_optax[flax]'`; the rest of "
      "`sam_optax` works without it.") from e
del nnx, struct, train_state

# pylint: disable=g-import-not-at-top,g-bad-import-order
from sam_optax.flax._common import BN_STATS_POLICIES as BN_STATS_POLICIES
from sam_optax.flax._common import SECOND_PASS_RNG_POLICIES as SECOND_PASS_RNG_POLICIES
from sam_optax.flax._linen import SAMTrainState as SAMTrainState
from sam_optax.flax._linen import SAMTrainStateWithBatchStats as SAMTrainStateWithBatchStats
from sam_optax.flax._nnx import SAMOptimizer as SAMOptimizer

__all__ = (
    "BN_STATS_POLICIES",
    "SAMOptimizer",
    "SAMTrainState",
    "SAMTrainStateWithBatchStats",
    "SECOND_PASS_RNG_POLICIES",
)
