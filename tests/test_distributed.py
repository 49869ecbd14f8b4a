"""m-sharpness across devices (pmap, shard_map), inside a device (m=), and both.

Every trajectory is checked against a pure-numpy reference that loops over the
groups of examples, gives each its own ε, and averages the perturbed
gradients.
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
from sam_optax._src.registry import METHODS
from tests import helpers

RHO, LR, MOMENTUM = 0.05, 0.1, 0.9
N_DEV = 8


def _mesh(n=N_DEV, name="d"):
  return helpers.mesh(n, name)


def _data(n=64, seed=1):
  return helpers.mlp_batch(key=seed, n=n)


def np_group_sam_sgd_trajectory(params, groups, *, rho, lr, momentum, steps):
  """m-sharpness SAM + heavy-ball SGD in float64 numpy.

  ``groups`` is a list of ``(x_k, y_k)``; each group gets ``ε_k = ρ g_k/‖g_k‖``
  from its own gradient and the step uses ``mean_k ∇L_k(w + ε_k)``.
  """
  params = helpers.np_tree(params)
  groups = [(np.asarray(x, np.float64), np.asarray(y)) for x, y in groups]
  trace = jax.tree.map(np.zeros_like, params)
  out = []
  for _ in range(steps):
    g_sam = None
    for x, y in groups:
      _, g = helpers.np_mlp_loss_and_grad(params, x, y)
      norm = helpers.np_tree_norm(g)
      eps = jax.tree.map(lambda v: rho * v / norm if norm > 0 else 0 * v, g)
      perturbed = jax.tree.map(lambda a, b: a + b, params, eps)
      _, g_p = helpers.np_mlp_loss_and_grad(perturbed, x, y)
      g_sam = g_p if g_sam is None else jax.tree.map(np.add, g_sam, g_p)
    g_sam = jax.tree.map(lambda v: v / len(groups), g_sam)
    trace = jax.tree.map(lambda t, g_: g_ + momentum * t, trace, g_sam)
    params = jax.tree.map(lambda p, t: p - lr * t, params, trace)
    out.append(params)
  return out


def _groups(x, y, size):
  return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def _sam(**kw):
  return sam_optax.sam(optax.sgd(LR, momentum=MOMENTUM), rho=RHO, **kw)


def _shard_map_step(tx, mesh, axis="d", *, per_device=True):
  """A jitted SAM step under shard_map; params and state replicated (P())."""
  return helpers.shard_map_step(tx, mesh, axis, per_device=per_device)


def _pmap_step(tx, axis="d"):

  def step(params, state, batch):
    loss_fn = lambda p: helpers.mlp_loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
                               value=value)
    return optax.apply_updates(params, updates), state

  return jax.pmap(step, axis_name=axis)


_ALL_REDUCE = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.*?)\s+all-reduce(?:-start)?\(")


def _all_reduces(compiled_text):
  """The result shapes of every all-reduce op in an HLO module's text."""
  return [m.group(1) for m in map(_ALL_REDUCE.match, compiled_text.splitlines())
          if m]


# --- Across devices -----------------------------------------------------------


def test_pmap_matches_per_device_reference():
  params = helpers.mlp_params()
  x, y = _data()
  tx = _sam(axis_name="d")
  step = _pmap_step(tx)
  rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), t)
  p, s = rep(params), rep(tx.init(params))
  batch = (x.reshape(N_DEV, -1, x.shape[1]), y.reshape(N_DEV, -1))
  ref = np_group_sam_sgd_trajectory(params, _groups(x, y, 8), rho=RHO, lr=LR,
                                    momentum=MOMENTUM, steps=6)
  for want in ref:
    p, s = step(p, s, batch)
    got = jax.tree.map(np.asarray, p)
    for d in range(N_DEV):
      helpers.assert_trees_close(jax.tree.map(lambda a: a[d], got), want)
  # m-sharpness really differs from global SAM (the test can fail).
  glob = helpers.np_sam_sgd_trajectory(params, x, y, rho=RHO, lr=LR,
                                       momentum=MOMENTUM, steps=6)
  diff = max(np.max(np.abs(a - b)) for a, b in
             zip(jax.tree.leaves(ref[-1]), jax.tree.leaves(glob[-1])))
  assert diff > 1e-4


def test_shard_map_matches_per_device_reference_and_is_replicated():
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()
  tx = _sam(axis_name="d")
  step = _shard_map_step(tx, mesh)
  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  p, s = params, tx.init(params)
  ref = np_group_sam_sgd_trajectory(params, _groups(x, y, 8), rho=RHO, lr=LR,
                                    momentum=MOMENTUM, steps=6)
  for want in ref:
    p, s = step(p, s, batch)
    helpers.assert_trees_close(p, want)
  # out_specs=P() with check_vma=True compiled: updates and state are
  # replicated. The statistics are finite and the loss is the global mean.
  info = sam_optax.get_info(s)
  for field in ("loss", "perturbed_loss", "sharpness", "grad_norm",
                "perturbed_grad_norm"):
    assert np.isfinite(getattr(info, field)), field
  np.testing.assert_allclose(info.perturbation_norm, RHO, rtol=1e-6)  # each ‖ε_k‖ = ρ
  prev = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ref[-2])
  np.testing.assert_allclose(info.loss, helpers.mlp_loss(prev, (x, y)), rtol=1e-5)


def test_shard_map_with_check_vma_off_needs_no_per_device():
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()
  tx = _sam(axis_name="d")
  f = helpers.shard_map_step(tx, mesh, per_device=False, value=False, check_vma=False)
  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  p, _ = f(params, tx.init(params), batch)
  want = np_group_sam_sgd_trajectory(params, _groups(x, y, 8), rho=RHO, lr=LR,
                                     momentum=MOMENTUM, steps=1)[0]
  helpers.assert_trees_close(p, want)


def test_per_device_gradients_are_each_devices_own():
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()

  def grads(params, batch, cast):
    w = sam_optax.per_device(params, "d") if cast else params
    g = jax.grad(helpers.mlp_loss)(w, batch)
    return jax.tree.map(lambda a: a[None], g)

  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  own = jax.jit(jax.shard_map(lambda p, b: grads(p, b, True), mesh=mesh,
                              in_specs=(P(), P("d")), out_specs=P("d")))(params, batch)
  auto = jax.jit(jax.shard_map(lambda p, b: grads(p, b, False), mesh=mesh,
                               in_specs=(P(), P("d")), out_specs=P("d")))(params, batch)
  one_by_one = [jax.grad(helpers.mlp_loss)(params, g) for g in _groups(x, y, 8)]
  for d, want in enumerate(one_by_one):
    helpers.assert_trees_close(jax.tree.map(lambda a: a[d], own), want)
    # The trap this guards against: without per_device, every device gets the
    # SUM of all devices' gradients.
    total = jax.tree.map(lambda *g: sum(g), *one_by_one)
    helpers.assert_trees_close(jax.tree.map(lambda a: a[d], auto), total, atol=1e-5)


def test_shard_map_summed_gradient_trap_raises():
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()
  tx = _sam(axis_name="d")
  step = _shard_map_step(tx, mesh, per_device=False)
  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  with pytest.raises(ValueError, match=r"axis_name='d'.*identical on every device"
                     r".*SUM of all devices' gradients.*sam_optax.per_device\(params, 'd'\)"):
    step(params, tx.init(params), batch)


def test_check_accepts_legitimately_invariant_leaves_and_pmap_unmapped_params():
  params = {"net": helpers.mlp_params(), "decay": jnp.ones(3)}
  x, y = _data()
  mesh = _mesh()
  tx = sam_optax.sharpness_aware(RHO, axis_name="d")

  def loss(p, batch):
    return helpers.mlp_loss(p["net"], batch) + 0.5 * jnp.sum(p["decay"] ** 2)

  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    # A hand-written weight-decay gradient is the same on every device.
    g_net = jax.grad(helpers.mlp_loss)(sam_optax.per_device(params["net"], "d"), batch)
    grads = {"net": g_net, "decay": params["decay"]}
    return tx.update(grads, state, params, loss_fn=loss_fn)

  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("d")),
                        out_specs=(P(), P())))(params, tx.init(params), batch)

  # pmap with unmapped params: gradients are per device already; no error.
  def pstep(params, state, batch):
    loss_fn = lambda p: helpers.mlp_loss(p, batch)
    return tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)[0]

  net = params["net"]
  u = jax.pmap(pstep, axis_name="d", in_axes=(None, None, 0))(
      net, tx.init(net), (x.reshape(N_DEV, -1, 4), y.reshape(N_DEV, -1)))
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(u))


def test_unbound_axis_is_a_clear_error():
  params = helpers.mlp_params()
  batch = _data(16)
  loss_fn = lambda p: helpers.mlp_loss(p, batch)
  tx = _sam(axis_name="batch")
  with pytest.raises(NameError, match=r"no axis named 'batch' is bound here.*"
                     r"`jax.shard_map` or `jax.pmap`.*axis_name=None"):
    jax.jit(lambda p: tx.update(jax.grad(loss_fn)(p), tx.init(p), p,
                                loss_fn=loss_fn))(params)
  with pytest.raises(NameError, match=r"`sam_optax.per_device\(params, 'd'\)`: no "
                     r"axis named 'd' is bound here.*drop the call"):
    sam_optax.per_device(params, "d")


def test_rule_state_updated_per_device_is_averaged_and_replicated():
  # A rule whose ascent keeps an EMA of the (per-device) gradient.
  def init(params):
    return {"ema": jax.tree.map(jnp.zeros_like, params), "n": jnp.zeros([], jnp.int32)}

  def ascent(g, state, params):
    del params
    ema = jax.tree.map(lambda e, x: 0.5 * e + 0.5 * x, state["ema"], g)
    return ema, {"ema": ema, "n": state["n"]}

  rule = sam_optax.PerturbationRule(init=init, ascent=ascent)
  tx = sam_optax.sharpness_aware_transform(rule, RHO, name="ema_rule", axis_name="d")
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()
  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  step = _shard_map_step(tx, mesh).lower(params, tx.init(params), batch).compile()
  _, state = step(params, tx.init(params), batch)
  mean_grad = jax.grad(helpers.mlp_loss)(params, (x, y))
  helpers.assert_trees_close(state.rule_state["ema"],
                             jax.tree.map(lambda g: 0.5 * g, mean_grad))
  assert len(_all_reduces(step.as_text())) == 1


def test_cosine_under_axis_is_mean_of_per_device_cosines():
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()
  tx = _sam(axis_name="d", track_cosine=True)
  _, state = _shard_map_step(tx, mesh)(
      params, tx.init(params), jax.device_put((x, y), NamedSharding(mesh, P("d"))))
  cosines = []
  w = helpers.np_tree(params)
  flat = lambda t: np.concatenate([a.ravel() for a in jax.tree.leaves(t)])
  for xs, ys in _groups(np.float64(x), np.asarray(y), 8):
    _, g = helpers.np_mlp_loss_and_grad(w, xs, ys)
    eps = jax.tree.map(lambda v: RHO * v / helpers.np_tree_norm(g), g)
    _, g_p = helpers.np_mlp_loss_and_grad(jax.tree.map(np.add, w, eps), xs, ys)
    g, g_p = flat(g), flat(g_p)
    cosines.append(g @ g_p / np.linalg.norm(g) / np.linalg.norm(g_p))
  np.testing.assert_allclose(sam_optax.get_info(state).cosine, np.mean(cosines), atol=1e-6)


# --- One all-reduce per step ---------------------------------------------------


def _param_shapes(params):
  return [f"f32[{','.join(map(str, a.shape))}]" for a in jax.tree.leaves(params)]


@pytest.mark.parametrize("kind", ["shard_map", "pmap", "shard_map_m"])
def test_exactly_one_all_reduce_per_step(kind):
  params = helpers.mlp_params()
  x, y = _data()
  if kind == "pmap":
    tx = _sam(axis_name="d")
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), t)
    args = (rep(params), rep(tx.init(params)),
            (x.reshape(N_DEV, -1, 4), y.reshape(N_DEV, -1)))
    text = jax.jit(_pmap_step(tx)).lower(*args).compile().as_text()
  else:
    mesh = _mesh()
    batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
    if kind == "shard_map":
      tx = _sam(axis_name="d")
      step = _shard_map_step(tx, mesh)
    else:
      tx = _sam(axis_name="d", m=2)
      step = _shard_map_m_step(tx, mesh, m=2)
    text = step.lower(params, tx.init(params), batch).compile().as_text()
  ops = _all_reduces(text)
  assert len(ops) == 1, ops
  # That one op carries the whole gradient (every params leaf) and the scalars.
  shapes = re.findall(r"f32\[[\d,]*\]", ops[0])
  for s in _param_shapes(params):
    assert s in shapes, (s, ops[0])


# --- Inside one device (m=) ----------------------------------------------------


def _m_step(tx, m, *, supply_group_grads=True, has_aux=False, group_loop="vmap"):
  loss = helpers.mlp_loss
  if has_aux:
    loss = lambda p, c: (helpers.mlp_loss(p, c), {"n": c[0].shape[0]})

  @jax.jit
  def step(params, state, batch):
    if supply_group_grads:
      value, grads, group_grads = sam_optax.group_value_and_grad(
          loss, m, has_aux=has_aux, group_loop=group_loop)(params, batch)
      updates, state = tx.update(grads, state, params, loss_fn=loss,
                                 batch=batch, group_grads=group_grads)
    else:
      grads = jax.grad(loss, has_aux=has_aux)(params, batch)
      if has_aux:
        grads = grads[0]
      updates, state = tx.update(grads, state, params, loss_fn=loss, batch=batch)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("group_loop", ["vmap", "scan", "unroll"])
@pytest.mark.parametrize("supply_group_grads", [True, False])
@pytest.mark.parametrize("has_aux", [False, True])
def test_in_device_m_matches_group_reference(supply_group_grads, has_aux, group_loop):
  params = helpers.mlp_params()
  x, y = _data(16)
  tx = _sam(m=4, has_aux=has_aux, group_loop=group_loop)
  step = _m_step(tx, 4, supply_group_grads=supply_group_grads, has_aux=has_aux,
                 group_loop=group_loop)
  p, s = params, tx.init(params)
  ref = np_group_sam_sgd_trajectory(params, _groups(x, y, 4), rho=RHO, lr=LR,
                                    momentum=MOMENTUM, steps=5)
  for want in ref:
    p, s = step(p, s, (x, y))
    helpers.assert_trees_close(p, want)


def test_m_equal_to_batch_is_plain_sam():
  params = helpers.mlp_params()
  x, y = _data(16)
  tx = _sam(m=16)
  step = _m_step(tx, 16)
  p, s = params, tx.init(params)
  ref = helpers.np_sam_sgd_trajectory(params, x, y, rho=RHO, lr=LR,
                                      momentum=MOMENTUM, steps=5)
  plain = _sam()
  loss_fn = lambda w: helpers.mlp_loss(w, (x, y))
  _, t, plain_step = helpers.train_steps(plain, params, loss_fn, 0, value=False)
  q = params

  for want in ref:
    p, s = step(p, s, (x, y))
    q, t = plain_step(q, t)
    helpers.assert_trees_close(p, want)
    helpers.assert_trees_close(p, q)


@pytest.mark.parametrize("group_loop", ["vmap", "scan", "unroll"])
def test_group_value_and_grad_equals_full_batch_value_and_grad(group_loop):
  params = helpers.mlp_params()
  x, y = _data(16)
  value, grads, group_grads = jax.jit(sam_optax.group_value_and_grad(
      helpers.mlp_loss, 4, group_loop=group_loop))(params, (x, y))
  v, g = helpers.np_mlp_loss_and_grad(helpers.np_tree(params), np.float64(x), y)
  np.testing.assert_allclose(value, v, atol=1e-6)
  helpers.assert_trees_close(grads, g)
  for k, (xs, ys) in enumerate(_groups(x, y, 4)):
    _, g_k = helpers.np_mlp_loss_and_grad(helpers.np_tree(params), np.float64(xs), ys)
    helpers.assert_trees_close(jax.tree.map(lambda a: a[k], group_grads), g_k)


def _shard_map_m_step(tx, mesh, m, axis="d", group_loop="vmap"):

  def step(params, state, batch):
    w = sam_optax.per_device(params, axis)
    _, grads, group_grads = sam_optax.group_value_and_grad(
        helpers.mlp_loss, m, group_loop=group_loop)(w, batch)
    updates, state = tx.update(grads, state, params, loss_fn=helpers.mlp_loss,
                               batch=batch, group_grads=group_grads)
    return optax.apply_updates(params, updates), state

  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(axis)),
                               out_specs=(P(), P())))


@pytest.mark.parametrize("group_loop", ["vmap", "scan", "unroll"])
def test_four_devices_times_in_device_m(group_loop):
  params = helpers.mlp_params()
  x, y = _data(32)
  mesh = _mesh(4)
  tx = _sam(axis_name="d", m=2, group_loop=group_loop)
  step = _shard_map_m_step(tx, mesh, m=2, group_loop=group_loop)
  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  p, s = params, tx.init(params)
  ref = np_group_sam_sgd_trajectory(params, _groups(x, y, 2), rho=RHO, lr=LR,
                                    momentum=MOMENTUM, steps=5)
  for want in ref:
    p, s = step(p, s, batch)
    helpers.assert_trees_close(p, want)


def test_four_devices_times_in_device_m_without_group_grads():
  # The transform computes the per-group gradients itself, per device.
  params = helpers.mlp_params()
  x, y = _data(32)
  mesh = _mesh(4)
  tx = _sam(axis_name="d", m=2)
  f = helpers.shard_map_step(tx, mesh, value=False, batch_arg=True)
  p, _ = f(params, tx.init(params), jax.device_put((x, y), NamedSharding(mesh, P("d"))))
  want = np_group_sam_sgd_trajectory(params, _groups(x, y, 2), rho=RHO, lr=LR,
                                     momentum=MOMENTUM, steps=1)[0]
  helpers.assert_trees_close(p, want)


# --- The m = global batch case: plain jit over a sharded batch -----------------


def test_global_sam_under_jit_with_sharded_batch():
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()
  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  tx = _sam()

  @jax.jit
  def step(params, state, batch):
    loss_fn = lambda p: helpers.mlp_loss(p, batch)
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params,
                               loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  p, s = params, tx.init(params)
  ref = helpers.np_sam_sgd_trajectory(helpers.mlp_params(), x, y, rho=RHO,
                                      lr=LR, momentum=MOMENTUM, steps=5)
  for want in ref:
    p, s = step(p, s, batch)
    helpers.assert_trees_close(p, want)
  # XLA partitioned the step over the 8 devices (it all-reduces the gradient).
  assert _all_reduces(step.lower(p, s, batch).compile().as_text())


# --- Errors ----------------------------------------------------------------------


def _update_m(tx, loss_fn=helpers.mlp_loss, **kw):
  params = helpers.mlp_params()
  grads = jax.tree.map(jnp.zeros_like, params)
  return tx.update(grads, tx.init(params), params, loss_fn=loss_fn, **kw)


def _compiled_text(step, *args):
  return step.lower(*args).compile().as_text()


def test_group_loops_compile_to_what_they_say():
  # 'vmap' and 'unroll' are straight-line code; 'scan' keeps one loop whose
  # body holds one group's perturbed params, not b/m of them.
  params = helpers.mlp_params()
  batch = _data(16)
  texts = {}
  for loop in ("vmap", "scan", "unroll"):
    tx = _sam(m=4, group_loop=loop)
    texts[loop] = _compiled_text(_m_step(tx, 4, group_loop=loop), params,
                                 tx.init(params), batch)
  assert " while(" not in texts["vmap"] and " while(" not in texts["unroll"]
  assert " while(" in texts["scan"]


def test_scan_loop_holds_one_perturbed_copy_at_a_time():
  # The second pass's memory: b/m perturbed copies (and their gradients)
  # under 'vmap', one under 'scan'. Compiled temp memory, per-group
  # gradients supplied (b/m of them are inputs either way).
  params = helpers.mlp_params(sizes=(4, 512, 3))
  batch = _data(32)
  temp = {}
  for loop in ("vmap", "scan"):
    tx = sam_optax.sharpness_aware(rho=RHO, m=2, group_loop=loop)
    gvg = sam_optax.group_value_and_grad(helpers.mlp_loss, 2)
    _, grads, gg = gvg(params, batch)

    def update(params, state, batch, gg, grads=grads, tx=tx):
      return tx.update(grads, state, params, loss_fn=helpers.mlp_loss,
                       batch=batch, group_grads=gg)

    mem = jax.jit(update).lower(params, tx.init(params), batch, gg).compile()
    temp[loop] = mem.memory_analysis().temp_size_in_bytes
  copy = 4 * sum(a.size for a in jax.tree.leaves(params))
  # 16 groups: vmap holds >= 16 perturbed copies; scan a few params-sized buffers.
  assert temp["vmap"] >= 16 * copy, (temp, copy)
  assert temp["scan"] <= 4 * copy, (temp, copy)


def test_scan_loop_keeps_bf16_dtypes():
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), helpers.mlp_params())
  x, y = _data(16)
  batch = (x.astype(jnp.bfloat16), y)
  outs = {}
  for loop in ("vmap", "scan"):
    tx = _sam(m=4, group_loop=loop)
    p, s = _m_step(tx, 4, group_loop=loop)(params, tx.init(params), batch)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(p))
    outs[loop] = p
  # Accumulation order differs; bf16 rounding allows one ulp-ish difference.
  for a, b in zip(jax.tree.leaves(outs["vmap"]), jax.tree.leaves(outs["scan"])):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("factory", [m.name for m in METHODS if m.takes_m]
                         + ["group_value_and_grad"])
def test_unknown_group_loop_is_a_clear_error(factory):
  with pytest.raises(ValueError, match=r"group_loop='pmap'\)`: unknown way to run "
                     r"over the groups.*'vmap'.*'scan'.*'unroll'"):
    if factory == "group_value_and_grad":
      sam_optax.group_value_and_grad(helpers.mlp_loss, 4, group_loop="pmap")
    else:
      getattr(sam_optax, factory)(optax.sgd(0.1), m=4, group_loop="pmap")


def test_group_loop_without_m_is_a_clear_error():
  with pytest.raises(ValueError, match=r"`sam_optax.sam\(group_loop='scan'\)`: group_loop "
                     r"says how the groups of m examples run.*`m` is not set"):
    _sam(group_loop="scan")
  _sam(group_loop="vmap")  # the default, accepted without m


def test_m_must_divide_batch():
  with pytest.raises(ValueError, match=r"`sam_optax.sam\(m=3\)`: m \(examples per "
                     r"perturbation\) must divide the \(per-device\) batch size, "
                     r"but the batch has 16 examples.*1, 2, 4, 8, 16"):
    _update_m(_sam(m=3), batch=_data(16))


def test_m_needs_batch():
  with pytest.raises(TypeError, match=r"`sam_optax.sam\(m=4\)`: `update` needs "
                     r"`batch=`.*received none"):
    _update_m(_sam(m=4))


def test_m_with_one_argument_loss_fn():
  batch = _data(16)
  with pytest.raises(TypeError, match=r"with `m`, `loss_fn` is called as "
                     r"`loss_fn\(params, chunk\)`.*signature \(p\)"):
    _update_m(_sam(m=4), loss_fn=lambda p: helpers.mlp_loss(p, batch), batch=batch)
  with pytest.raises(TypeError, match=r"group_value_and_grad.*loss_fn\(params, chunk\)"):
    sam_optax.group_value_and_grad(lambda p: 0.0, 4)


def test_two_argument_loss_fn_without_m():
  with pytest.raises(TypeError, match=r"`sam_optax.sam`: `loss_fn` is called as "
                     r"`loss_fn\(params\)`.*signature \(params, batch\).*`m=`"):
    _update_m(_sam())


def test_group_grads_without_m_or_with_wrong_shape():
  params = helpers.mlp_params()
  batch = _data(16)
  _, _, gg = sam_optax.group_value_and_grad(helpers.mlp_loss, 4)(params, batch)
  with pytest.raises(ValueError, match=r"group_grads=.*created without `m`"):
    _update_m(_sam(), loss_fn=lambda p: helpers.mlp_loss(p, batch), group_grads=gg)
  with pytest.raises(ValueError, match=r"leading axis of 8 groups \(batch of 16 "
                     r"examples / m=2\).*\[.layer0.\]\[.b.\] has shape \(4, 8\), expected \(8, 8\)"):
    _update_m(_sam(m=2), batch=batch, group_grads=gg)


def test_two_mesh_axes_as_one_tuple_axis_name():
  params = helpers.mlp_params()
  x, y = _data()
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  axes = ("a", "b")
  tx = _sam(axis_name=axes)
  f = helpers.shard_map_step(tx, mesh, axes, value=False)
  p, _ = f(params, tx.init(params), jax.device_put((x, y), NamedSharding(mesh, P(axes))))
  want = np_group_sam_sgd_trajectory(params, _groups(x, y, 8), rho=RHO, lr=LR,
                                     momentum=MOMENTUM, steps=1)[0]
  helpers.assert_trees_close(p, want)


# The all-reduce ops in the compiled step of each method that takes
# `axis_name` (rules with a skipped second pass hold one in each `lax.cond`
# branch; one of them runs per step).
ALL_REDUCES = {"sam": 1, "asam": 1, "fisher_sam": 1, "gsam": 1, "gnp": 1, "vasso": 1,
               "friendly_sam": 1, "looksam": 2, "interval_sam": 2}

AXIS_METHODS = [m for m in METHODS if m.takes_axis_name]
_FAST = ("looksam", "vasso")  # a skipped pass; state updated in ascent


def test_all_reduce_table_covers_every_method_with_axis_name():
  assert set(ALL_REDUCES) == {m.name for m in AXIS_METHODS}


@pytest.mark.parametrize("method", [
    m if m.name in _FAST else pytest.param(m, marks=pytest.mark.slow)
    for m in AXIS_METHODS], ids=lambda m: m.name)
def test_variants_under_shard_map_stay_replicated(method):
  params = helpers.mlp_params()
  x, y = _data()
  mesh = _mesh()
  tx = method.wrapper(optax.sgd(LR, momentum=MOMENTUM), axis_name="d")
  batch = jax.device_put((x, y), NamedSharding(mesh, P("d")))
  p, s = params, tx.init(params)
  # out_specs=P(): the outputs must be replicated, or this does not compile.
  step = _shard_map_step(tx, mesh).lower(p, s, batch).compile()
  for _ in range(2):
    p, s = step(p, s, batch)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(p))
  ops = _all_reduces(step.as_text())
  assert len(ops) == ALL_REDUCES[method.name], ops


def _flops(step, *args):
  cost = step.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_in_device_m_step_is_two_passes_not_three():
  # XLA's FLOP count of the compiled step (machine-independent, no timing).
  params = helpers.mlp_params(sizes=(32, 64, 10))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 32)), jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).integers(0, 10, size=(256,)))
  sgd = optax.sgd(LR, momentum=MOMENTUM)

  @jax.jit
  def sgd_step(params, state, batch):
    updates, state = sgd.update(jax.grad(helpers.mlp_loss)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  base = _flops(sgd_step, params, sgd.init(params), (x, y))
  tx = _sam(m=64)
  two = _flops(_m_step(tx, 64), params, tx.init(params), (x, y))
  three = _flops(_m_step(tx, 64, supply_group_grads=False), params, tx.init(params), (x, y))
  assert two <= 2.10 * base, (two / base)
  assert three >= 2.7 * base, (three / base)
