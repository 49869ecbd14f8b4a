"""In-device m (``m=``) at constant memory, and on the shard each device holds.

Without ``group_grads=``, ``group_loop='scan'`` runs the ascent gradient, ε,
the perturbed gradient and the accumulation one group at a time, so the step's
temp memory stays at a hand-written fused loop's whatever the number of
groups. Under ``jit`` with a batch sharded over a mesh, the loop runs each
device's groups on that device (no all-gather of the batch). Every result is
checked against ``group_loop='vmap'`` and a float64 numpy reference.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from tests import helpers

RHO, LR = 0.05, 0.1


def _groups(x, y, m):
  return [(x[i:i + m], y[i:i + m]) for i in range(0, x.shape[0], m)]


def np_group_sam(params, groups, *, rho, sign=1.0):
  """Mean over groups of ∇L_k(w + ε_k), of L_k(w + ε_k) and of ‖ε_k‖, float64.

  ``ε_k = sign · ρ g_k / ‖g_k‖`` (``sign=-1``: the ascent from ``-g_k``).
  """
  params = helpers.np_tree(params)
  grads, losses, norms = [], [], []
  for x, y in groups:
    x = np.asarray(x, np.float64)
    _, g = helpers.np_mlp_loss_and_grad(params, x, np.asarray(y))
    norm = helpers.np_tree_norm(g)
    eps = jax.tree.map(lambda v: sign * rho * v / norm, g)
    loss_p, g_p = helpers.np_mlp_loss_and_grad(
        jax.tree.map(np.add, params, eps), x, np.asarray(y))
    grads.append(g_p)
    losses.append(loss_p)
    norms.append(helpers.np_tree_norm(eps))
  mean = jax.tree.map(lambda *v: sum(v) / len(v), *grads)
  return mean, np.mean(losses), np.mean(norms)


def _update(group_loop, m, *, group_grads=None):
  """One jitted ``update`` of the SAM block: ``(direction, info)``."""
  tx = sam_optax.sharpness_aware(RHO, m=m, group_loop=group_loop)

  @jax.jit
  def run(params, batch, group_grads):
    grads = jax.grad(helpers.mlp_loss)(params, batch)
    kw = {} if group_grads is None else {"group_grads": group_grads}
    direction, state = tx.update(grads, tx.init(params), params,
                                 loss_fn=helpers.mlp_loss, batch=batch, **kw)
    return direction, state.info

  return run


def _assert_close(a, b, rtol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol,
      atol=1e-7), a, b)


# --- The same numbers as vmap and the float64 reference -------------------------


@pytest.mark.parametrize("group_loop", ["scan", "unroll"])
@pytest.mark.parametrize("n_groups", [3, 4])
def test_fused_loop_equals_vmap_and_float64_reference(group_loop, n_groups):
  params = helpers.mlp_params()
  m = 4
  x, y = helpers.mlp_batch(n=n_groups * m)
  direction, info = _update(group_loop, m)(params, (x, y), None)
  want_vmap, info_vmap = _update("vmap", m)(params, (x, y), None)
  _assert_close(direction, want_vmap, rtol=2e-6)
  _assert_close((info.perturbed_loss, info.perturbation_norm),
                (info_vmap.perturbed_loss, info_vmap.perturbation_norm), rtol=2e-6)
  want, loss_p, eps_norm = np_group_sam(params, _groups(x, y, m), rho=RHO)
  helpers.assert_trees_close(direction, want, atol=1e-6)
  np.testing.assert_allclose(info.perturbed_loss, loss_p, rtol=1e-6)
  np.testing.assert_allclose(info.perturbation_norm, eps_norm, rtol=1e-6)


@pytest.mark.parametrize("group_loop", ["vmap", "scan", "unroll"])
def test_supplied_group_grads_are_used(group_loop):
  # Negated per-group gradients: ε_k = -ρ ĝ_k. The result follows the
  # supplied gradients, so the transform did not recompute them.
  params = helpers.mlp_params()
  m = 4
  x, y = helpers.mlp_batch(n=4 * m)
  _, _, gg = sam_optax.group_value_and_grad(helpers.mlp_loss, m)(params, (x, y))
  negated = jax.tree.map(jnp.negative, gg)
  direction, info = _update(group_loop, m)(params, (x, y), negated)
  want, loss_p, eps_norm = np_group_sam(params, _groups(x, y, m), rho=RHO,
                                        sign=-1.0)
  helpers.assert_trees_close(direction, want, atol=1e-6)
  np.testing.assert_allclose(info.perturbed_loss, loss_p, rtol=1e-6)
  np.testing.assert_allclose(info.perturbation_norm, eps_norm, rtol=1e-6)


def test_fused_loop_computes_each_group_gradient_in_the_loop():
  # Without group_grads=, the program holds no [groups, ...] stack of
  # gradients: the loss is traced inside the loop's body only.
  params = helpers.mlp_params(sizes=(4, 64, 3))
  batch = helpers.mlp_batch(n=32)
  tx = sam_optax.sharpness_aware(RHO, m=2, group_loop="scan")

  def update(params, batch):
    grads = jax.grad(helpers.mlp_loss)(params, batch)
    return tx.update(grads, tx.init(params), params, loss_fn=helpers.mlp_loss,
                     batch=batch)[0]

  text = jax.jit(update).lower(params, batch).compile().as_text()
  stacked = [s for s in ("f32[16,4,64]", "f32[16,64,3]") if s in text]
  assert not stacked, stacked
  assert " while(" in text


# --- Memory: a hand-written fused loop's, whatever the number of groups ---------

M = 2
SIZES = (512, 1024, 512)  # 4.2 MB of float32 params; activations are small


def _hand_fused_step(n_groups):
  """For each group: g = ∇L_k(w), ε = ρ g/‖g‖, accumulate ∇L_k(w + ε); SGD."""

  def step(params, batch):
    chunks = jax.tree.map(
        lambda a: a.reshape((n_groups, M) + a.shape[1:]), batch)

    def body(acc, chunk):
      g = jax.grad(helpers.mlp_loss)(params, chunk)
      norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
      w_eps = jax.tree.map(lambda w, v: w + RHO * v / norm, params, g)
      g_p = jax.grad(helpers.mlp_loss)(w_eps, chunk)
      return jax.tree.map(jnp.add, acc, g_p), None

    acc, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), chunks)
    return jax.tree.map(lambda w, a: w - LR * a / n_groups, params, acc)

  return step


def _sam_step(group_loop):
  tx = sam_optax.sam(optax.sgd(LR), RHO, m=M, group_loop=group_loop)

  def step(params, state, batch):
    grads = jax.grad(helpers.mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, loss_fn=helpers.mlp_loss,
                               batch=batch)
    return optax.apply_updates(params, updates), state

  return tx, step


def _temp_bytes(n_groups, group_loop=None):
  params = helpers.mlp_params(sizes=SIZES)
  batch = helpers.mlp_batch(n=n_groups * M, d=SIZES[0], classes=SIZES[-1])
  if group_loop is None:
    compiled = jax.jit(_hand_fused_step(n_groups)).lower(params, batch).compile()
  else:
    tx, step = _sam_step(group_loop)
    compiled = jax.jit(step).lower(params, tx.init(params), batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _params_bytes():
  return 4 * sum(a.size for a in jax.tree.leaves(helpers.mlp_params(sizes=SIZES)))


@pytest.mark.parametrize("n_groups", [4, 8])
def test_scan_step_memory_within_10_percent_of_hand_written_fused_loop(n_groups):
  hand = _temp_bytes(n_groups)
  sam = _temp_bytes(n_groups, "scan")
  assert hand >= _params_bytes(), hand  # the loop's own buffers: MBs
  assert sam <= 1.10 * hand, (sam / hand, sam, hand)


def test_scan_step_memory_does_not_grow_with_groups():
  params = _params_bytes()
  scan = {k: _temp_bytes(k, "scan") for k in (4, 8)}
  vmap = {k: _temp_bytes(k, "vmap") for k in (4, 8)}
  # What grows is only the full-batch gradient's activations (a few % here).
  assert scan[8] <= scan[4] + 0.05 * params, (scan, params)
  # vmap holds every group's perturbed copy: +4 params-sized buffers.
  assert vmap[8] >= vmap[4] + 3 * params, (vmap, params)


# --- Under jit with a batch sharded over 'data' -----------------------------------


def _gathers(text):
  """Collectives that move examples between devices: a loop that slices the
  sharded group axis gets all-gathers ('scan') or collective-permutes
  ('unroll')."""
  return re.findall(
      r"\b(?:all-gather|collective-permute|all-to-all)(?:-start)?\(", text)


def _sharded_step(group_loop, *, supply_group_grads):
  tx = sam_optax.sam(optax.sgd(LR), RHO, m=2, group_loop=group_loop)

  def step(params, state, batch):
    if supply_group_grads:
      _, grads, gg = sam_optax.group_value_and_grad(
          helpers.mlp_loss, 2, group_loop=group_loop)(params, batch)
      kw = {"group_grads": gg}
    else:
      grads, kw = jax.grad(helpers.mlp_loss)(params, batch), {}
    updates, state = tx.update(grads, state, params, loss_fn=helpers.mlp_loss,
                               batch=batch, **kw)
    return optax.apply_updates(params, updates), state

  return tx, jax.jit(step)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("supply_group_grads", [False, True])
@pytest.mark.parametrize("group_loop", ["scan", "unroll"])
def test_sharded_batch_runs_each_device_groups_without_all_gather(
    group_loop, supply_group_grads, axis_type):
  # 8 devices, a batch of 64 examples split into 8 shards of 8, m = 2: each
  # device holds groups 4d..4d+3 (group g = examples 2g, 2g+1 of the global
  # batch, as without a mesh) and runs them itself.
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  params = helpers.mlp_params()
  x, y = helpers.mlp_batch(n=64)
  tx, step = _sharded_step(group_loop, supply_group_grads=supply_group_grads)
  with jax.set_mesh(mesh):
    batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    w = jax.device_put(params, NamedSharding(mesh, P()))
    compiled = step.lower(w, tx.init(w), batch).compile()
    got, _ = compiled(w, tx.init(w), batch)
  assert not _gathers(compiled.as_text())
  want, _ = step(params, tx.init(params), (x, y))  # one device, no mesh
  _assert_close(got, want, rtol=2e-6)
  g_sam, _, _ = np_group_sam(params, _groups(x, y, 2), rho=RHO)
  helpers.assert_trees_close(
      got, jax.tree.map(lambda p, g: p - LR * g, helpers.np_tree(params), g_sam),
      atol=1e-6)


def test_group_value_and_grad_scan_keeps_the_groups_on_their_devices():
  mesh = helpers.mesh(8, "data")
  params = helpers.mlp_params()
  x, y = helpers.mlp_batch(n=64)
  batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  f = jax.jit(sam_optax.group_value_and_grad(helpers.mlp_loss, 2,
                                             group_loop="scan"))
  compiled = f.lower(params, batch).compile()
  assert not _gathers(compiled.as_text())
  _, _, gg = compiled(params, batch)
  for k, (xs, ys) in enumerate(_groups(x, y, 2)):
    _, g_k = helpers.np_mlp_loss_and_grad(helpers.np_tree(params),
                                          np.float64(xs), ys)
    helpers.assert_trees_close(jax.tree.map(lambda a: a[k], gg), g_k)
  # The stacked gradients keep the batch's split: group axis over 'data'.
  assert jax.tree.leaves(gg)[0].sharding.spec[0] == "data"
