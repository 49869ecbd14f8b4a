"""Orbax checkpoints of SAM train states: resuming is bit-exact.

A run checkpointed at step 10 and resumed must reach, at step 20, exactly
(bit for bit) the params, batch statistics and optimizer state of a run that
was never interrupted: the SAM state (step counter, the ρ schedule it drives,
the statistics), the base optimizer's EMA buffers and the LR schedule all
round-trip through orbax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import sam_optax
from sam_optax import flax as sam_flax
from tests import flax_helpers

LR = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 20)
RHO = optax.linear_schedule(0.01, 0.1, 20)  # driven by the SAM state's count
DROPOUT_KEY = jax.random.key(42)


def _data():
  x, y = flax_helpers.digits()
  x, y = x[:320], y[:320]
  return [(jnp.asarray(x[i:i + 32]), jnp.asarray(y[i:i + 32]))
          for i in range(0, 320, 32)]


DATA = _data()


def _batch(step):
  return DATA[step % len(DATA)]


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)

  def check(x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  jax.tree.map(check, a, b)


def _save_and_restore(path, state, like):
  """Saves ``state``; restores it into the shapes/dtypes/shardings of ``like``."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return checkpointer.restore(path, target)


# --- Linen: BatchNorm + dropout, SAM around AdamW with schedules. -------------


# Dense → BatchNorm → ReLU → Dropout → Dense.
MODEL = flax_helpers.LinenNet(conv=False, dropout=0.2)
TX = sam_optax.sam(optax.adamw(LR, weight_decay=1e-4), rho=RHO, has_aux=True)


def _linen_state(seed):
  variables = MODEL.init(jax.random.key(seed), DATA[0][0], train=False)
  state = sam_flax.SAMTrainStateWithBatchStats.create(
      apply_fn=MODEL.apply, params=variables["params"], tx=TX,
      batch_stats=variables["batch_stats"])
  return state.replace(step=jnp.zeros((), jnp.int32))


@jax.jit
def _linen_step(state, x, y):
  key = jax.random.fold_in(DROPOUT_KEY, state.step)
  return flax_helpers.linen_sam_step(state, x, y, key)[0]


def _train(state, start, stop, step_fn=_linen_step):
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam(W): decay ** int count
    for i in range(start, stop):
      state = step_fn(state, *_batch(i))
  return state


def test_linen_resume_from_step_10_is_bit_exact(tmp_path):
  uninterrupted = _train(_linen_state(0), 0, 20)

  at_10 = _train(_linen_state(0), 0, 10)
  # Restore into a freshly initialized state (other values, same structure).
  restored = _save_and_restore(tmp_path / "step10", at_10, _linen_state(1))
  assert isinstance(restored, sam_flax.SAMTrainStateWithBatchStats)
  _assert_bit_identical(restored, at_10)
  sam_state = restored.opt_state[0]
  assert isinstance(sam_state, sam_optax.SharpnessAwareState)
  assert int(sam_state.count) == 10
  assert float(sam_state.info.rho) == pytest.approx(float(RHO(9)))
  assert np.isfinite(float(sam_state.info.sharpness))

  resumed = _train(restored, 10, 20)
  _assert_bit_identical(resumed, uninterrupted)
  assert int(resumed.step) == 20
  # The run really moved (the comparison is not between two initial states).
  assert not np.array_equal(np.asarray(resumed.params["Dense_0"]["kernel"]),
                            np.asarray(at_10.params["Dense_0"]["kernel"]))


# --- Linen, params sharded over an 8-device mesh. -----------------------------


class PlainMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


PLAIN = PlainMLP()
PLAIN_TX = sam_optax.sam(optax.adam(LR), rho=RHO)


def _sharded_setup():
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  param_shardings = {
      "Dense_0": {"kernel": NamedSharding(mesh, P(None, "d")),
                  "bias": NamedSharding(mesh, P("d"))},
      "Dense_1": {"kernel": NamedSharding(mesh, P("d", None)),
                  "bias": replicated},
  }

  def make(seed):
    params = PLAIN.init(jax.random.key(seed), DATA[0][0])["params"]
    params = jax.device_put(params, param_shardings)
    state = sam_flax.SAMTrainState.create(apply_fn=PLAIN.apply, params=params,
                                          tx=PLAIN_TX)
    return state.replace(step=jnp.zeros((), jnp.int32))

  state = make(0)
  # The optimizer state is sharded like the params (Adam's moments), the rest
  # (counters, statistics) replicated.
  opt_shardings = optax.tree_map_params(
      PLAIN_TX, lambda _, s: s, state.opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = state.replace(step=replicated, params=param_shardings,
                            opt_state=opt_shardings)

  def step(state, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        state.apply_fn({"params": p}, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads, loss_fn=loss_fn, value=loss)

  step = jax.jit(step, in_shardings=(shardings, replicated, replicated),
                 out_shardings=shardings)
  place = lambda s: jax.device_put(s, shardings)  # noqa: E731
  return place(make(0)), place(make(1)), step, shardings


def test_sharded_resume_from_step_10_is_bit_exact(tmp_path):
  state0, fresh, step, shardings = _sharded_setup()
  uninterrupted = _train(state0, 0, 20, step)
  at_10 = _train(state0, 0, 10, step)
  restored = _save_and_restore(tmp_path / "sharded", at_10, fresh)
  # Restored with the target's shardings, leaf by leaf.
  jax.tree.map(lambda x, s: _assert_same_sharding(x.sharding, s),
               restored, shardings)
  kernel = restored.params["Dense_0"]["kernel"]
  assert {sh.data.shape for sh in kernel.addressable_shards} == {(64, 4)}
  _assert_bit_identical(restored, at_10)
  resumed = _train(restored, 10, 20, step)
  _assert_bit_identical(resumed, uninterrupted)
  assert float(sam_optax.get_info(resumed.opt_state).sharpness) != 0


def _assert_same_sharding(got, want):
  assert got.is_equivalent_to(want, 2), (got, want)


# --- NNX: the model and the SAMOptimizer (with its RNG counters). --------------


class NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 32, rngs=rngs)
    self.bn = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.l2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.dropout(nnx.relu(self.bn(self.l1(x)))))


NNX_TX = sam_optax.sam(optax.adamw(LR, weight_decay=1e-4), rho=RHO)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads, loss_fn=loss_fn, value=loss)


def _nnx_setup(seed):
  model = NNXNet(nnx.Rngs(seed))
  return model, sam_flax.SAMOptimizer(model, NNX_TX, wrt=nnx.Param)


def _nnx_train(model, optimizer, start, stop):
  with jax.numpy_dtype_promotion("standard"):  # optax's AdamW: decay ** int count
    for i in range(start, stop):
      _nnx_step(model, optimizer, *_batch(i))


def _nnx_checkpoint(model, optimizer):
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def test_nnx_resume_from_step_10_is_bit_exact(tmp_path):
  model, optimizer = _nnx_setup(0)
  _nnx_train(model, optimizer, 0, 20)
  uninterrupted = _nnx_checkpoint(model, optimizer)

  model, optimizer = _nnx_setup(0)
  _nnx_train(model, optimizer, 0, 10)
  at_10 = _nnx_checkpoint(model, optimizer)
  new_model, new_optimizer = _nnx_setup(1)  # other values, same structure
  restored = _save_and_restore(tmp_path / "nnx", at_10,
                               _nnx_checkpoint(new_model, new_optimizer))
  nnx.update(new_model, restored["model"])
  nnx.update(new_optimizer, restored["optimizer"])
  _assert_bit_identical(_nnx_checkpoint(new_model, new_optimizer), at_10)
  assert int(new_optimizer.step[...]) == 10

  _nnx_train(new_model, new_optimizer, 10, 20)
  _assert_bit_identical(_nnx_checkpoint(new_model, new_optimizer),
                        uninterrupted)
