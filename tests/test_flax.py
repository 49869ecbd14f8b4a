"""Flax integration: Linen train states, the NNX optimizer, their policies."""

import functools
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
from sam_optax import flax as sam_flax
from tests import flax_helpers
from tests import helpers

RHO = 0.05
LR = 0.1


# --- Data and models. ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _digits():
  """The digits as 8×8×1 images, in a fixed shuffled order."""
  x, y = flax_helpers.digits()
  order = np.random.default_rng(0).permutation(len(y))
  return x.reshape(-1, 8, 8, 1)[order], y[order]


def _batch(n=64, start=0, dtype=jnp.float32):
  x, y = _digits()
  return jnp.asarray(x[start:start + n], dtype), jnp.asarray(y[start:start + n])


_xent = flax_helpers.xent
_linen_loss = flax_helpers.linen_loss


def _linen_state(tx, *, dtype=jnp.float32, bn_stats="unperturbed", seed=0,
                 conv=True):
  """A train state of the CNN (`conv`) or the MLP of `flax_helpers.LinenNet`."""
  model = flax_helpers.LinenNet(conv=conv, dtype=dtype, param_dtype=dtype)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1), dtype),
                         train=False)
  return sam_flax.SAMTrainStateWithBatchStats.create(
      apply_fn=model.apply, params=variables["params"], tx=tx,
      batch_stats=variables["batch_stats"], bn_stats=bn_stats)


def _hand_eps(grads, rho=RHO):
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                      for g in jax.tree.leaves(grads)))
  return jax.tree.map(lambda g: (rho * g / norm).astype(g.dtype), grads)


def _add(a, b):
  return jax.tree.map(lambda x, y: x + y, a, b)


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64)
                                 - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y)), a, b)


# --- Linen. --------------------------------------------------------------------


def test_linen_cnn_with_batchnorm_and_dropout_trains_on_digits():
  tx = sam_optax.sam(optax.adam(1e-2), rho=RHO, has_aux=True)
  state = _linen_state(tx)
  x_all, y_all = _digits()
  x_test, y_test = jnp.asarray(x_all[-300:]), jnp.asarray(y_all[-300:])

  @jax.jit
  def step(state, x, y):
    key = jax.random.fold_in(jax.random.key(1), state.step)
    state, loss, _ = flax_helpers.linen_sam_step(state, x, y, key)
    return state, loss

  @jax.jit
  def test_loss(state):
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, x_test,
        train=False)
    return _xent(logits, y_test)

  before = float(test_loss(state))
  losses = []
  for i in range(30):
    start = (i * 64) % 1280
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: decay ** int count
      state, loss = step(state, jnp.asarray(x_all[start:start + 64]),
                         jnp.asarray(y_all[start:start + 64]))
    losses.append(float(loss))
  after = float(test_loss(state))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  assert after < 0.4 * before, (before, after)
  assert int(state.step) == 30
  print('digits CNN: train loss', losses[:3], '->', losses[-3:],
        'test loss', before, '->', after)
  info = sam_optax.get_info(state.opt_state)
  assert float(info.rho) == pytest.approx(RHO)
  assert np.isfinite(float(info.sharpness))  # `value=` reached the transform
  # One program for all 30 steps (plus one for Flax's initial Python-int step).
  assert step._cache_size() <= 2


@functools.lru_cache(maxsize=None)
def _one_linen_step(bn_stats, fresh_key=False):
  """One SAMTrainStateWithBatchStats step and a hand-written SAM step."""
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, has_aux=True)
  state = _linen_state(tx, bn_stats=bn_stats)
  x, y = _batch()

  @jax.jit
  def run(state, key, other_key):
    loss_fn = _linen_loss(state, x, y, key)
    # The second pass calls exactly the loss_fn given to apply_gradients:
    # the same closure (same dropout key), or one with another key.
    second_loss_fn = _linen_loss(state, x, y, other_key) if fresh_key else loss_fn
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new = state.apply_gradients(grads=grads, loss_fn=second_loss_fn,
                                value=loss, batch_stats=updates["batch_stats"])
    # By hand: ε = ρ g/‖g‖, the gradient at w + ε, SGD at w.
    perturbed = _add(state.params, _hand_eps(grads))
    (_, p_updates), g_sam = jax.value_and_grad(second_loss_fn, has_aux=True)(
        perturbed)
    hand_params = jax.tree.map(lambda w, g: w - LR * g, state.params, g_sam)
    return new, hand_params, updates["batch_stats"], p_updates["batch_stats"]

  return run(state, jax.random.key(7), jax.random.key(8))


def test_linen_batch_stats_default_are_the_unperturbed_pass():
  new, hand_params, first_stats, perturbed_stats = _one_linen_step(
      "unperturbed")
  helpers.assert_trees_close(new.params, hand_params, atol=1e-6)
  # Exactly the statistics of the unperturbed pass alone.
  _assert_equal(new.batch_stats, first_stats)
  # ... which differ from the perturbed pass's (the test can fail).
  assert _max_diff(first_stats, perturbed_stats) > 1e-5


def test_linen_batch_stats_perturbed_policy():
  new, hand_params, first_stats, perturbed_stats = _one_linen_step("perturbed")
  helpers.assert_trees_close(new.params, hand_params, atol=1e-6)
  helpers.assert_trees_close(new.batch_stats, perturbed_stats, atol=1e-6)
  assert _max_diff(new.batch_stats, first_stats) > 1e-5


def test_linen_dropout_same_and_fresh_key():
  same, hand_same, _, _ = _one_linen_step("unperturbed")
  fresh, hand_fresh, _, _ = _one_linen_step("unperturbed", fresh_key=True)
  helpers.assert_trees_close(same.params, hand_same, atol=1e-6)
  helpers.assert_trees_close(fresh.params, hand_fresh, atol=1e-6)
  # Same key: the masks of the second pass are those of the first; a fresh key
  # gives another step.
  assert _max_diff(same.params, fresh.params) > 1e-4


def test_linen_plain_state_matches_tx_update_and_forwards_extra_args():
  params = helpers.mlp_params()
  x, y = helpers.mlp_batch(n=16)
  tx = sam_optax.sam(optax.sgd(LR, momentum=0.9), rho=RHO, m=4)
  state = sam_flax.SAMTrainState.create(apply_fn=None, params=params, tx=tx)
  chunk_loss = lambda p, batch: helpers.mlp_loss(p, batch)  # noqa: E731

  @jax.jit
  def run(state):
    loss, grads = jax.value_and_grad(chunk_loss)(state.params, (x, y))
    # `value=` and `batch=` (for m-sharpness) reach tx.update.
    new = state.apply_gradients(grads=grads, loss_fn=chunk_loss, value=loss,
                                batch=(x, y))
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   loss_fn=chunk_loss, value=loss,
                                   batch=(x, y))
    return new, optax.apply_updates(state.params, updates), opt_state, loss

  new, want_params, want_opt_state, loss = run(state)
  helpers.assert_trees_close(new.params, want_params, atol=0)
  _assert_equal(new.opt_state, want_opt_state)
  assert int(new.step) == 1
  assert float(sam_optax.get_info(new.opt_state).loss) == float(loss)


def test_linen_replace_is_explicit():
  params = helpers.mlp_params()
  batch = helpers.mlp_batch()
  loss_fn = lambda p: helpers.mlp_loss(p, batch)  # noqa: E731
  grads = jax.grad(loss_fn)(params)
  state = sam_flax.SAMTrainState.create(
      apply_fn=None, params=params, tx=sam_optax.sam(optax.sgd(LR)))
  new = state.apply_gradients(grads=grads, loss_fn=loss_fn,
                              replace={"apply_fn": len})
  assert new.apply_fn is len
  # A field name among the extra (tx) arguments would be silently ignored by
  # the transform: refuse it and point at `replace`.
  with pytest.raises(TypeError, match=r"`apply_fn` is a field of the train "
                     r"state.*replace=\{'apply_fn': \.\.\.\}"):
    state.apply_gradients(grads=grads, loss_fn=loss_fn, apply_fn=len)
  with pytest.raises(ValueError, match=r"`params` cannot be replaced here"):
    state.apply_gradients(grads=grads, loss_fn=loss_fn,
                          replace={"params": params})


def test_linen_bf16_params_and_activations_keep_dtypes():
  tx = sam_optax.sam(optax.adam(1e-3), rho=RHO, has_aux=True)
  state = _linen_state(tx, dtype=jnp.bfloat16, conv=False)
  x, y = _batch(dtype=jnp.bfloat16)
  dtypes = lambda t: jax.tree.map(lambda a: jnp.asarray(a).dtype, t)  # noqa: E731
  init_dtypes = dtypes((state.params, state.opt_state, state.batch_stats))

  @jax.jit
  def step(state, key):
    state, _, grads = flax_helpers.linen_sam_step(state, x, y, key)
    return state, grads

  # optax's Adam promotes (decay ** int count).
  with jax.numpy_dtype_promotion("standard"):
    for i in range(2):
      state, grads = step(state, jax.random.key(i))
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(state.params))
  assert dtypes((state.params, state.opt_state, state.batch_stats)) == init_dtypes
  info = sam_optax.get_info(state.opt_state)
  assert info.grad_norm.dtype == jnp.float32
  f32_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                         for g in jax.tree.leaves(grads)))
  assert float(info.grad_norm) == pytest.approx(f32_norm, rel=1e-4)  # bf16: 4e-3
  assert np.isfinite(float(info.perturbed_loss))


def test_linen_missing_loss_fn_is_a_clear_error():
  params = helpers.mlp_params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = sam_flax.SAMTrainState.create(
      apply_fn=None, params=params, tx=sam_optax.sam(optax.sgd(LR)))
  with pytest.raises(TypeError, match=r"`SAMTrainState.apply_gradients` needs "
                     r"the keyword argument `loss_fn` \(received none\)"):
    state.apply_gradients(grads=grads)


def test_linen_batch_stats_errors():
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, has_aux=True)
  state = _linen_state(tx)
  x, y = _batch(n=8)
  loss_fn = _linen_loss(state, x, y, jax.random.key(0))
  (_, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      state.params)
  stats = updates["batch_stats"]
  # Traced only: every error below is raised before anything runs.
  step = lambda **kw: jax.jit(  # noqa: E731
      lambda s: s.apply_gradients(grads=grads, **kw))(state)
  with pytest.raises(TypeError, match=r"`SAMTrainStateWithBatchStats\."
                     r"apply_gradients` needs the keyword argument `loss_fn`"):
    step(batch_stats=stats)
  with pytest.raises(TypeError, match=r"needs `batch_stats` \(received none\)"):
    step(loss_fn=loss_fn)

  def forgot_aux(params):  # runs the model with mutable stats, drops them
    logits, _ = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return _xent(logits, y)

  with pytest.raises(TypeError, match=r"the model has mutable `batch_stats`, "
                     r"so `loss_fn` must return `\(loss, updates\)`.*returned "
                     r"a single value of shape \(\) \(no aux\)"):
    step(loss_fn=forgot_aux, batch_stats=stats)

  def wrong_aux(params):
    loss, _ = loss_fn(params)
    return loss, {"logits": 0.0}

  with pytest.raises(TypeError, match=r"no 'batch_stats'"):
    step(loss_fn=wrong_aux, batch_stats=stats)
  with pytest.raises(ValueError, match=r"`batch_stats` cannot be replaced.*"
                     r"Pass the new statistics as `batch_stats=`"):
    step(loss_fn=loss_fn, batch_stats=stats, replace={"batch_stats": stats})
  with pytest.raises(TypeError, match=r"`bn_stats` is a field of the train "
                     r"state"):
    step(loss_fn=loss_fn, batch_stats=stats, bn_stats="perturbed")
  with pytest.raises(ValueError, match=r"`SAMTrainStateWithBatchStats\.create"
                     r"\(bn_stats='first'\)`: expected one of"):
    _linen_state(tx, bn_stats="first")


# --- NNX. ----------------------------------------------------------------------


class NNXMLP(nnx.Module):

  def __init__(self, rngs, dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.l1 = nnx.Linear(64, 16, **kw)
    self.l2 = nnx.Linear(16, 10, **kw)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x.reshape(x.shape[0], -1))))


class NNXCNN(nnx.Module):
  """Conv → BatchNorm → ReLU → pool → Dropout → Linear."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.linear = nnx.Linear(4 * 4 * 8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = flax_helpers.avg_pool(x)
    return self.linear(self.dropout(x.reshape(x.shape[0], -1)))


def _nnx_loss(x, y):
  return lambda model: _xent(model(x), y)


BASE = optax.sgd(LR, momentum=0.9)
SAM_TX = sam_optax.sam(BASE, rho=RHO)  # one object: optimizers share compiles


@nnx.jit
def _nnx_sam_step(model, optimizer, x, y):
  loss_fn = _nnx_loss(x, y)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads, loss_fn=loss_fn, value=loss)
  return loss


@nnx.jit
def _nnx_first_pass(model, x, y):
  return nnx.value_and_grad(_nnx_loss(x, y))(model)


@functools.partial(nnx.jit, static_argnames=("rng", "bn"))
def _hand_nnx_sam_step(model, base_state, x, y, *, rng="same",
                       bn="unperturbed"):
  """A hand-written NNX SAM step (with BASE): two models, no sam_optax."""
  loss_fn = _nnx_loss(x, y)
  counts_before = nnx.as_pure(nnx.state(model, nnx.RngCount))
  _, grads = nnx.value_and_grad(loss_fn)(model)  # updates stats and counters
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  g = nnx.as_pure(grads)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g)))
  shadow = nnx.clone(model)
  nnx.update(shadow, jax.tree.map(lambda w, v: w + RHO * v / norm, params, g))
  if rng == "same":
    nnx.update(shadow, counts_before)
  g_sam = nnx.grad(loss_fn)(shadow)
  updates, base_state = BASE.update(nnx.as_pure(g_sam), base_state, params)
  nnx.update(model, optax.apply_updates(params, updates))
  if bn == "perturbed":
    nnx.update(model, nnx.state(shadow, nnx.BatchStat))
  if rng == "fresh":
    nnx.update(model, nnx.state(shadow, nnx.RngCount))
  return base_state


def _no_keys(model):
  return nnx.as_pure(nnx.state(model, nnx.Not(nnx.RngKey)))


@pytest.mark.parametrize("model_cls", [NNXMLP, NNXCNN])
def test_nnx_sam_optimizer_matches_hand_written_step(model_cls):
  x, y = _batch()
  model = model_cls(nnx.Rngs(0))
  ref = nnx.clone(model)
  optimizer = sam_flax.SAMOptimizer(model, SAM_TX,
                                    wrt=nnx.Param)
  base_state = BASE.init(nnx.as_pure(nnx.state(ref, nnx.Param)))
  for _ in range(3):
    loss = _nnx_sam_step(model, optimizer, x, y)
    base_state = _hand_nnx_sam_step(ref, base_state, x, y)
  # Params, batch statistics and RNG counters (those of the unperturbed passes).
  helpers.assert_trees_close(_no_keys(model), _no_keys(ref), atol=1e-6)
  _assert_equal(nnx.state(model, nnx.RngCount), nnx.state(ref, nnx.RngCount))
  assert int(optimizer.step[...]) == 3
  assert float(sam_optax.get_info(nnx.as_pure(optimizer.opt_state)).loss) == (
      pytest.approx(float(loss)))
  _assert_equal(nnx.as_pure(optimizer.rng_counts),
                nnx.as_pure(nnx.state(model, nnx.RngCount)))


@functools.lru_cache(maxsize=None)
def _nnx_policy_step(bn_stats="unperturbed", second_pass_rng="same"):
  """One SAMOptimizer step of the CNN; the model after its first pass alone."""
  x, y = _batch()
  model = NNXCNN(nnx.Rngs(0))
  ref, first = nnx.clone(model), nnx.clone(model)
  optimizer = sam_flax.SAMOptimizer(
      model, SAM_TX, wrt=nnx.Param, bn_stats=bn_stats,
      second_pass_rng=second_pass_rng)
  _nnx_sam_step(model, optimizer, x, y)
  _nnx_first_pass(first, x, y)
  _hand_nnx_sam_step(ref, BASE.init(nnx.as_pure(nnx.state(ref, nnx.Param))),
                     x, y, rng=second_pass_rng, bn=bn_stats)
  helpers.assert_trees_close(_no_keys(model), _no_keys(ref), atol=1e-6)
  _assert_equal(nnx.state(model, nnx.RngCount), nnx.state(ref, nnx.RngCount))
  return model, first


def test_nnx_batch_stats_default_are_the_unperturbed_pass():
  model, first = _nnx_policy_step()
  # The user's model keeps exactly the statistics of the unperturbed pass.
  _assert_equal(nnx.state(model, nnx.BatchStat), nnx.state(first, nnx.BatchStat))


def test_nnx_batch_stats_perturbed_policy():
  model, first = _nnx_policy_step(bn_stats="perturbed")
  assert _max_diff(nnx.state(model, nnx.BatchStat),
                   nnx.state(first, nnx.BatchStat)) > 1e-5


def test_nnx_dropout_same_and_fresh():
  same, first = _nnx_policy_step()
  fresh, _ = _nnx_policy_step(second_pass_rng="fresh")
  # "same" leaves the counters where the unperturbed pass left them; "fresh"
  # advances them past the perturbed pass's draws (one per step here).
  _assert_equal(nnx.state(same, nnx.RngCount), nnx.state(first, nnx.RngCount))
  assert int(fresh.dropout.rngs.count[...]) == (
      int(first.dropout.rngs.count[...]) + 1)
  assert _max_diff(nnx.state(same, nnx.Param),
                   nnx.state(fresh, nnx.Param)) > 1e-4


def _every_other_step_rule():
  """Plain SAM's ε on odd steps; even steps skip the second pass."""
  def ascent(g, rule_state, params):
    del params
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g)))
    return jax.tree.map(lambda v: v / norm, g), rule_state
  return sam_optax.PerturbationRule(
      init=lambda params: (), ascent=ascent,
      second_pass=lambda rule_state, count: count % 2 == 1)


def test_nnx_policies_on_a_step_that_skips_the_second_pass():
  x, y = _batch()
  tx = optax.chain(sam_optax.sharpness_aware_transform(
      _every_other_step_rule(), RHO, name="every_other"), BASE)
  model = NNXCNN(nnx.Rngs(0))
  first = nnx.clone(model)
  optimizer = sam_flax.SAMOptimizer(model, tx, wrt=nnx.Param,
                                    bn_stats="perturbed",
                                    second_pass_rng="fresh")
  _nnx_sam_step(model, optimizer, x, y)  # step 0: no perturbed pass
  _nnx_first_pass(first, x, y)
  # Nothing to keep from a pass that did not run: the unperturbed statistics
  # stay, and the counters stand where the unperturbed pass left them.
  _assert_equal(nnx.state(model, nnx.BatchStat), nnx.state(first, nnx.BatchStat))
  _assert_equal(nnx.state(model, nnx.RngCount), nnx.state(first, nnx.RngCount))
  _nnx_sam_step(model, optimizer, x, y)  # step 1: a SAM step
  _nnx_first_pass(first, x, y)
  assert int(model.dropout.rngs.count[...]) == (
      int(first.dropout.rngs.count[...]) + 1)


def test_nnx_wrt_subset_holds_the_rest_fixed():
  x, y = _batch()
  loss_fn = _nnx_loss(x, y)
  model = NNXMLP(nnx.Rngs(0))
  wrt = nnx.All(nnx.Param, nnx.PathContains("l2"))
  optimizer = sam_flax.SAMOptimizer(
      model, sam_optax.sam(optax.sgd(LR), rho=RHO), wrt=wrt)
  l1_before = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model.l1)))
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
  params = nnx.as_pure(nnx.state(model, wrt))

  def head_loss(p):
    shadow = nnx.clone(model)
    nnx.update(shadow, p)
    return loss_fn(shadow)

  g_sam = jax.grad(head_loss)(_add(params, _hand_eps(nnx.as_pure(grads))))
  optimizer.update(model, grads, loss_fn=loss_fn)
  helpers.assert_trees_close(
      nnx.as_pure(nnx.state(model, wrt)),
      jax.tree.map(lambda w, v: w - LR * v, params, g_sam), atol=1e-6)
  _assert_equal(nnx.as_pure(nnx.state(model.l1)), l1_before)


def test_nnx_bf16_keeps_dtypes():
  x, y = _batch(dtype=jnp.bfloat16)
  model = NNXMLP(nnx.Rngs(0), dtype=jnp.bfloat16)
  optimizer = sam_flax.SAMOptimizer(
      model, sam_optax.sam(optax.adam(1e-3), rho=RHO), wrt=nnx.Param)
  dtypes = lambda t: jax.tree.map(lambda a: a.dtype, nnx.as_pure(t))  # noqa: E731
  init_dtypes = dtypes(nnx.state(optimizer))
  # optax's Adam promotes (decay ** int count).
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(2):
      _nnx_sam_step(model, optimizer, x, y)
  assert all(a.dtype == jnp.bfloat16
             for a in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param))))
  assert dtypes(nnx.state(optimizer)) == init_dtypes
  info = sam_optax.get_info(nnx.as_pure(optimizer.opt_state))
  assert info.grad_norm.dtype == jnp.float32
  assert np.isfinite(float(info.perturbed_loss))
  # get_info also reads the optimizer's state as it is (NNX variables unwrapped).
  direct = sam_optax.get_info(optimizer.opt_state)
  assert isinstance(direct.grad_norm, jax.Array)
  assert float(direct.perturbed_loss) == float(info.perturbed_loss)


@nnx.jit
def _nnx_chunk_step(model, optimizer, x, y):
  """A step with in-device m-sharpness: loss_fn(model, chunk) and batch=."""
  chunk_loss = lambda model, batch: _xent(model(batch[0]), batch[1])  # noqa: E731
  grads = nnx.grad(chunk_loss)(model, (x, y))
  return optimizer.update(model, grads, loss_fn=chunk_loss, batch=(x, y))


def test_nnx_m_sharpness_matches_tx_update():
  x, y = _batch(n=16)
  model = NNXMLP(nnx.Rngs(0))
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO, m=4)
  graphdef, params = nnx.split(model)
  params = nnx.as_pure(params)

  @jax.jit
  def want(params):
    chunk_loss = lambda p, batch: _xent(  # noqa: E731
        nnx.merge(graphdef, p)(batch[0]), batch[1])
    grads = jax.grad(chunk_loss)(params, (x, y))
    return tx.update(grads, tx.init(params), params, loss_fn=chunk_loss,
                     batch=(x, y))[0]

  optimizer = sam_flax.SAMOptimizer(model, tx, wrt=nnx.Param)
  got = _nnx_chunk_step(model, optimizer, x, y)
  helpers.assert_trees_close(got, want(params), atol=1e-7)


def test_nnx_tree_mode_matches_graph_mode():
  x, y = _batch()
  results = []
  for graph in (True, False):
    model = NNXMLP(nnx.Rngs(0))
    optimizer = sam_flax.SAMOptimizer(model, SAM_TX, wrt=nnx.Param,
                                      graph=graph)

    @functools.partial(nnx.jit, graph=graph)
    def step(model, optimizer, graph=graph):
      loss_fn = _nnx_loss(x, y)
      loss, grads = nnx.value_and_grad(loss_fn, graph=graph)(model)
      optimizer.update(model, grads, loss_fn=loss_fn)
      return loss

    for _ in range(2):
      step(model, optimizer)
    results.append(nnx.as_pure(nnx.state(model, nnx.Param)))
  helpers.assert_trees_close(results[0], results[1], atol=1e-6)


def test_nnx_bad_input():
  x, y = _batch(n=8)
  model = NNXCNN(nnx.Rngs(0))
  tx = sam_optax.sam(optax.sgd(LR), rho=RHO)
  optimizer = sam_flax.SAMOptimizer(model, tx, wrt=nnx.Param)
  grads = nnx.state(model, nnx.Param)  # any grads: the call fails first
  with pytest.raises(TypeError, match=r"`SAMOptimizer.update` needs the "
                     r"keyword argument `loss_fn` \(received none\).*"
                     r"`loss_fn\(model\)`"):
    optimizer.update(model, grads)
  with pytest.raises(ValueError, match=r"`SAMOptimizer\(bn_stats='both'\)`: "
                     r"expected one of \('unperturbed', 'perturbed'\)"):
    sam_flax.SAMOptimizer(model, tx, wrt=nnx.Param, bn_stats="both")
  with pytest.raises(ValueError, match=r"`SAMOptimizer\(second_pass_rng="
                     r"'new'\)`: expected one of \('same', 'fresh'\)"):
    sam_flax.SAMOptimizer(model, tx, wrt=nnx.Param, second_pass_rng="new")
  # Perturbed statistics are undefined with one perturbation per group, under
  # every group loop (scan/unroll would silently keep the last group's).
  for loop in ("vmap", "scan", "unroll"):
    grouped = sam_optax.sam(optax.sgd(LR), rho=RHO, m=4, group_loop=loop)
    optimizer = sam_flax.SAMOptimizer(model, grouped, wrt=nnx.Param,
                                      bn_stats="perturbed")
    with pytest.raises(ValueError, match=r"`SAMOptimizer\(bn_stats='perturbed'"
                       r"\)` keeps model state from the perturbed pass.*`m=`"):
      _nnx_chunk_step(model, optimizer, x, y)


# --- Packaging. ----------------------------------------------------------------


def test_import_sam_optax_without_flax():
  code = textwrap.dedent("""
      import sys
      import sam_optax
      assert sam_optax.sam is not None
      assert 'flax' not in sys.modules, 'import sam_optax imported flax'
      sys.modules['flax'] = None  # as if flax were not installed
      try:
        import sam_optax.flax
      except ImportError as e:
        print('ImportError:', e)
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stderr
  assert "ImportError: `sam_optax.flax` needs Flax" in out.stdout, out
  assert "pip install 'sam_optax[flax]'" in out.stdout, out


# --- README examples: the section "Using with Flax" of README.md is this code.

README_LINEN = """\
import jax, optax, sam_optax
from sam_optax.flax import SAMTrainStateWithBatchStats

state = SAMTrainStateWithBatchStats.create(
    apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
    tx=sam_optax.sam(optax.adam(1e-2), rho=0.05, has_aux=True))

@jax.jit
def train_step(state, x, y, key):
  def loss_fn(params):  # the usual Linen BatchNorm + dropout loss
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, loss_fn=loss_fn, value=loss,
                               batch_stats=updates["batch_stats"]), loss
"""

README_NNX = """\
import optax, sam_optax
from flax import nnx
from sam_optax.flax import SAMOptimizer

optimizer = SAMOptimizer(model, sam_optax.sam(optax.adam(1e-2), rho=0.05), wrt=nnx.Param)

@nnx.jit
def train_step(model, optimizer, x, y):
  loss_fn = lambda model: optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads, loss_fn=loss_fn, value=loss)
  return loss
"""


def test_readme_linen_example():
  x, y = _batch(n=128)
  model = flax_helpers.LinenNet()
  scope = {"model": model,
           "variables": model.init(jax.random.key(0), x, train=False)}
  exec(README_LINEN, scope)  # pylint: disable=exec-used
  state, train_step = scope["state"], scope["train_step"]
  losses = []
  for i in range(15):
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: decay ** int count
      state, loss = train_step(state, x, y, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses


def test_readme_nnx_example():
  x, y = _batch(n=128)
  model = NNXCNN(nnx.Rngs(0))
  scope = {"model": model}
  exec(README_NNX, scope)  # pylint: disable=exec-used
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam: decay ** int count
    losses = [float(scope["train_step"](model, scope["optimizer"], x, y))
              for _ in range(15)]
  assert losses[-1] < 0.7 * losses[0], losses


def test_readme_section_is_the_tested_code():
  readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
  text = readme.read_text()
  assert "## Using with Flax" in text
  section = text.split("## Using with Flax", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert blocks == [README_LINEN, README_NNX]
