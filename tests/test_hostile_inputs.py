"""Hostile input: the reproducers of issue 18's input findings (F8–F22, ASAM's note).

Each test is named after its finding: it asserts the error's message or exact
values against a float64 numpy reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._src import registry
from sam_optax._src.methods import adaptive
from tests import helpers

RHO, LR = 0.05, 0.1


def _sq(q):
  return sum(jnp.sum(a ** 2) for a in jax.tree.leaves(q))


def _step(tx, params, loss_fn=_sq, **kw):
  return tx.update(jax.grad(loss_fn)(params), tx.init(params), params,
                   loss_fn=loss_fn, **kw)


# --- F8: a mask that selects nothing; SAM-ON on flat (PyTorch) keys. -----------

def test_F8_normalization_mask_reads_flat_dotted_keys():
  p = {"h.0.ln_1.weight": jnp.array([1.0, 2.0]),
       "h.0.attn.c_attn.weight": jnp.array([[1.0, -1.0], [0.5, 3.0]]),
       "encoder/LayerNorm/scale": jnp.array([0.5]), "head.bias": jnp.array([4.0])}
  assert sam_optax.normalization_params_mask(p) == {
      "h.0.ln_1.weight": True, "h.0.attn.c_attn.weight": False,
      "encoder/LayerNorm/scale": True, "head.bias": False}
  tx = sam_optax.sam(optax.sgd(LR), RHO, mask=sam_optax.normalization_params_mask)
  u, state = _step(tx, p)
  # ε = ρ g/‖g‖ over the two normalization leaves only; u = −lr ∇L(w + ε).
  w = helpers.np_tree(p)
  norm = np.sqrt(np.sum((2 * w["h.0.ln_1.weight"]) ** 2)
                 + np.sum((2 * w["encoder/LayerNorm/scale"]) ** 2))
  for k, v in w.items():
    eps = RHO * 2 * v / norm if sam_optax.normalization_params_mask(p)[k] else 0 * v
    np.testing.assert_allclose(u[k], -LR * 2 * (v + eps), rtol=1e-6)
  np.testing.assert_allclose(sam_optax.get_info(state).perturbation_norm, RHO, rtol=1e-6)


def test_F8_mask_that_selects_nothing_is_an_error():
  # A flat key with no module above the leaf: nothing marks it a norm layer.
  p = {"layernorm_scale": jnp.ones(2), "dense_kernel": jnp.ones((2, 2))}
  tx = sam_optax.sam(optax.sgd(LR), RHO, mask=sam_optax.normalization_params_mask)
  with pytest.raises(ValueError, match=r"`sam_optax.sam\(\.\.\., mask=\.\.\.\)`: the mask selects "
                     r"no params leaf.*twice the cost.*normalization_params_mask` marks a leaf.*"
                     r"split at '\.' and '/'.*sam_optax.path_mask"):
    _step(tx, p)
  # Every method that takes `mask=`, with an explicit all-False mask, eagerly and under jit.
  for method in registry.METHODS:
    if method.block is None:
      continue
    tx = method.build(optax.sgd(LR), mask={"layernorm_scale": False, "dense_kernel": False})
    for run in (_step, jax.jit(_step, static_argnums=0)):
      with pytest.raises(ValueError, match=rf"`sam_optax.{method.name}\(\.\.\., mask=\.\.\.\)`: "
                         r"the mask selects no params leaf"):
        run(tx, p)


# --- F9: ASAM with None leaves. -------------------------------------------------

@pytest.mark.parametrize("operator", ["official", "all", "abs"])
def test_F9_asam_with_none_leaves(operator):
  w = np.array([[1.0, -2.0], [0.5, 3.0]])
  p = {"w": jnp.asarray(w, jnp.float32), "bias": None}
  f = lambda q: jnp.sum(q["w"] ** 2)
  rho, eta = 0.5, 0.01
  u, _ = _step(sam_optax.asam(optax.sgd(LR), rho, eta, operator=operator), p, f)
  assert u["bias"] is None
  t = np.abs(w) + (0.0 if operator == "abs" else eta)   # w is 2-D: T_w ≠ 1
  g = 2 * w
  eps = rho * t ** 2 * g / np.linalg.norm(t * g)
  np.testing.assert_allclose(u["w"], -LR * 2 * (w + eps), rtol=1e-6)


# --- F10: NNX SAMOptimizer with call-time nnx.Rngs. --------------------------------

def test_F10_nnx_call_time_rngs_is_a_clear_error_and_a_key_works():
  from flax import nnx
  from sam_optax.flax import SAMOptimizer

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l = nnx.Linear(4, 2, rngs=rngs)
      self.d = nnx.Dropout(0.3)

    def __call__(self, x, rngs=None):
      return self.d(self.l(x), rngs=rngs)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  model, rngs = Net(nnx.Rngs(0)), nnx.Rngs(dropout=1)
  opt = SAMOptimizer(model, sam_optax.sam(optax.sgd(LR), RHO), wrt=nnx.Param)
  loss = lambda m, r: jnp.mean(m(x, rngs=r) ** 2)
  grads = nnx.grad(loss)(model, rngs)
  with pytest.raises(ValueError, match=r"`SAMOptimizer.update\(loss_fn=\.\.\.\)`: `loss_fn` changed "
                     r"NNX state that is not part of the model.*TraceContextError.*`nnx.Rngs` "
                     r"passed at call time.*second_pass_rng=.*rngs=key"):
    opt.update(model, grads, loss_fn=lambda m: loss(m, rngs))
  # The advice: a key drawn once per step; both passes use its dropout mask.
  key = rngs.dropout()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = lambda p: loss(nnx.merge(graphdef, p, rest), key)
  g = jax.grad(pure)(params)
  norm = np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(g)))
  g_sam = jax.grad(pure)(jax.tree.map(lambda a, b: a + RHO * b / norm, params, g))
  want = jax.tree.map(lambda a, b: a - LR * b, params, g_sam)
  opt.update(model, nnx.grad(lambda m: loss(m, key))(model), loss_fn=lambda m: loss(m, key))
  helpers.assert_trees_close(nnx.state(model, nnx.Param), want, atol=1e-6)


# --- F13: integer leaves: one consistent advice. -------------------------------

def test_F13_integer_leaf_advice_is_consistent():
  p = {"w": jnp.ones(3), "step": jnp.array(0)}
  advice = (r"params leaf \['step'\] has dtype int32; params must be floating point.*neither "
            r"`mask=` nor `optax.masked` can exclude an integer leaf\. Keep integer state.*out of "
            r"the params tree: pass it to `loss_fn` by closure or with the batch")
  with pytest.raises(TypeError, match=advice):
    sam_optax.sam(optax.sgd(LR), RHO).init(p)
  # Wrapping in optax.masked (the old advice) says to use `mask=` and that
  # integer leaves cannot be masked out either way...
  masked = optax.masked(sam_optax.sam(optax.sgd(LR), RHO), {"w": True, "step": False})
  f = lambda q: jnp.sum(q["w"] ** 2)
  grads = {"w": 2 * p["w"], "step": jnp.array(0)}
  with pytest.raises(ValueError, match=r"inside `optax.masked`.*`sam_optax.sam\(\.\.\., mask=mask\)`"
                     r"\. \(Integer leaves cannot be masked out either way: keep them out of the "
                     r"params tree\.\)"):
    masked.update(grads, masked.init(p), p, loss_fn=f)
  # ... and `mask=` leads back to the same advice, not to optax.masked.
  with pytest.raises(TypeError, match=advice) as e:
    sam_optax.sam(optax.sgd(LR), RHO, mask={"w": True, "step": False}).init(p)
  assert "wrap the transform" not in str(e.value)
  # Following it: the counter closed over, the params float only.
  step = p["step"]
  u, _ = _step(sam_optax.sam(optax.sgd(LR), RHO), {"w": p["w"]},
               lambda q: jnp.sum(q["w"] ** 2) * (1.0 + step.astype(jnp.float32)))
  np.testing.assert_allclose(u["w"], -LR * 2 * (1 + RHO / np.sqrt(3)) * np.ones(3), rtol=1e-6)


# --- F14: ρ as arrays and strings; rho_scale arrays. ---------------------------

W = jnp.array([1.0, 2.0, 2.0])


@pytest.mark.parametrize("rho", [jnp.array(-0.05), jnp.array(np.nan), np.float64(-0.05),
                                 np.array(np.inf)], ids=["jnp-neg", "jnp-nan", "np-neg", "np-inf"])
def test_F14_concrete_array_rho_is_checked_like_a_float(rho):
  with pytest.raises(ValueError, match=r"ρ must be a finite number ≥ 0.*rho=0.05"):
    sam_optax.sam(optax.sgd(LR), rho=rho).init(W)   # at construction or init
  with pytest.raises(ValueError, match=r"`sam_optax.msam\(rho=.*ρ must be a finite number ≥ 0"):
    sam_optax.msam(optax.sgd(LR), rho=rho).init(W)


def test_F14_rho_strings_and_shapes():
  for rho in ("-5e-2", "nan", "0.05", None):
    with pytest.raises(TypeError, match=r"`sam_optax.sam\(rho=.*\)`: ρ must be a float \(or a scalar "
                       r"array, or an optax schedule.*got a (str|NoneType).*rho=float\(value\)"):
      sam_optax.sam(optax.sgd(LR), rho=rho)
  for rho in (np.array([0.05]), jnp.array([0.05, 0.05])):
    with pytest.raises(ValueError, match=r"`sam_optax.sam\(rho=\.\.\.\)`: rho must be a scalar, got shape"):
      sam_optax.sam(optax.sgd(LR), rho=rho)
  with pytest.raises(TypeError, match=r"`sam_optax.asam\(eta='0.01'\)`: eta must be a number, got a str"):
    sam_optax.asam(optax.sgd(LR), eta="0.01")
  # A valid 0-d array is ρ itself: the same step as the float.
  u_array, s_array = _step(sam_optax.sam(optax.sgd(LR), rho=jnp.array(RHO)), W)
  u_float, _ = _step(sam_optax.sam(optax.sgd(LR), rho=RHO), W)
  np.testing.assert_array_equal(u_array, u_float)
  np.testing.assert_allclose(sam_optax.get_info(s_array).rho, RHO, rtol=1e-7)
  # inject_hyperparams: the initial ρ is checked at init; a run-time ρ is not
  # (tests/test_conformance.py::test_inject_hyperparams_negative_rho_is_clamped).
  with pytest.raises(ValueError, match=r"ρ must be a finite number ≥ 0"):
    optax.inject_hyperparams(sam_optax.sam)(optax.sgd(LR), rho=-0.05).init(W)


def test_F14_negative_rho_scale_array_leaf():
  p = {"a": W, "b": W}
  with pytest.raises(ValueError, match=r"rho_scale=\.\.\.\)`: leaf \['a'\] is Array\(-1\..*finite "
                     r"numbers ≥ 0"):
    sam_optax.sam(optax.sgd(LR), RHO, rho_scale={"a": jnp.array(-1.0), "b": 1.0})
  # From a callable: checked when it is resolved, at update.
  tx = sam_optax.sam(optax.sgd(LR), RHO, rho_scale=lambda q: {"a": jnp.array(-1.0), "b": 1.0})
  with pytest.raises(ValueError, match=r"leaf \['a'\] is Array\(-1\."):
    _step(tx, p)


# --- F15: mask edge cases. --------------------------------------------------------

P15 = {"w": jnp.array([1.0, 2.0, 2.0]), "v": jnp.array([-1.0, 1.0])}


def test_F15_elementwise_bool_array_mask_leaf():
  tx = sam_optax.sam(optax.sgd(LR), RHO, mask={"w": np.array([True, False, True]), "v": True})
  with pytest.raises(ValueError, match=r"`sam_optax.sam\(\.\.\., mask=\.\.\.\)`: mask leaf \['w'\] is "
                     r"an array of shape \(3,\) and dtype bool; `mask` takes one bool per params "
                     r"leaf.*split that leaf into two params leaves"):
    _step(tx, P15)


def test_F15_mask_callable_reading_values_fails_alike_eager_and_jit():
  tx = sam_optax.sam(optax.sgd(LR), RHO,
                     mask=lambda q: jax.tree.map(lambda a: bool(jnp.all(a > 0)), q))
  for run in (_step, jax.jit(_step, static_argnums=0)):
    with pytest.raises(TypeError, match=r"mask=<callable>\)`: the mask callable raised TypeError.*"
                       r"ShapeDtypeStruct.*not their values.*eagerly and under `jit`"):
      run(tx, P15)
  # A mask from shapes and dtypes: the same leaves eagerly and under jit.
  tx = sam_optax.sam(optax.sgd(LR), RHO, mask=lambda q: jax.tree.map(lambda a: a.shape[0] > 2, q))
  (u_eager, _), (u_jit, _) = _step(tx, P15), jax.jit(_step, static_argnums=0)(tx, P15)
  helpers.assert_trees_close(u_eager, u_jit, atol=0)
  w = np.array([1.0, 2.0, 2.0])
  np.testing.assert_allclose(u_eager["w"], -LR * 2 * (w + RHO * w / 3), rtol=1e-6)
  np.testing.assert_allclose(u_eager["v"], -LR * 2 * np.array([-1.0, 1.0]), rtol=1e-6)


def test_F15_container_mask_leaf():
  tx = sam_optax.sam(optax.sgd(LR), RHO, mask={"w": (False, False), "v": True})
  with pytest.raises(ValueError, match=r"mask leaf \['w'\] is a tuple \(False, False\); `mask` takes "
                     r"one bool per params leaf.*A container is not a bool"):
    _step(tx, P15)


# --- F17: SAMTrainState without loss_fn for a method with no second pass. -------

def test_F17_linen_state_asks_loss_fn_only_of_methods_that_need_it():
  from flax import linen as nn
  from sam_optax.flax import SAMTrainState, SAMTrainStateWithBatchStats
  m = nn.Dense(2)
  p = m.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  g = jax.tree.map(jnp.ones_like, p)
  for method in registry.METHODS:   # the registry says which make a second pass
    tx = method.build(optax.sgd(LR, momentum=0.9))
    st = SAMTrainState.create(apply_fn=m.apply, params=p, tx=tx)
    if method.second_pass:
      with pytest.raises(TypeError, match=r"`SAMTrainState.apply_gradients` needs the keyword "
                         r"argument `loss_fn`"):
        st.apply_gradients(grads=g)
      continue
    new = st.apply_gradients(grads=g)
    u, opt_state = tx.update(g, tx.init(p), p)
    helpers.assert_trees_close(new.params, optax.apply_updates(p, u), atol=0)
    helpers.assert_trees_close(new.opt_state, opt_state, atol=0)
    bn = SAMTrainStateWithBatchStats.create(apply_fn=m.apply, params=p, tx=tx,
                                            batch_stats={"mean": jnp.zeros(2)})
    stats = {"mean": jnp.ones(2)}
    new = bn.apply_gradients(grads=g, batch_stats=stats)
    helpers.assert_trees_close(new.params, optax.apply_updates(p, u), atol=0)
    helpers.assert_trees_close(new.batch_stats, stats, atol=0)
    with pytest.raises(TypeError, match=r"needs `batch_stats` \(received none\)"):
      bn.apply_gradients(grads=g)


def test_F17_nnx_optimizer_with_msam_needs_no_loss_fn():
  from flax import nnx
  from sam_optax.flax import SAMOptimizer
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = sam_optax.msam(optax.sgd(LR, momentum=0.9))
  grads = nnx.grad(lambda mm: jnp.sum(mm(jnp.ones((2, 3)))))(model)
  SAMOptimizer(model, tx, wrt=nnx.Param).update(model, grads)
  g = nnx.as_pure(nnx.state(grads, nnx.Param))
  u, _ = tx.update(g, tx.init(params), params)
  helpers.assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)),
                             optax.apply_updates(params, u), atol=0)


# --- F20: sam(optax.lbfgs()). ---------------------------------------------------------

def test_F20_sam_around_lbfgs():
  a, b = np.array([1.0, 2.0, 4.0]), np.array([1.0, -1.0, 0.5])
  f = lambda w: 0.5 * jnp.sum(jnp.asarray(a, jnp.float32) * w ** 2) - jnp.vdot(
      jnp.asarray(b, jnp.float32), w)
  grad = lambda w: a * w - b   # float64 numpy
  MIN_VALUE = -np.sum(b ** 2 / (2 * a))  # noqa: N806  (at w = b/a)

  @functools.partial(jax.jit, static_argnums=0)
  def lbfgs_step(tx, w, state, updates=None):
    """A step of `tx`, or of plain L-BFGS fed `updates` (then no `loss_fn`)."""
    v, g = jax.value_and_grad(f)(w)
    own = {"loss_fn": f} if updates is None else {}
    with jax.numpy_dtype_promotion("standard"):   # optax's line search promotes
      u, state = tx.update(g if updates is None else updates, state, w, value=v,
                           grad=g, value_fn=f, **own)
    return optax.apply_updates(w, u), state

  def run(tx, sam_grad, steps=5):
    base = optax.lbfgs()
    w = w_ref = jnp.ones(3)
    state, base_state, values = tx.init(w), base.init(w), [float(f(w))]
    for _ in range(steps):
      w, state = lbfgs_step(tx, w, state)
      # Reference: L-BFGS fed the SAM gradient computed in numpy.
      g_s = jnp.asarray(sam_grad(np.asarray(w_ref, np.float64)), jnp.float32)
      w_ref, base_state = lbfgs_step(base, w_ref, base_state, g_s)
      np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-7)
      values.append(float(f(w)))
    return values

  def sam_grad(w):
    g = grad(w)
    return grad(w + RHO * g / np.linalg.norm(g))

  values = run(sam_optax.sam(optax.lbfgs(), RHO), sam_grad)
  assert all(v1 < v0 for v0, v1 in zip(values, values[1:]))
  assert values[-1] < MIN_VALUE + 0.01, values
  # ρ = 0: exactly L-BFGS.
  run(sam_optax.sam(optax.lbfgs(), 0.0), grad)
  # Every wrapper keeps its own keyword arguments from the base optimizer.
  for method in registry.METHODS:
    if method.block is not None:
      tx = method.build(optax.lbfgs())
      jax.eval_shape(lbfgs_step, tx, jnp.ones(3), tx.init(jnp.ones(3)))


# --- F21, F22: state and params that do not match. ----------------------------------

@pytest.mark.parametrize("name", ["vasso", "looksam", "msam"])
def test_F21_state_built_for_other_params(name):
  tx = registry.BY_NAME[name].build(optax.sgd(LR))
  state = tx.init({"w": jnp.ones(3)})
  p = {"w": jnp.ones(5)}
  for run in (lambda: tx.update(p, state, p, loss_fn=_sq),
              lambda: jax.jit(lambda s: tx.update(p, s, p, loss_fn=_sq))(state)):
    with pytest.raises(ValueError, match=rf"`sam_optax.{name}.update`: the optimizer state does not "
                       r"match `params` \(state leaf .*\['w'\] has shape \(3,\), these params give "
                       r"\(5,\)\).*`state = tx.init\(params\)`"):
      run()


def test_F22_remove_perturbation_with_params_of_another_structure():
  w = jnp.ones(3)
  tx = sam_optax.msam(optax.sgd(LR, momentum=0.9))
  _, st = tx.update(w, tx.init(w), w)
  with pytest.raises(ValueError, match=r"`sam_optax.remove_perturbation`: `params` do not match the "
                     r"`msam` state in `opt_state` \(params tree PyTreeDef\(\{'w': \*\}\); the "
                     r"state's tree PyTreeDef\(\*\)\)"):
    sam_optax.remove_perturbation({"w": w}, st)
  with pytest.raises(ValueError, match=r"params leaf <root> has shape \(4,\), the state's \(3,\)"):
    sam_optax.remove_perturbation(jnp.ones(4), st)


# --- Issue 18, item 6: ASAM's note on the authors' name-based operator. ---------------

def test_asam_note_name_based_rule():
  """The numbers in `asam`'s note: 'official' is the authors' rule (T_w = |w| + η
  on every `weight`, 1 on biases) without normalization layers, 0.14 off with a
  LayerNorm (whose scale is a 1-D `weight`), and 'all' is 0.98 off."""
  rng = np.random.default_rng(0)
  p = {"fc1": {"weight": rng.normal(size=(8, 16)) / 3, "bias": rng.normal(size=16) * .1},
       "ln": {"weight": 1 + rng.normal(size=16) * .3, "bias": rng.normal(size=16) * .1},
       "fc2": {"weight": rng.normal(size=(16, 4)) / 4, "bias": rng.normal(size=4) * .1}}
  x, y = rng.normal(size=(32, 8)), rng.normal(size=(32, 4))
  xf, yf = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(q, norm=True):
    h = xf @ q["fc1"]["weight"] + q["fc1"]["bias"]
    if norm:
      h = h - h.mean(-1, keepdims=True)
      h = h / jnp.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * q["ln"]["weight"] + q["ln"]["bias"]
    return jnp.mean((jnp.tanh(h) @ q["fc2"]["weight"] + q["fc2"]["bias"] - yf) ** 2)

  rho, eta = 0.5, 0.01

  def eps_of(params, loss_fn, operator):   # ε = ρ d of ASAM's rule
    w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    g = jax.grad(loss_fn)(w)
    d, _ = adaptive.asam_rule(eta, operator=operator).ascent(g, (), w)
    return (jax.tree.map(lambda a: rho * np.asarray(a, np.float64), d),
            jax.tree.map(lambda a: np.asarray(a, np.float64), g))

  def authors(params, g):
    t = {m: {k: np.abs(v) + eta if k == "weight" else np.ones_like(v) for k, v in d.items()}
         for m, d in params.items()}
    n = np.sqrt(sum(np.sum((t[m][k] * g[m][k]) ** 2) for m in params for k in params[m]))
    return {m: {k: rho * t[m][k] ** 2 * g[m][k] / n for k in params[m]} for m in params}

  flat = lambda e: np.concatenate([np.ravel(v) for v in jax.tree.leaves(e)])
  rel = lambda e, r: np.linalg.norm(flat(e) - flat(r)) / np.linalg.norm(flat(r))
  no_ln = {k: v for k, v in p.items() if k != "ln"}
  e, g = eps_of(no_ln, lambda q: loss(q, norm=False), "official")
  assert rel(e, authors(no_ln, g)) < 1e-6
  e, g = eps_of(p, loss, "official")
  assert rel(e, authors(p, g)) == pytest.approx(0.14, abs=0.01)
  e, g = eps_of(p, loss, "all")
  assert rel(e, authors(p, g)) == pytest.approx(0.98, abs=0.01)
