"""Pod scale: sharded params (FSDP, tensor parallel) on a 2-D mesh, 'data' 4 × 'model' 2.

Under plain ``jax.jit`` (GSPMD) a SAM step with sharded params is partitioned
like any other step, and it is right: one ε for the global batch, checked
against a float64 numpy reference for SAM, ASAM and GSAM in every layout; the
optimizer state keeps the params' sharding; the compiled step moves the
collective bytes of a hand-written SAM step on the same mesh and layout, and
its temp memory (donated buffers) is the hand-written step's.

Inside ``jax.shard_map`` every device holds only its shards of the params, so
the norms and dot products that decide ε must sum each leaf over the mesh
axes it is sharded on. The tests of that behaviour (per-replica ε with
tensor-parallel params, under ``check_vma=True`` and with ``param_specs=``
under ``check_vma=False``; axis tuples mixing a data axis with a params axis;
global SAM with FSDP inside ``shard_map``) define the target and are marked
``xfail(strict=True)`` until the library does it. The recipes that are right
today (one ε per host; per-replica ε with FSDP params gathered first) pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from benchmarks import pod
from tests import helpers

LR, MOMENTUM, STEPS = 0.1, 0.9, 3
SIZES, N, CLASSES = (8, 16, 4), 32, 4
DATA, MODEL = 4, 2
ETA, ALPHA = 0.01, 0.3

XFAIL = pytest.mark.xfail(strict=True, reason="issue 14: sharding-aware norms")

# The method, its wrapper's arguments (besides the base optimizer).
METHODS = {
    "sam": (sam_optax.sam, dict(rho=0.05)),
    "asam": (sam_optax.asam, dict(rho=0.5, eta=ETA)),
    "gsam": (sam_optax.gsam, dict(rho=0.05, alpha=ALPHA)),
}


def _spec_tree(w0, b0, w1, b1):
  return {"layer0": {"w": w0, "b": b0}, "layer1": {"w": w1, "b": b1}}


# layout -> (params' PartitionSpecs, batch's PartitionSpec), on the 'data' × 'model' mesh.
# No trailing `None` in a spec: jit hands back P('data') for P('data', None), and
# an input sharding that differs from the output's compiles the step twice.
ALL = ("data", "model")
LAYOUTS = {
    # Params replicated, batch over all 8 devices.
    "dp": (_spec_tree(P(), P(), P(), P()), P(ALL)),
    # FSDP: every kernel's rows over all 8 devices, batch over all 8.
    "fsdp": (_spec_tree(P(ALL), P(), P(ALL), P()), P(ALL)),
    # Tensor parallel (column- then row-parallel kernels) within 'model', batch over 'data'.
    "tp": (_spec_tree(P(None, "model"), P("model"), P("model"), P()), P("data")),
    # FSDP over 'data' and tensor parallel over 'model' at once.
    "fsdp_tp": (_spec_tree(P("data", "model"), P("model"), P("model", "data"), P()),
                P("data")),
    # Hybrid: kernels sharded within 'model', replicated across 'data'; batch over all 8.
    "hybrid": (_spec_tree(P("model"), P(), P("model"), P()), P(ALL)),
}
TP_SPECS = LAYOUTS["tp"][0]
FSDP_SPECS = _spec_tree(P("data"), P(), P("data"), P())  # inside shard_map


def _mesh():
  return jax.make_mesh((DATA, MODEL), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _problem(sizes=SIZES, n=N):
  params = helpers.mlp_params(sizes=sizes)
  x, y = helpers.mlp_batch(n=n, d=sizes[0], classes=sizes[-1])
  return params, (x, y)


def _named(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def _placed(mesh, layout, sizes=SIZES, n=N):
  """Params, their shardings and the batch, placed on ``mesh`` as ``layout`` says."""
  specs, batch_spec = LAYOUTS[layout]
  params, batch = _problem(sizes, n)
  shardings = _named(mesh, specs)
  return (jax.device_put(params, shardings), shardings,
          jax.device_put(batch, NamedSharding(mesh, batch_spec)))


def _tx(method, **kw):
  wrapper, kwargs = METHODS[method]
  return wrapper(optax.sgd(LR, momentum=MOMENTUM), **kwargs, **kw)


def _state_shardings(tx, params, shardings, mesh):
  """The state's shardings: the params' on params-shaped leaves, replicated elsewhere."""
  return optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()))


def _state_specs(tx, params, specs):
  """The state's PartitionSpecs for shard_map (as :func:`_state_shardings`)."""
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                               specs, transform_non_params=lambda _: P())


def _train_step(tx, loss):
  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
    return optax.apply_updates(params, updates), state
  return step


# --- float64 numpy reference -----------------------------------------------------


def _t(f, *trees):
  return jax.tree.map(f, *trees)


def _dot(a, b):
  return sum(float(np.sum(u * v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def np_eps(method, w, g, rho):
  """ε of one perturbation from its own (full, unsharded) gradient ``g``."""
  if method == "asam":  # T_w = |w| + η on kernels, 1 on biases ('official')
    t = _t(lambda v: np.abs(v) + ETA if v.ndim > 1 else np.ones_like(v), w)
    norm = np.sqrt(_dot(_t(np.multiply, t, g), _t(np.multiply, t, g)))
    return _t(lambda tv, gv: rho * tv * tv * gv / norm, t, g)
  norm = np.sqrt(_dot(g, g))
  return _t(lambda v: rho * v / norm, g)


def np_direction(method, w, groups, rho):
  """The step's direction: each group (data replica) its own ε from its own
  full gradient; ∇L(w + ε) and g averaged over the groups; GSAM's projection
  on the averages."""
  gs, gps, eps_norms = [], [], []
  for x, y in groups:
    _, g = helpers.np_mlp_loss_and_grad(w, x, y)
    eps = np_eps(method, w, g, rho)
    _, gp = helpers.np_mlp_loss_and_grad(_t(np.add, w, eps), x, y)
    gs.append(g)
    gps.append(gp)
    eps_norms.append(np.sqrt(_dot(eps, eps)))
  g = _t(lambda *v: sum(v) / len(v), *gs)
  gp = _t(lambda *v: sum(v) / len(v), *gps)
  if method == "gsam":
    coef = _dot(g, gp) / _dot(gp, gp)
    gp = _t(lambda a, b: b - ALPHA * (a - coef * b), g, gp)
  return gp, float(np.mean(eps_norms))


def np_trajectory(method, params, batch, *, groups=1, steps=STEPS):
  """SGD (heavy ball, as optax.sgd) on the method's direction, float64.

  ``groups``: the batch split in that many contiguous groups (data replicas),
  one ε each; 1 is global SAM. Returns the params after each step and the
  mean ‖ε‖ of the last step.
  """
  rho = METHODS[method][1]["rho"]
  w = helpers.np_tree(params)
  x, y = np.asarray(batch[0], np.float64), np.asarray(batch[1])
  size = x.shape[0] // groups
  chunks = [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]
  trace = _t(np.zeros_like, w)
  out, eps_norm = [], None
  for _ in range(steps):
    d, eps_norm = np_direction(method, w, chunks, rho)
    trace = _t(lambda tr, v: v + MOMENTUM * tr, trace, d)
    w = _t(lambda p, tr: p - LR * tr, w, trace)
    out.append(w)
  return out, eps_norm


def test_reference_differs_per_replica_and_per_method():
  """The references can tell global from per-replica ε, and the methods apart."""
  params, batch = _problem()
  one = {m: np_trajectory(m, params, batch)[0][-1] for m in METHODS}
  per_replica = np_trajectory("sam", params, batch, groups=DATA)[0][-1]
  gap = lambda a, b: max(float(np.max(np.abs(u - v)))
                         for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert gap(one["sam"], per_replica) > 1e-4
  assert gap(one["sam"], one["asam"]) > 1e-4 and gap(one["sam"], one["gsam"]) > 1e-4


# --- (a) jit / GSPMD: right today --------------------------------------------------


def _assert_sharded_like_params(tx, params, state, shardings):
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
  checked = []

  def like_params(leaf, sharding):
    checked.append(leaf)
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)

  def replicated(leaf):
    if isinstance(leaf, jax.Array):
      assert leaf.sharding.is_fully_replicated, leaf.sharding

  optax.tree_map_params(tx, like_params, state, shardings,
                        transform_non_params=replicated)
  assert len(checked) == len(jax.tree.leaves(params))  # the momentum trace


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_jit_sharded_params_match_global_reference(layout, method):
  mesh = _mesh()
  params, shardings, batch = _placed(mesh, layout)
  tx = _tx(method)
  state = jax.jit(tx.init, out_shardings=_state_shardings(tx, params, shardings, mesh))(params)
  _assert_sharded_like_params(tx, params, state, shardings)
  step = jax.jit(_train_step(tx, helpers.mlp_loss))
  want, _ = np_trajectory(method, *_problem())
  p, s = params, state
  for w in want:
    p, s = step(p, s, batch)
    helpers.assert_trees_close(p, w, atol=1e-6)
  _assert_sharded_like_params(tx, p, s, shardings)
  assert step._cache_size() == 1


# --- (b) collectives and (c) memory against a hand-written SAM step ---------------


def _compiled_steps(layout, sizes=SIZES, n=N):
  """``{name: compiled step}`` for SGD, the hand-written SAM step and
  ``sam_optax.sam`` on one layout; jitted with params and state donated."""
  mesh = _mesh()
  params, shardings, batch = _placed(mesh, layout, sizes, n)
  return pod.compile_steps(params, shardings, batch, mesh, helpers.mlp_loss,
                           ("sgd", "hand_sam", "sam"))


def _is_scalar(shape):
  return shape.endswith("[]")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_collectives_are_the_hand_written_sams(layout):
  """The collectives carry the arrays of a hand-written SAM step on the same
  mesh and layout, with the same kinds of ops; beyond them only scalars (the
  step's statistics: ≤ 5 per params leaf, in ≤ 4 more ops; XLA combines them
  into ops as it likes). Twice SGD's bytes: the gradient is reduced twice."""
  ops = {name: pod.collective_ops(c.as_text())
         for name, c in _compiled_steps(layout).items()}
  arrays = {name: sorted(a for op in o for a in op.operand_shapes if not _is_scalar(a))
            for name, o in ops.items()}
  assert arrays["sam"] == arrays["hand_sam"], arrays
  kinds = {name: sorted({op.kind for op in o}) for name, o in ops.items()}
  assert kinds["sam"] == kinds["hand_sam"], kinds
  scalars = {name: sum(map(_is_scalar, (a for op in o for a in op.operand_shapes)))
             for name, o in ops.items()}
  n_leaves = len(jax.tree.leaves(LAYOUTS[layout][0]))
  assert scalars["sam"] - scalars["hand_sam"] <= 5 * n_leaves, scalars
  assert len(ops["sam"]) <= len(ops["hand_sam"]) + 4, (ops["sam"], ops["hand_sam"])
  total = {name: sum(op.operand_bytes for op in o) for name, o in ops.items()}
  assert 1.9 <= total["sam"] / total["sgd"] <= 2.15, total


@pytest.mark.parametrize("layout", ["dp", "fsdp", "tp", "hybrid"])
def test_temp_memory_is_the_hand_written_sams(layout):
  """``memory_analysis()`` of the jitted step, params and state donated:
  temp bytes ≤ the hand-written SAM step's + 1 % (a model whose step needs
  megabytes of temp memory)."""
  compiled = _compiled_steps(layout, sizes=(256, 1024, 64), n=64)
  temp = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
  assert temp["sam"] <= 1.01 * temp["hand_sam"], temp
  assert temp["hand_sam"] >= 1 << 20, temp  # big enough for 1 % to mean something


def test_collective_parser_reads_ops_shapes_and_bytes():
  text = "\n".join([
      "ENTRY %main {",
      "  %p = f32[4,8]{1,0} parameter(0)",
      "  %s = bf16[] parameter(1)",
      "  %ag = f32[16,8]{1,0} all-gather(%p), channel_id=1, dimensions={0}",
      "  %ar = (f32[4,8]{1,0}, /*index=1*/bf16[]) all-reduce(%p, /*index=1*/%s), to_apply=%add",
      "  %rs-start = ((f32[4,8]{1,0}), f32[1,8]{1,0}) reduce-scatter-start(%p), channel_id=3",
      "  %rs-done = f32[1,8]{1,0} reduce-scatter-done(%rs-start)",
      "  ROOT %cp = f32[4,8]{1,0} collective-permute(%p), source_target_pairs={{0,1}}",
      "}"])
  ops = pod.collective_ops(text)
  assert [op.kind for op in ops] == ["all-gather", "all-reduce", "reduce-scatter",
                                     "collective-permute"]
  assert [op.operand_bytes for op in ops] == [128, 130, 128, 128]
  assert ops[1].operand_shapes == ("f32[4,8]", "bf16[]")
  with pytest.raises(ValueError, match="cannot read the operands of this all-reduce op"):
    pod.collective_ops("  %ar = f32[2]{0} all-reduce(%undefined), to_apply=%add")


# --- (d) inside shard_map: sharding-aware norms (the target) ----------------------


@jax.custom_vjp
def _model_sum(x):
  """All-reduce over 'model' forward, identity backward (Megatron's `g`):
  the gradient of a row-parallel layer under ``check_vma=False``, where
  ``psum``'s transpose would sum the (already replicated) cotangent again."""
  return jax.lax.psum(x, "model")


_model_sum.defvjp(lambda x: (_model_sum(x), None), lambda _, ct: (ct,))


def _tp_loss(check_vma):
  """The MLP with a column-parallel first and a row-parallel second kernel:
  each device holds its 'model' block of the hidden units."""
  reduce = functools.partial(jax.lax.psum, axis_name="model") if check_vma else _model_sum

  def loss(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["layer0"]["w"] + p["layer0"]["b"])
    out = reduce(h @ p["layer1"]["w"]) + p["layer1"]["b"]
    target = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
    return jnp.mean(jnp.sum((out - target) ** 2, axis=-1))

  return loss


def _copies(leaf):
  """Every device's copy of a leaf, stacked (to see replicas drift apart)."""
  return leaf[None]


def _tp_per_replica_step(tx, mesh, specs, check_vma):
  """Per-replica ε under shard_map, TP params: the gradient is each data
  replica's own; also returns every device's copy of the replicated bias."""
  loss = _tp_loss(check_vma)

  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(sam_optax.per_device(params, "data"))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
    params = optax.apply_updates(params, updates)
    return params, state, _copies(params["layer1"]["b"])

  params, _ = _problem()
  state_specs = _state_specs(tx, params, specs)
  return jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(specs, state_specs, P("data")),
      out_specs=(specs, state_specs, P(ALL)), check_vma=check_vma))


def _check_tp_per_replica(method, tx, check_vma):
  mesh = _mesh()
  params, batch = _problem()
  step = _tp_per_replica_step(tx, mesh, TP_SPECS, check_vma)
  want, eps_norm = np_trajectory(method, params, batch, groups=DATA)
  p, s = params, tx.init(params)
  for w in want:
    p, s, bias_copies = step(p, s, batch)
    helpers.assert_trees_close(p, w, atol=1e-6)
    # The replicated leaf is the same on every device.
    np.testing.assert_array_equal(bias_copies, np.broadcast_to(bias_copies[0],
                                                               bias_copies.shape))
  if method == "sam":
    np.testing.assert_allclose(sam_optax.get_info(s).perturbation_norm, eps_norm,
                               rtol=1e-5)
    np.testing.assert_allclose(eps_norm, METHODS[method][1]["rho"], rtol=1e-9)


@XFAIL
@pytest.mark.parametrize("method", list(METHODS))
def test_shard_map_tp_per_replica_eps_check_vma(method):
  """axis_name='data', TP params: on each data replica ε = ρ g_r/‖g_r‖ with
  ‖g_r‖ over ALL of the replica's gradient (every 'model' shard), the sharded
  axes read from the params' types; replicated leaves get the same ε on every
  'model' shard; info.perturbation_norm is ρ."""
  _check_tp_per_replica(method, _tx(method, axis_name="data"), check_vma=True)


@XFAIL
def test_shard_map_tp_per_replica_eps_param_specs_without_check_vma():
  """The same with ``check_vma=False``, where variance is not tracked:
  ``param_specs=`` (PartitionSpecs like the params) declares the sharding."""
  _check_tp_per_replica("sam", _tx("sam", axis_name="data", param_specs=TP_SPECS),
                        check_vma=False)


def test_shard_map_tp_grads_are_each_replicas_blocks():
  """What the tests above feed the transform is right: under shard_map each
  device's gradient is its block of its data replica's full gradient (with
  ``check_vma=True``, and with ``check_vma=False`` and `_model_sum`)."""
  mesh = _mesh()
  params, (x, y) = _problem()
  for check_vma in (True, False):
    loss = _tp_loss(check_vma)

    def grads(params, batch, loss=loss, check_vma=check_vma):
      w = sam_optax.per_device(params, "data") if check_vma else params
      return jax.tree.map(lambda a: a[None], jax.grad(loss)(w, batch))

    f = jax.jit(jax.shard_map(
        grads, mesh=mesh, in_specs=(TP_SPECS, P("data")),
        out_specs=jax.tree.map(lambda s: P("data", *s), TP_SPECS), check_vma=check_vma))
    got = f(params, (x, y))
    size = N // DATA
    for r in range(DATA):
      _, want = helpers.np_mlp_loss_and_grad(
          helpers.np_tree(params), np.asarray(x[r * size:(r + 1) * size], np.float64),
          np.asarray(y[r * size:(r + 1) * size]))
      helpers.assert_trees_close(jax.tree.map(lambda a, r=r: a[r], got), want, atol=1e-6)


@XFAIL
def test_shard_map_axis_tuple_with_a_params_axis_raises():
  """axis_name=('data', 'model') with params sharded over 'model' would
  average different column blocks as if they were replicas: a ValueError
  that names the axis."""
  mesh = _mesh()
  params, batch = _problem()
  tx = _tx("sam", axis_name=ALL)
  loss = _tp_loss(True)

  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    grads = jax.grad(loss_fn)(sam_optax.per_device(params, ALL))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  state_specs = _state_specs(tx, params, TP_SPECS)
  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(TP_SPECS, state_specs, P("data")),
                            out_specs=(TP_SPECS, state_specs)))
  with pytest.raises(ValueError, match=r"'model'"):
    f(params, tx.init(params), batch)


def _gather(tree, specs):
  """The full params from their FSDP shards (rows over 'data')."""
  return jax.tree.map(
      lambda a, s: jax.lax.all_gather(a, "data", axis=0, tiled=True) if s == P("data")
      else a, tree, specs)


@XFAIL
def test_shard_map_fsdp_global_sam():
  """FSDP inside shard_map (kernel rows over 'data'), global SAM: one ε for
  the whole batch, its norm over every shard of the gradient."""
  mesh = _mesh()
  params, batch = _problem()
  tx = _tx("sam")

  def step(params, state, batch):
    # The global mean loss; its gradient is each device's shard of the global gradient.
    loss_fn = lambda p: jax.lax.pmean(helpers.mlp_loss(_gather(p, FSDP_SPECS), batch), "data")
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
    return optax.apply_updates(params, updates), state

  state_specs = _state_specs(tx, params, FSDP_SPECS)
  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(FSDP_SPECS, state_specs, P("data")),
                            out_specs=(FSDP_SPECS, state_specs)))
  want, eps_norm = np_trajectory("sam", params, batch)
  p, s = params, tx.init(params)
  for w in want:
    p, s = f(p, s, batch)
    helpers.assert_trees_close(p, w, atol=1e-6)
  np.testing.assert_allclose(sam_optax.get_info(s).perturbation_norm, eps_norm, rtol=1e-5)


def test_shard_map_fsdp_per_replica_recipe_gathers_first():
  """Per-replica ε with FSDP params, right today: gather the params, run the
  SAM block on them (each replica its own ε; one all-reduce of ∇L(w+ε)),
  then hand the base optimizer this device's rows of the direction, its
  state sharded like the params.

  Per-replica ε needs each replica's whole gradient, which the shards do not
  hold (the gradient of a shard gathered inside the loss is already summed
  over 'data'), so the params are gathered first. `all_gather`'s output is
  typed as varying over 'data' like a sharded param: sharding-aware norms
  must not sum over the axes of `axis_name`, nor refuse params that vary
  over them, or this recipe breaks."""
  mesh = _mesh()
  params, batch = _problem()
  block = sam_optax.sharpness_aware(rho=METHODS["sam"][1]["rho"], axis_name="data")
  base = optax.sgd(LR, momentum=MOMENTUM)

  def rows(full, shard):  # this device's rows of a full leaf
    i = jax.lax.axis_index("data") * shard.shape[0]
    return jax.lax.dynamic_slice_in_dim(full, i, shard.shape[0], axis=0)

  def step(params, state, batch):
    sam_state, base_state = state
    full = _gather(params, FSDP_SPECS)
    loss_fn = lambda p: helpers.mlp_loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(sam_optax.per_device(full, "data"))
    direction, sam_state = block.update(grads, sam_state, full, loss_fn=loss_fn, value=value)
    direction = jax.tree.map(
        lambda d, p, s: rows(d, p) if s == P("data") else d,
        direction, params, FSDP_SPECS)
    updates, base_state = base.update(direction, base_state, params)
    return optax.apply_updates(params, updates), (sam_state, base_state)

  base_specs = _state_specs(base, params, FSDP_SPECS)
  state_specs = (jax.tree.map(lambda _: P(), block.init(params)), base_specs)
  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(FSDP_SPECS, state_specs, P("data")),
                            out_specs=(FSDP_SPECS, state_specs)))
  want, eps_norm = np_trajectory("sam", params, batch, groups=DATA)
  p, s = params, (block.init(params), base.init(params))
  for w in want:
    p, s = f(p, s, batch)
    helpers.assert_trees_close(p, w, atol=1e-6)
  np.testing.assert_allclose(sam_optax.get_info(s[0]).perturbation_norm, eps_norm, rtol=1e-5)


# --- Recipes with replicated params under shard_map: right today ------------------


def test_one_eps_per_host():
  """One ε per host: a ('host' 2, 'local' 4) mesh, axis_name='host', each
  host's gradient the mean over its devices (pmean over 'local' in the
  loss): per-host ε, the README's recipe."""
  mesh = jax.make_mesh((2, 4), ("host", "local"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params, batch = _problem()
  tx = _tx("sam", axis_name="host")

  def step(params, state, batch):
    loss_fn = lambda p: jax.lax.pmean(helpers.mlp_loss(p, batch), "local")
    grads = jax.grad(loss_fn)(sam_optax.per_device(params, "host"))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(("host", "local"))),
                            out_specs=(P(), P())))
  want, eps_norm = np_trajectory("sam", params, batch, groups=2)
  p, s = params, tx.init(params)
  for w in want:
    p, s = f(p, s, batch)
    helpers.assert_trees_close(p, w, atol=1e-6)
  np.testing.assert_allclose(sam_optax.get_info(s).perturbation_norm, eps_norm, rtol=1e-5)
