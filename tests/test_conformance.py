"""Optax conformance: every sharpness-aware transform behaves as an optax citizen.

Every method of the library's list (`sam_optax._src.registry.METHODS`) runs
through the same checks, at its `example` settings, plus a few configurations
of SAM (`CONFIGS`). A new method added to the list is tested here without a
line in this file; the first tests fail if the list and the public names
disagree.
"""

import inspect
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax._src.registry import BY_NAME, METHODS, NOT_METHODS
from tests import helpers


# --- The list of methods is the public API's ---------------------------------


def test_every_public_name_is_a_method_or_listed_as_not_one():
  listed = {m.name for m in METHODS} | {m.block_name for m in METHODS if m.block}
  unknown = sorted(set(sam_optax.__all__) - listed - NOT_METHODS)
  assert not unknown, (
      f"public names neither in registry.METHODS nor in registry.NOT_METHODS: {unknown}")
  both = sorted(listed & NOT_METHODS)
  assert not both, f"listed as methods and as not methods: {both}"
  stale = sorted(NOT_METHODS - set(sam_optax.__all__))
  assert not stale, f"registry.NOT_METHODS names what is not public: {stale}"


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_method_in_the_list_is_public(method):
  for name, fn in ((method.name, method.wrapper), (method.block_name, method.block)):
    if fn is None:
      continue
    assert name in sam_optax.__all__, name
    assert getattr(sam_optax, name) is fn, name
  assert len(BY_NAME) == len(METHODS)  # no name twice
  assert set(method.static_args) <= set(
      inspect.signature(method.wrapper).parameters)


class Config(NamedTuple):
  """A configuration of a method of the registry.

  Attributes:
    method: its name in the registry.
    kwargs: keyword arguments on top of the method's `example`.
    as_chain: `chain(block(rho), base)` instead of `wrapper(base, rho)`.
  """

  method: str
  kwargs: Mapping[str, Any] = {}
  as_chain: bool = False


# Every method at its example settings, and a few more configurations of SAM.
CONFIGS = {m.name: Config(m.name) for m in METHODS} | {
    "sam_p3": Config("sam", {"p": 3.0}),
    "usam": Config("sam", {"normalize": False}),
    "sharpness_aware_chain": Config("sam", as_chain=True),
}

NAMES = sorted(CONFIGS)


def _method(name):
  return BY_NAME[CONFIGS[name].method]


def _make(name, base, rho):
  """The configuration `name` around `base` at radius `rho`."""
  config = CONFIGS[name]
  method = BY_NAME[config.method]
  if config.as_chain:
    return optax.chain(method.block(rho, **{**method.example, **config.kwargs}), base)
  return method.build(base, rho=rho, **config.kwargs)


def _in_chain(name, rho, *members):
  """The configuration followed by `members`, however it composes: a block
  sits first in the chain; a method without one (it turns gradients into the
  final update, MSAM) wraps the rest of the chain."""
  config = CONFIGS[name]
  method = BY_NAME[config.method]
  if method.block is not None:
    block = method.block(rho, **{**method.example, **config.kwargs})
    return optax.chain(block, *members)
  return method.build(optax.chain(*members), rho=rho, **config.kwargs)


def _steps(tx, params, loss_fn, n, **kw):
  """Final params, state and the jitted step of `n` steps."""
  trajectory, state, step = helpers.train_steps(tx, params, loss_fn, n, **kw)
  return trajectory[-1], state, step


@pytest.mark.parametrize("name", NAMES)
def test_unknown_extra_kwarg_is_ignored(name):
  params, _, loss_fn = helpers.mlp_problem()
  tx = _make(name, optax.sgd(0.1), 0.05)
  a, _, _ = _steps(tx, params, loss_fn, 2)
  b, _, _ = _steps(tx, params, loss_fn, 2, some_unrelated_kwarg=123, grad_fn=None)
  helpers.assert_trees_close(a, b, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_no_recompilation_over_20_steps(name):
  params, _, loss_fn = helpers.mlp_problem()
  tx = _make(name, optax.sgd(0.1, momentum=0.9), 0.05)
  _, _, step = _steps(tx, params, loss_fn, 20)
  assert step._cache_size() == 1


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases(name):
  params, _, loss_fn = helpers.mlp_problem()
  tx = _make(name, optax.sgd(0.1, momentum=0.9), 0.05)
  final, _, _ = _steps(tx, params, loss_fn, 30)
  assert float(loss_fn(final)) < 0.7 * float(loss_fn(params))


@pytest.mark.parametrize("name", NAMES)
def test_dtypes_preserved_bf16(name):
  params, _, loss_fn = helpers.mlp_problem(dtype=jnp.bfloat16)
  tx = _make(name, optax.sgd(0.1, momentum=0.9), 0.05)
  state0 = tx.init(params)
  final, state, _ = _steps(tx, params, loss_fn, 3)
  for leaf in jax.tree.leaves(final):
    assert leaf.dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), state0, state)


@pytest.mark.parametrize("name", NAMES)
def test_rho_zero_matches_base(name):
  params, _, loss_fn = helpers.mlp_problem()
  base = optax.sgd(0.1, momentum=0.9)
  a, _, _ = _steps(_make(name, base, 0.0), params, loss_fn, 5)
  b, _, _ = _steps(base, params, loss_fn, 5)
  helpers.assert_trees_close(a, b, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_sharding_follows_params_on_8_device_mesh(name):
  assert jax.device_count() == 8
  mesh = helpers.mesh(8)
  params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
  shard = {"w": NamedSharding(mesh, P("d", None)), "b": NamedSharding(mesh, P())}
  params = jax.device_put(params, shard)
  x = jnp.linspace(-1, 1, 32 * 16).reshape(32, 16)
  loss_fn = lambda p: jnp.mean((jnp.tanh(x @ p["w"] + p["b"])) ** 2)
  tx = _make(name, optax.sgd(0.1, momentum=0.9), 0.05)
  final, state, _ = _steps(tx, params, loss_fn, 2)
  assert final["w"].sharding.is_equivalent_to(shard["w"], 2)
  # Every params-shaped buffer in the state carries the params' sharding.
  for leaf in jax.tree.leaves(state):
    if leaf.shape == (16, 8):
      assert leaf.sharding.is_equivalent_to(shard["w"], 2)


@pytest.mark.parametrize("name", NAMES)
def test_chain_with_clip_and_adamw(name):
  params, _, loss_fn = helpers.mlp_problem()
  tx = _in_chain(name, 0.05, optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  with jax.numpy_dtype_promotion("standard"):  # optax's AdamW: decay ** int count
    final, _, _ = _steps(tx, params, loss_fn, 20)
  assert float(loss_fn(final)) < float(loss_fn(params))


@pytest.mark.parametrize("name", NAMES)
def test_chain_with_member_that_needs_value(name):
  """A chain member that needs `value=` (a line-search/Polyak step) works beside SAM."""
  params, _, loss_fn = helpers.mlp_problem()
  tx = _in_chain(name, 0.05, optax.scale_by_polyak(max_learning_rate=0.1),
                 optax.scale(-1.0))
  final, _, _ = _steps(tx, params, loss_fn, 10)
  assert float(loss_fn(final)) < float(loss_fn(params))


@pytest.mark.parametrize("name", NAMES)
def test_loss_fn_required_exactly_with_a_second_pass(name):
  params, _, loss_fn = helpers.mlp_problem()
  tx = _make(name, optax.sgd(0.1), 0.05)
  grads = jax.grad(loss_fn)(params)
  if _method(name).second_pass:
    with pytest.raises(TypeError, match=r"needs the keyword argument `loss_fn`"):
      tx.update(grads, tx.init(params), params)
  else:  # one-gradient method: works without it
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite(name):
  params, _, loss_fn = helpers.mlp_problem()
  tx = optax.apply_if_finite(_make(name, optax.sgd(0.1), 0.05), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  updates, state = tx.update(bad, state, params, loss_fn=loss_fn)
  for leaf in jax.tree.leaves(updates):
    assert np.all(leaf == 0)
  assert int(state.notfinite_count) == 1
  good = jax.grad(loss_fn)(params)
  updates, state = tx.update(good, state, params, loss_fn=loss_fn)
  assert int(state.notfinite_count) == 0
  assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(updates))


def test_inject_hyperparams_changes_rho_without_recompiling():
  params, _, loss_fn = helpers.mlp_problem()
  tx = optax.inject_hyperparams(sam_optax.sam)(optax.sgd(0.1), rho=0.05)
  # Zero steps: the initial state and the jitted step.
  _, state, step = helpers.train_steps(tx, params, loss_fn, 0, value=False)

  ref = sam_optax.sam(optax.sgd(0.1), rho=0.2)
  ref_state = ref.init(params)
  p_ref = params
  p = params
  for i in range(4):
    state.hyperparams["rho"] = jnp.asarray(0.05 if i < 2 else 0.2)
    p, state = step(p, state)
    info = sam_optax.get_info(state)
    np.testing.assert_allclose(info.rho, 0.05 if i < 2 else 0.2, rtol=1e-6)
  assert step._cache_size() == 1
  # Run-time ρ gives the same step as a fixed one.
  p1, _ = step(params, state._replace(hyperparams={**state.hyperparams, "rho": jnp.asarray(0.2)}))
  g = jax.grad(loss_fn)(p_ref)
  u, _ = ref.update(g, ref_state, p_ref, loss_fn=loss_fn)
  helpers.assert_trees_close(p1, optax.apply_updates(p_ref, u), atol=1e-7)


def test_inject_hyperparams_negative_rho_is_clamped():
  params, _, loss_fn = helpers.mlp_problem()
  tx = optax.inject_hyperparams(sam_optax.sam)(optax.sgd(0.1), rho=0.05)
  state = tx.init(params)
  state.hyperparams["rho"] = jnp.asarray(-1.0)
  g = jax.grad(loss_fn)(params)
  u, state = tx.update(g, state, params, loss_fn=loss_fn)
  u_base, _ = optax.sgd(0.1).update(g, optax.sgd(0.1).init(params), params)
  helpers.assert_trees_close(u, u_base, atol=0)
  assert float(sam_optax.get_info(state).rho) == 0.0


def _micro_batches():
  x, y = helpers.mlp_batch(n=32)
  return [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(4)]


def test_multisteps_wrapping_sam():
  """`MultiSteps(sam(...))`: one SAM step per k micro-batches; ε comes from the
  accumulated (mean) gradient, the perturbed gradient from the `loss_fn` given
  with the k-th micro-batch."""
  params = helpers.mlp_params()
  micro = _micro_batches()
  tx = optax.MultiSteps(sam_optax.sam(optax.sgd(0.1), rho=0.05), every_k_schedule=4)
  state = tx.init(params)
  grads = []
  for b in micro:
    loss_fn = lambda p, b=b: helpers.mlp_loss(p, b)
    grads.append(jax.grad(loss_fn)(params))
    with jax.numpy_dtype_promotion("standard"):  # optax.MultiSteps: float * int count
      u, state = tx.update(grads[-1], state, params, loss_fn=loss_fn)
  g = jax.tree.map(lambda *g: sum(g) / 4, *grads)
  norm = optax.tree.norm(g)
  eps = jax.tree.map(lambda v: 0.05 * v / norm, g)
  g_last = jax.grad(lambda p: helpers.mlp_loss(p, micro[-1]))(
      jax.tree.map(jnp.add, params, eps))
  helpers.assert_trees_close(u, jax.tree.map(lambda v: -0.1 * v, g_last), atol=1e-6)


def test_sam_before_multisteps_base():
  """`chain(sharpness_aware, MultiSteps(base))`: a SAM gradient per micro-batch
  (m-sharpness with m = micro-batch size), averaged over k micro-batches."""
  params = helpers.mlp_params()
  micro = _micro_batches()
  tx = optax.chain(sam_optax.sharpness_aware(0.05),
                   optax.MultiSteps(optax.sgd(0.1), every_k_schedule=4))
  state = tx.init(params)
  for b in micro:
    loss_fn = lambda p, b=b: helpers.mlp_loss(p, b)
    with jax.numpy_dtype_promotion("standard"):  # optax.MultiSteps: float * int count
      u, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
  block = sam_optax.sharpness_aware(0.05)
  sam_grads = []
  for b in micro:
    loss_fn = lambda p, b=b: helpers.mlp_loss(p, b)
    g, _ = block.update(jax.grad(loss_fn)(params), block.init(params), params, loss_fn=loss_fn)
    sam_grads.append(g)
  mean_g = jax.tree.map(lambda *g: sum(g) / 4, *sam_grads)
  helpers.assert_trees_close(u, jax.tree.map(lambda g: -0.1 * g, mean_g), atol=1e-6)


def test_optax_masked_wrapper_gives_clear_error():
  params, _, loss_fn = helpers.mlp_problem()
  mask = jax.tree.map(lambda x: x.ndim == 2, params)
  tx = optax.chain(optax.masked(sam_optax.sharpness_aware(0.05), mask), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"use the transform's own option instead.*mask=mask"):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
