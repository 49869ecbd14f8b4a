"""What the Linen train states and the NNX optimizer share.

The policies of the model state a perturbed pass may keep, their messages, and
the array references through which the adapted loss hands that state out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sam_optax._src import checks
from sam_optax._src import distributed

BN_STATS_POLICIES = ("unperturbed", "perturbed")
SECOND_PASS_RNG_POLICIES = ("same", "fresh")

# --- Error messages (asserted by the tests). --------------------------------

MISSING_LOSS_FN = (
    "`{call}` needs the keyword argument `loss_fn` (received none). A SAM step "
    "re-evaluates the loss at the perturbed params, so pass the function you "
    "differentiated: `{example}`, where {signature} returns the loss of the "
    "current batch{aux}."
)
BAD_POLICY = (
    "`{call}({arg}={got!r})`: expected one of {allowed}. {explain}"
)
PERTURBED_STATE_WITH_GROUPS = (
    "`{call}({arg}={value!r})` keeps model state from the perturbed pass, but "
    "this transform runs one perturbed pass per group of examples "
    "(m-sharpness, `m=`), so there is no single perturbed pass to keep it "
    "from. Use `{arg}={default!r}` (the default) with `m=`."
)

BN_EXPLAIN = (
    "'unperturbed' (default) keeps the batch statistics of your unperturbed "
    "pass; 'perturbed' keeps those of the pass at the perturbed weights.")
RNG_EXPLAIN = (
    "'same' (default) gives the perturbed pass the random numbers (dropout "
    "masks) of your unperturbed pass; 'fresh' draws new ones.")


def check_policy(call: str, arg: str, value, choices, explain: str) -> str:
  """``value`` if it is one of ``choices``; else BAD_POLICY, with ``explain``."""
  return checks.check_choice(BAD_POLICY, value, choices, call=call, arg=arg,
                             got=value, allowed=choices, explain=explain)


# --- Passing values out of the perturbed pass. ------------------------------
#
# The transform calls `loss_fn` inside its own `jax.value_and_grad` and keeps
# only the gradient. To keep model state from that pass (perturbed batch
# statistics, advanced RNG counters), the adapted loss writes it, without
# gradient, into array references created by the caller; the caller reads them
# after `tx.update`. A reference that was not written (a step that skipped the
# second pass) keeps its initial value.


def new_refs(tree):
  """A tree of array references holding the leaves of ``tree``."""
  return jax.tree.map(lambda x: jax.new_ref(jnp.asarray(x)), tree)


def read_refs(refs):
  """The values the references in ``refs`` hold now."""
  return jax.tree.map(lambda r: r[...], refs)


def write_refs(refs, values, *, call, arg, value, default):
  """Writes ``values`` into ``refs`` from inside the transform's ``loss_fn``.

  Where the transform runs one perturbed pass per group of examples (``m=``,
  under any ``group_loop``, as the core declares: see
  :func:`distributed.current_loss_call`), there is no single perturbed state
  to keep: that is an error, raised before any write. (Under ``'scan'`` or
  ``'unroll'`` the writes would silently keep the last group's state.)
  """
  loss_call = distributed.current_loss_call()
  if loss_call is not None and loss_call.m is not None:
    raise ValueError(PERTURBED_STATE_WITH_GROUPS.format(
        call=call, arg=arg, value=value, default=default))
  ref_leaves, treedef = jax.tree.flatten(refs)
  for r, v in zip(ref_leaves, treedef.flatten_up_to(values)):
    r[...] = jax.lax.stop_gradient(jnp.asarray(v, r.dtype))
