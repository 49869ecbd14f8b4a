"""Small models, one jitted training step and pure-numpy references shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import sam_optax


def mlp_params(key=0, sizes=(4, 8, 3), dtype=jnp.float32):
  """A 2-layer MLP's params as a nested dict."""
  rng = np.random.default_rng(key)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
        "w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype),
        "b": jnp.asarray(rng.normal(size=(b,)) * 0.1, dtype),
    }
  return params


def mlp_batch(key=1, n=16, d=4, classes=3):
  rng = np.random.default_rng(key)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, classes, size=(n,))
  return jnp.asarray(x), jnp.asarray(y)


def mlp_loss(params, batch):
  """Mean squared error to one-hot targets of a tanh MLP (smooth, simple)."""
  x, y = batch
  # Computed in the batch's dtype (float32) for params of any float dtype.
  params = jax.tree.map(lambda a: a.astype(x.dtype), params)
  h = jnp.tanh(x @ params["layer0"]["w"] + params["layer0"]["b"])
  out = h @ params["layer1"]["w"] + params["layer1"]["b"]
  target = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
  return jnp.mean(jnp.sum((out - target) ** 2, axis=-1))


def mlp_problem(dtype=jnp.float32, **batch_kw):
  """The MLP's params, a batch and the one-argument loss on that batch."""
  params = mlp_params(dtype=dtype)
  batch = mlp_batch(**batch_kw)
  return params, batch, lambda p: mlp_loss(p, batch)


# --- Training steps ------------------------------------------------------------


def train_steps(tx, params, loss_fn, n, *, state=None, jit=True, value=True,
                **update_kwargs):
  """`n` steps of `tx` on `loss_fn(params)`, one program for all of them.

  Each step takes the gradient (and, with `value=True`, the loss as `value=`)
  and calls `tx.update(..., loss_fn=loss_fn, **update_kwargs)`. `state`
  starts from `tx.init(params)` unless given.

  Returns:
    `(trajectory, final state, step)`: the params after each step, and the
    step function, so that `step._cache_size()` can be asserted (jitted
    unless `jit=False`).
  """
  state = tx.init(params) if state is None else state

  def step(params, state):
    if value:
      loss, grads = jax.value_and_grad(loss_fn)(params)
      extra = dict(update_kwargs, value=loss)
    else:
      grads, extra = jax.grad(loss_fn)(params), update_kwargs
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, **extra)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  trajectory = []
  for _ in range(n):
    params, state = step(params, state)
    trajectory.append(params)
  return trajectory, state, step


def mesh(n=8, name="d"):
  """A 1-D mesh over the first `n` (simulated CPU) devices."""
  return jax.make_mesh((n,), (name,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def shard_map_step(tx, mesh_, axis="d", *, loss=mlp_loss, per_device=True,
                   value=True, check_vma=True, batch_arg=False):
  """A jitted step `(params, state, batch)` under shard_map, batch split over
  `axis`, params and state replicated (`P()`); `loss(params, batch)`.

  `per_device`: the gradient is each device's own
  (`sam_optax.per_device(params, axis)`). `value`: the loss goes to `update`
  as `value=`. `batch_arg`: `update` gets `loss_fn=loss` and `batch=` (in-device
  m-sharpness: the transform splits the batch itself); otherwise
  `loss_fn=lambda p: loss(p, batch)`.
  """

  def step(params, state, batch):
    closed = lambda p: loss(p, batch)
    w = sam_optax.per_device(params, axis) if per_device else params
    if value:
      loss_value, grads = jax.value_and_grad(closed)(w)
      extra = {"value": loss_value}
    else:
      grads, extra = jax.grad(closed)(w), {}
    if batch_arg:
      loss_fn, extra = loss, dict(extra, batch=batch)
    else:
      loss_fn = closed
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, **extra)
    return optax.apply_updates(params, updates), state

  return jax.jit(jax.shard_map(step, mesh=mesh_, in_specs=(P(), P(), P(axis)),
                               out_specs=(P(), P()), check_vma=check_vma))


# --- Pure numpy reference ----------------------------------------------------

def np_mlp_loss_and_grad(params, x, y):
  """Loss and gradient of `mlp_loss`, by hand, in float64 numpy."""
  w0, b0 = params["layer0"]["w"], params["layer0"]["b"]
  w1, b1 = params["layer1"]["w"], params["layer1"]["b"]
  n = x.shape[0]
  z = x @ w0 + b0
  h = np.tanh(z)
  out = h @ w1 + b1
  t = np.eye(out.shape[1])[y]
  r = out - t
  loss = np.mean(np.sum(r ** 2, axis=1))
  dout = 2 * r / n
  gw1 = h.T @ dout
  gb1 = dout.sum(0)
  dh = dout @ w1.T
  dz = dh * (1 - h ** 2)
  gw0 = x.T @ dz
  gb0 = dz.sum(0)
  grads = {"layer0": {"w": gw0, "b": gb0}, "layer1": {"w": gw1, "b": gb1}}
  return loss, grads


def np_tree(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def np_tree_norm(tree):
  return np.sqrt(sum(np.sum(v ** 2) for v in jax.tree.leaves(tree)))


def np_sam_sgd_trajectory(params, x, y, *, rho, lr, momentum, steps):
  """SAM + SGD (heavy-ball, as optax.sgd) written out in numpy."""
  params = np_tree(params)
  x, y = np.asarray(x, np.float64), np.asarray(y)
  trace = jax.tree.map(np.zeros_like, params)
  out = []
  for _ in range(steps):
    _, g = np_mlp_loss_and_grad(params, x, y)
    norm = np_tree_norm(g)
    eps = jax.tree.map(lambda v: rho * v / norm if norm > 0 else 0 * v, g)
    perturbed = jax.tree.map(lambda a, b: a + b, params, eps)
    _, g_sam = np_mlp_loss_and_grad(perturbed, x, y)
    trace = jax.tree.map(lambda t, g_: g_ + momentum * t, trace, g_sam)
    params = jax.tree.map(lambda p, t: p - lr * t, params, trace)
    out.append(params)
  return out


def assert_trees_close(a, b, atol=1e-6, rtol=0.0):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(
          np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=rtol),
      a, b)
