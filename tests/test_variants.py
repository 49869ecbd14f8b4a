"""The SAM family: each method against a pure-numpy reference of its equations.

Every method of the library's list (`sam_optax._src.registry.METHODS`: SAM,
ASAM, Fisher-SAM, GSAM, GNP, LookSAM, interval SAM, VaSSO, F-SAM, MSAM) runs a
few SGD-momentum steps on a small MLP and is compared with float64 numpy
written from the papers' equations (atol 1e-6); a test fails if a method has
no reference. Then, over the list: zero gradients, chains,
`inject_hyperparams`, bad input; and `axis_name` under shard_map, scoped
perturbations (SAM-ON masks, per-leaf ρ).
"""

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax._src.registry import BY_NAME, METHODS
from tests import helpers

LR, MOMENTUM, STEPS = 0.1, 0.9, 5

# --- numpy tree algebra ---------------------------------------------------------


def t_map(f, *trees):
  return jax.tree.map(f, *trees)


def t_dot(a, b):
  return float(sum(np.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def t_norm(a):
  return math.sqrt(t_dot(a, a))


def t_unit(a):
  n = t_norm(a)
  return t_map(lambda v: v / n if n > 0 else 0 * v, a)


def t_add(a, b, s=1.0):
  return t_map(lambda x, y: x + s * y, a, b)


# --- the methods, written from the papers ----------------------------------------


def np_sam(rho):
  def method(t, g, w, state, grad_at):
    del t
    return grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(g)))), state
  return method


def np_asam(rho, eta, operator="official"):
  def method(t, g, w, state, grad_at):
    del t
    def op(x):
      if operator == "official" and x.ndim <= 1:
        return np.ones_like(x)
      return np.abs(x) if operator == "abs" else np.abs(x) + eta
    tw = t_map(op, w)
    tg = t_map(lambda a, b: a * b, tw, g)
    n = t_norm(tg)
    eps = t_map(lambda a, b: rho * a * a * b / n if n > 0 else 0 * b, tw, g)
    return grad_at(t_add(w, eps)), state
  return method


def np_fisher(rho, eta):
  def method(t, g, w, state, grad_at):
    del t
    pre = t_map(lambda v: v / (1 + eta * v * v), g)
    q = math.sqrt(t_dot(g, pre))
    eps = t_map(lambda v: rho * v / q if q > 0 else 0 * v, pre)
    return grad_at(t_add(w, eps)), state
  return method


def np_gsam(rho, alpha):
  def method(t, g, w, state, grad_at):
    del t
    gp = grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(g))))
    perp = t_add(g, gp, -t_dot(g, gp) / t_dot(gp, gp))
    return t_add(gp, perp, -alpha), state
  return method


def np_gnp(rho, alpha):
  def method(t, g, w, state, grad_at):
    del t
    gp = grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(g))))
    return t_map(lambda a, b: (1 - alpha) * a + alpha * b, g, gp), state
  return method


def np_looksam(rho, k, alpha):
  def method(t, g, w, state, grad_at):
    if t % k == 0:
      gp = grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(g))))
      gv = t_add(gp, g, -t_dot(g, gp) / t_dot(g, g))
      return gp, gv
    return t_add(g, state, alpha * t_norm(g) / t_norm(state)), state
  return method


def np_interval(rho, k):
  def method(t, g, w, state, grad_at):
    if t % k:
      return g, state
    return grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(g)))), state
  return method


def np_vasso(rho, theta):
  def method(t, g, w, state, grad_at):
    d = g if t == 0 else t_map(lambda a, b: (1 - theta) * a + theta * b, state, g)
    return grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(d)))), d
  return method


def np_friendly_reference_code(rho, lmbda):
  """F-SAM as its reference code writes it (σ = 1): g − m_{t−1}, then update m."""
  def method(t, g, w, m, grad_at):
    if t == 0:
      d, m = g, g
    else:
      d = t_add(g, m, -1.0)
      m = t_map(lambda a, b: lmbda * a + (1 - lmbda) * b, m, g)
    return grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(d)))), m
  return method


def np_friendly_paper(rho, sigma, lmbda):
  """F-SAM as the paper's equation: m_t first, then g − σ m_t."""
  def method(t, g, w, m, grad_at):
    if t == 0:
      d, m = g, g
    else:
      m = t_map(lambda a, b: lmbda * a + (1 - lmbda) * b, m, g)
      d = t_add(g, m, -sigma)
    return grad_at(t_add(w, t_map(lambda v: rho * v, t_unit(d)))), m
  return method


def np_trajectory(params, batch, method, *, lr=LR, momentum=MOMENTUM, steps=STEPS):
  """SGD (heavy ball, as optax.sgd) on `method`'s direction, in float64."""
  x, y = np.asarray(batch[0], np.float64), np.asarray(batch[1])
  grad_at = lambda p: helpers.np_mlp_loss_and_grad(p, x, y)[1]
  w = helpers.np_tree(params)
  trace = t_map(np.zeros_like, w)
  state, out = None, []
  for t in range(steps):
    d, state = method(t, grad_at(w), w, state, grad_at)
    trace = t_map(lambda tr, v: v + momentum * tr, trace, d)
    w = t_map(lambda p, tr: p - lr * tr, w, trace)
    out.append(w)
  return out


def _sgd():
  return optax.sgd(LR, momentum=MOMENTUM)


def _sgd_on(np_method):
  """The numpy trajectory of SGD on `np_method`'s direction."""
  return lambda params, batch, steps: np_trajectory(params, batch, np_method, steps=steps)


def _msam_held_params(params, batch, steps):
  """MSAM's trajectory: the (perturbed) params its reference code holds."""
  return [held for held, _ in np_msam_reference(
      params, batch, rho=0.3, lr=LR, momentum=MOMENTUM, steps=steps)]


class Reference(NamedTuple):
  """A configuration of a method and its numpy trajectory.

  Attributes:
    method: the method's name in the registry.
    kwargs: the wrapper's arguments besides the base optimizer.
    numpy: `(params, batch, steps) -> [params after each step]`, float64.
    steps: how many steps to compare.
  """

  method: str
  kwargs: Mapping[str, Any]
  numpy: Callable
  steps: int = STEPS


# Every method of the registry at least once (checked below), some in more
# configurations.
REFERENCES = {
    "sam": Reference("sam", dict(rho=0.1), _sgd_on(np_sam(0.1))),
    "asam": Reference("asam", dict(rho=0.5, eta=0.01), _sgd_on(np_asam(0.5, 0.01))),
    "asam_all": Reference("asam", dict(rho=0.3, eta=0.1, operator="all"),
                          _sgd_on(np_asam(0.3, 0.1, "all"))),
    "asam_abs": Reference("asam", dict(rho=0.3, operator="abs"),
                          _sgd_on(np_asam(0.3, 0.0, "abs"))),
    "fisher_sam": Reference("fisher_sam", dict(rho=0.1, eta=1.0), _sgd_on(np_fisher(0.1, 1.0))),
    "gsam": Reference("gsam", dict(rho=0.1, alpha=0.3), _sgd_on(np_gsam(0.1, 0.3))),
    "gnp": Reference("gnp", dict(rho=0.1, alpha=0.8), _sgd_on(np_gnp(0.1, 0.8))),
    # Seven steps: two SAM steps and their reuse.
    "looksam": Reference("looksam", dict(rho=0.1, k=3, alpha=0.7),
                         _sgd_on(np_looksam(0.1, 3, 0.7)), steps=7),
    "interval_sam": Reference("interval_sam", dict(rho=0.1, k=2), _sgd_on(np_interval(0.1, 2))),
    "vasso": Reference("vasso", dict(rho=0.1, theta=0.4), _sgd_on(np_vasso(0.1, 0.4))),
    "friendly_sam": Reference("friendly_sam", dict(rho=0.1, sigma=1.0, decay=0.6),
                              _sgd_on(np_friendly_reference_code(0.1, 0.6))),
    "friendly_sam_sigma": Reference("friendly_sam", dict(rho=0.1, sigma=0.5, decay=0.6),
                                    _sgd_on(np_friendly_paper(0.1, 0.5, 0.6))),
    "msam": Reference("msam", dict(rho=0.3, momentum=MOMENTUM), _msam_held_params),
}


def test_every_method_has_a_numpy_reference():
  covered = {ref.method for ref in REFERENCES.values()}
  assert covered <= set(BY_NAME), sorted(covered - set(BY_NAME))
  missing = sorted({m.name for m in METHODS} - covered)
  assert not missing, f"methods without a numpy reference in REFERENCES: {missing}"


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_numpy_reference(name):
  reference = REFERENCES[name]
  params, batch, loss_fn = helpers.mlp_problem()
  steps = reference.steps
  tx = BY_NAME[reference.method].wrapper(_sgd(), **reference.kwargs)
  traj, _, step = helpers.train_steps(tx, params, loss_fn, steps)
  ref = reference.numpy(params, batch, steps)
  assert len(ref) == len(traj) == steps
  for got, want in zip(traj, ref):
    helpers.assert_trees_close(got, want, atol=1e-6)
  assert step._cache_size() == 1
  # The method really differs from plain SGD (the comparison can fail).
  plain = np_trajectory(params, batch, lambda t, g, w, s, f: (g, s), steps=steps)
  gap = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(plain[-1]), jax.tree.leaves(ref[-1])))
  assert gap > 1e-4


# --- ε by hand on a quadratic: ∇L(w) = w + c, so ∇L(w + ε) − ∇L(w) = ε ------------

W = {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.3, -0.7])}
C = {"kernel": jnp.array([[0.2, 0.1], [-0.4, 0.3]]), "bias": jnp.array([1.0, 0.5])}


def quad_loss(w):
  return sum(0.5 * jnp.sum(w[k] ** 2) + jnp.sum(C[k] * w[k]) for k in w)


def eps_of(block, w=W, steps=1):
  """The ε of `block` at each step, read off the quadratic's gradient."""
  state = block.init(w)
  out = []
  for _ in range(steps):
    g = jax.grad(quad_loss)(w)
    u, state = block.update(g, state, w, loss_fn=quad_loss)
    out.append(jax.tree.map(lambda a, b: np.asarray(a - b, np.float64), u, g))
  return out, state


def test_asam_epsilon_official_operator_skips_1d_leaves():
  (eps,), state = eps_of(sam_optax.adaptive_sharpness_aware(0.5, 0.01))
  g = jax.tree.map(np.asarray, jax.grad(quad_loss)(W))
  tk = np.abs(np.asarray(W["kernel"])) + 0.01
  norm = np.sqrt(np.sum((tk * g["kernel"]) ** 2) + np.sum(g["bias"] ** 2))
  np.testing.assert_allclose(eps["kernel"], 0.5 * tk ** 2 * g["kernel"] / norm, atol=1e-6)
  np.testing.assert_allclose(eps["bias"], 0.5 * g["bias"] / norm, atol=1e-6)
  np.testing.assert_allclose(sam_optax.get_info(state).perturbation_norm,
                             helpers.np_tree_norm(eps), rtol=1e-5)


def test_fisher_epsilon_is_on_the_fisher_ellipsoid():
  (eps,), _ = eps_of(sam_optax.fisher_sharpness_aware(0.2, eta=2.0))
  g = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.grad(quad_loss)(W))
  f = jax.tree.map(lambda v: 1 + 2.0 * v * v, g)  # diag of F = I + η g²
  quad = sum(np.sum(e * fi * e) for e, fi in zip(jax.tree.leaves(eps), jax.tree.leaves(f)))
  np.testing.assert_allclose(quad, 0.2 ** 2, rtol=1e-5)  # ε' F ε = ρ²
  # eta = 0 is SAM.
  (eps0,), _ = eps_of(sam_optax.fisher_sharpness_aware(0.2, eta=0.0))
  helpers.assert_trees_close(eps0, t_map(lambda v: 0.2 * v, t_unit(g)), atol=1e-6)


def test_vasso_and_friendly_first_step_is_sam_then_differ():
  sam_eps, _ = eps_of(sam_optax.interval_sharpness_aware(0.1, k=1), steps=1)
  for block in (sam_optax.variance_suppressed_sharpness_aware(0.1, theta=0.5),
                sam_optax.friendly_sharpness_aware(0.1)):
    eps, _ = eps_of(block, steps=1)
    helpers.assert_trees_close(eps[0], sam_eps[0], atol=1e-6)
    np.testing.assert_allclose(helpers.np_tree_norm(eps[0]), 0.1, rtol=1e-5)


# --- The second pass really is skipped --------------------------------------------


# Methods whose second pass runs on some steps only (every k-th).
SKIPPING = [m for m in METHODS if m.second_pass and m.passes < 2]


@pytest.mark.parametrize("method", SKIPPING, ids=lambda m: m.name)
def test_second_pass_only_every_k_steps_one_compilation(method):
  params, batch, loss_fn = helpers.mlp_problem()
  k = method.example["k"]
  calls = []

  def counted_loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return helpers.mlp_loss(p, batch)

  tx = method.build(optax.sgd(LR), rho=0.05)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=counted_loss)
    return optax.apply_updates(params, updates), state

  for _ in range(2 * k + 1):
    params, state = step(params, state)
  jax.effects_barrier()
  assert len(calls) == 3  # steps 0, k, 2k
  assert step._cache_size() == 1
  assert np.isfinite(float(sam_optax.get_info(state).perturbed_loss))  # step 2k: SAM
  _, state = step(params, state)  # step 2k + 1 skips the second pass
  assert np.isnan(float(sam_optax.get_info(state).perturbed_loss))


# --- Zero gradient: ε = 0, finite updates ---------------------------------------------

@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_zero_gradient_gives_zero_epsilon(method):
  w = {"a": jnp.zeros((2, 3)), "b": jnp.ones((2,))}
  loss_fn = lambda p: jnp.sum(p["a"] ** 2) + 0.0 * jnp.sum(p["b"])
  if method.block is not None:
    tx = method.block(0.5, **method.example)
  else:  # it wraps the base (MSAM): zero updates, and the params come back
    tx = method.build(optax.sgd(0.1, momentum=0.9), rho=0.5)
  kw = {"loss_fn": loss_fn} if method.second_pass else {}
  state = tx.init(w)
  zeros = jax.tree.map(jnp.zeros_like, w)
  for _ in range(2):
    u, state = tx.update(zeros, state, w, **kw)
    for leaf in jax.tree.leaves(u):
      assert np.all(np.isfinite(leaf)) and np.all(leaf == 0)
    info = sam_optax.get_info(state)
    assert float(info.perturbation_norm) == 0.0
    if method.block is not None:
      for leaf in jax.tree.leaves(state.rule_state):
        assert np.all(np.isfinite(leaf))
  if method.block is None:
    helpers.assert_trees_close(sam_optax.remove_perturbation(w, state), w, atol=0)


# --- Chains and inject_hyperparams -------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in METHODS if m.block is not None],
                         ids=lambda m: m.name)
def test_block_in_chain_equals_wrapper(method):
  """`chain(block, clip, sgd)` is `wrapper(chain(clip, sgd))`."""
  params, _, loss_fn = helpers.mlp_problem()
  base = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR, momentum=MOMENTUM))
  txs = (optax.chain(method.block(0.1, **method.example), base),
         method.build(base, rho=0.1))

  @jax.jit
  def two_steps(params):
    finals = []
    for tx in txs:
      p, state = params, tx.init(params)
      for _ in range(2):
        u, state = tx.update(jax.grad(loss_fn)(p), state, p, loss_fn=loss_fn)
        p = optax.apply_updates(p, u)
      finals.append(p)
    return finals

  a, b = two_steps(params)
  helpers.assert_trees_close(a, b, atol=0)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_inject_hyperparams_scalar_knobs(method):
  """Every numeric knob of every method can be injected and changed at run
  time: the same steps as the wrapper built with the new values, one program."""
  kw = {**method.defaults(), **method.example}
  new = {k: v / 2 for k, v in method.defaults().items()}
  assert "rho" in new and all(new[k] != kw[k] for k in new)
  static = method.static_args
  params, _, loss_fn = helpers.mlp_problem()
  base = optax.sgd(LR, momentum=MOMENTUM)
  tx = optax.inject_hyperparams(method.wrapper, static_args=static)(base, **kw)
  _, state, step = helpers.train_steps(tx, params, loss_fn, 0)
  for k, v in new.items():
    state.hyperparams[k] = jnp.asarray(v, jnp.float32)

  p = params
  for _ in range(3):
    p, state = step(p, state)
  want, _, _ = helpers.train_steps(method.wrapper(base, **{**kw, **new}), params, loss_fn, 3)
  helpers.assert_trees_close(p, want[-1], atol=1e-6)
  for k, v in kw.items():  # back to the constructor's values: no recompilation
    if k not in static:
      state.hyperparams[k] = jnp.asarray(v, jnp.float32)
  step(p, state)
  assert step._cache_size() == 1


def test_injected_k_raises_static_arg_error():
  with pytest.raises(TypeError, match=r"`k` is structural.*static_args=\('k',\)"):
    optax.inject_hyperparams(sam_optax.looksam)(optax.sgd(0.1), rho=0.05, k=5).init(W)


# --- Bad input --------------------------------------------------------------------------

SGD = optax.sgd(0.1)


class Bad(NamedTuple):
  """A call that must fail: `make()` raises `error` matching `match`."""

  method: str  # the registry method it builds, or the other public function
  make: Callable
  error: type
  match: str


# Bad input, at least one case per method of the registry (checked below).
BAD = [
    Bad("sam", lambda: sam_optax.sam(SGD, rho=-1.0), ValueError, r"`sam_optax.sam\(rho=-1.0\)`: ρ must be a finite number ≥ 0"),
    Bad("asam", lambda: sam_optax.asam(SGD, eta=-0.1), ValueError, r"`sam_optax.asam\(eta=-0.1\)`: eta must be a finite number ≥ 0"),
    Bad("asam", lambda: sam_optax.asam(SGD, eta=float("nan")), ValueError, r"eta must be a finite number"),
    Bad("asam", lambda: sam_optax.asam(SGD, operator="davda54"), ValueError, r"unknown normalization operator.*'official'.*'all'.*'abs'"),
    Bad("asam", lambda: sam_optax.asam(SGD, rho=-1.0), ValueError, r"`sam_optax.asam\(rho=-1.0\)`: ρ must be a finite number ≥ 0"),
    Bad("asam", lambda: sam_optax.adaptive_sharpness_aware(eta=True), TypeError, r"expected a number, got a bool"),
    Bad("fisher_sam", lambda: sam_optax.fisher_sam(SGD, eta=-1.0), ValueError, r"`sam_optax.fisher_sam\(eta=-1.0\)`"),
    Bad("gsam", lambda: sam_optax.gsam(SGD, alpha=-0.1), ValueError, r"`sam_optax.gsam\(alpha=-0.1\)`: alpha must be a finite number ≥ 0"),
    Bad("gsam", lambda: sam_optax.gsam(SGD, alpha=lambda c: 0.1), TypeError, r"alpha must be a number.*inject_hyperparams\(sam_optax.gsam\)"),
    Bad("gnp", lambda: sam_optax.gnp(SGD, alpha=1.5), ValueError, r"`sam_optax.gnp\(alpha=1.5\)`: alpha must be a finite number in \[0, 1\]"),
    Bad("gnp", lambda: sam_optax.gradient_norm_penalty(alpha=-0.5), ValueError, r"in \[0, 1\]"),
    Bad("looksam", lambda: sam_optax.looksam(SGD, k=0), ValueError, r"`sam_optax.looksam\(k=0\)`: k is the number of steps.*integer ≥ 1"),
    Bad("looksam", lambda: sam_optax.looksam(SGD, k=2.5), ValueError, r"k=2.5"),
    Bad("looksam", lambda: sam_optax.looksam(SGD, k=True), ValueError, r"k=True"),
    Bad("looksam", lambda: sam_optax.looksam(SGD, alpha=-0.7), ValueError, r"alpha must be a finite number ≥ 0"),
    Bad("looksam", lambda: sam_optax.looksam(SGD, k=jnp.asarray(5)), TypeError, r"`k` is structural"),
    Bad("interval_sam", lambda: sam_optax.interval_sam(SGD, k=-1), ValueError, r"`sam_optax.interval_sam\(k=-1\)`"),
    Bad("vasso", lambda: sam_optax.vasso(SGD, theta=0.0), ValueError, r"`sam_optax.vasso\(theta=0.0\)`: theta must be a finite number in \(0, 1\]"),
    Bad("vasso", lambda: sam_optax.vasso(SGD, theta=1.5), ValueError, r"in \(0, 1\]"),
    Bad("friendly_sam", lambda: sam_optax.friendly_sam(SGD, decay=1.0), ValueError, r"decay must be a finite number in \[0, 1\)"),
    Bad("friendly_sam", lambda: sam_optax.friendly_sam(SGD, sigma=-1.0), ValueError, r"sigma must be a finite number ≥ 0"),
    Bad("msam", lambda: sam_optax.msam(SGD, momentum=1.0), ValueError, r"`sam_optax.msam\(momentum=1.0\)`.*\[0, 1\)"),
    Bad("msam", lambda: sam_optax.msam(SGD, rho=-0.3), ValueError, r"ρ must be a finite number ≥ 0"),
    Bad("looksam", lambda: sam_optax.looksam(SGD, m=0), ValueError, r"m is the number of examples per perturbation"),
    Bad("asam", lambda: sam_optax.asam(SGD, rho_scale={"kernel": -1.0, "bias": 1.0}), ValueError,
     r"`sam_optax.asam\(..., rho_scale=...\)`: leaf \['kernel'\] is -1.0"),
    Bad("rho_from_learning_rate", lambda: sam_optax.rho_from_learning_rate(optax.constant_schedule(0.1), 0.6), ValueError,
     r"pass its peak value `lr_max=`"),
    Bad("rho_from_learning_rate", lambda: sam_optax.rho_from_learning_rate(0.1, 0.6, lr_max=0.1, lr_min=0.5), ValueError,
     r"lr_max must be ≥ lr_min"),
    Bad("rho_from_learning_rate", lambda: sam_optax.rho_from_learning_rate(0.1, -0.6), ValueError, r"rho_max must be a finite number ≥ 0"),
]


def _bad_ids():
  seen = {}
  ids = []
  for bad in BAD:
    seen[bad.method] = seen.get(bad.method, -1) + 1
    ids.append(f"{bad.method}-{seen[bad.method]}")
  return ids


def test_every_method_has_bad_input_cases():
  missing = sorted({m.name for m in METHODS} - {bad.method for bad in BAD})
  assert not missing, f"methods without a bad-input case in BAD: {missing}"


@pytest.mark.parametrize("bad", BAD, ids=_bad_ids())
def test_bad_input_is_reported_clearly(bad):
  with pytest.raises(bad.error, match=bad.match):
    bad.make()


@pytest.mark.parametrize("kw,match", [
    (dict(mask={"kernel": True}), r"`sam_optax.asam\(...\)`, argument `mask`: the mask tree does not match the params tree"),
    (dict(mask=lambda p: [True, False]), r"argument `mask`: the mask tree does not match"),
    (dict(rho_scale={"kernel": 1.0, "bias": 1.0, "extra": 2.0}), r"argument `rho_scale`: the rho_scale tree does not match"),
])
def test_leafwise_tree_mismatch_at_update(kw, match):
  tx = sam_optax.asam(SGD, **kw)
  with pytest.raises(ValueError, match=match):
    tx.update(jax.grad(quad_loss)(W), tx.init(W), W, loss_fn=quad_loss)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_m_and_axis_name_exactly_where_the_list_says(method):
  """`takes_m` / `takes_axis_name` of the registry are the wrappers' own."""
  for arg, value, takes in (("m", 4, method.takes_m),
                            ("axis_name", "d", method.takes_axis_name)):
    if takes:
      method.wrapper(SGD, **{arg: value})
    else:
      with pytest.raises(TypeError, match=arg):
        method.wrapper(SGD, **{arg: value})


def test_remove_perturbation_without_msam_state():
  tx = sam_optax.asam(SGD)
  with pytest.raises(ValueError, match=r"`sam_optax.remove_perturbation`.*found 0"):
    sam_optax.remove_perturbation(W, tx.init(W))


# --- GSAM's ρ following the learning rate -------------------------------------------------


def test_rho_from_learning_rate_follows_and_clamps():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 4, 20, end_value=0.01)
  rho = sam_optax.rho_from_learning_rate(lr, rho_max=0.6, rho_min=0.0, lr_max=0.1, lr_min=0.01)
  for t in range(20):
    want = max(0.0, 0.6 * (float(lr(t)) - 0.01) / 0.09)
    np.testing.assert_allclose(float(rho(t)), want, rtol=1e-5, atol=1e-7)
  assert float(rho(0)) == 0.0  # lr 0 < lr_min: negative by the formula, clamped
  tx = sam_optax.gsam(optax.sgd(lr), rho=rho, alpha=0.6)
  state = tx.init(W)
  seen = []
  for _ in range(6):
    with jax.numpy_dtype_promotion("standard"):  # optax's schedules: float * int count
      u, state = tx.update(jax.grad(quad_loss)(W), state, W, loss_fn=quad_loss)
    seen.append(float(sam_optax.get_info(state).rho))
  np.testing.assert_allclose(seen, [float(rho(t)) for t in range(6)], rtol=1e-6)
  # Constant learning rate: ρ is rho_max.
  assert float(sam_optax.rho_from_learning_rate(0.1, 0.3, 0.1)(7)) == pytest.approx(0.3)


# --- MSAM --------------------------------------------------------------------------------


def np_msam_reference(params, batch, *, rho, lr, momentum, steps):
  """The reference code's MSAM (SGD) loop: returns the params it holds (perturbed)."""
  x, y = np.asarray(batch[0], np.float64), np.asarray(batch[1])
  w = helpers.np_tree(params)
  v = t_map(np.zeros_like, w)
  inv_norm = 0.0
  out = []
  for _ in range(steps):
    g = helpers.np_mlp_loss_and_grad(w, x, y)[1]
    w = t_add(w, v, rho * inv_norm)        # back to the unperturbed params
    v = t_map(lambda a, b: momentum * a + b, v, g)
    w = t_add(w, v, -lr)                   # SGD step
    inv_norm = 1.0 / t_norm(v)
    w = t_add(w, v, -rho * inv_norm)       # perturb along −v
    out.append((w, t_add(w, v, rho * inv_norm)))
  return out


def test_msam_matches_reference_code_and_recovers_params():
  params, batch, loss_fn = helpers.mlp_problem()
  tx = sam_optax.msam(optax.sgd(LR, momentum=MOMENTUM), rho=0.3, momentum=MOMENTUM)
  traj, state, step = helpers.train_steps(tx, params, loss_fn, STEPS)
  ref = np_msam_reference(params, batch, rho=0.3, lr=LR, momentum=MOMENTUM, steps=STEPS)
  for got, (want, _) in zip(traj, ref):
    helpers.assert_trees_close(got, want, atol=1e-6)
  helpers.assert_trees_close(sam_optax.remove_perturbation(traj[-1], state), ref[-1][1], atol=1e-6)
  np.testing.assert_allclose(
      helpers.np_tree_norm(t_add(helpers.np_tree(traj[-1]), ref[-1][1], -1.0)), 0.3, rtol=1e-5)
  assert step._cache_size() == 1


def test_msam_with_adamw_perturbs_along_first_moment():
  params, _, loss_fn = helpers.mlp_problem()
  tx = sam_optax.msam(optax.adamw(1e-2, b1=0.8), rho=0.2, momentum=0.8)
  with jax.numpy_dtype_promotion("standard"):  # optax's AdamW: decay ** int count
    traj, state, _ = helpers.train_steps(tx, params, loss_fn, 3)
  eps = jax.tree.map(jnp.subtract, traj[-1], sam_optax.remove_perturbation(traj[-1], state))
  mu = state.base[0].mu  # ScaleByAdamState: the first moment
  norm = optax.tree.norm(mu)
  helpers.assert_trees_close(eps, jax.tree.map(lambda m: -0.2 * m / norm, mu), atol=1e-6)


def test_msam_needs_no_loss_fn_and_one_gradient():
  params, batch, _ = helpers.mlp_problem()
  calls = []

  def loss_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return helpers.mlp_loss(p, batch)

  tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
  for _ in range(3):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  jax.effects_barrier()
  assert len(calls) == 3  # the user's own gradient only


# --- axis_name: per-device perturbations under shard_map ----------------------------------


def _shard_map_run(tx, params, batch, steps, n_dev=4):
  mesh = helpers.mesh(n_dev)
  step = helpers.shard_map_step(tx, mesh, value=False)
  batch = jax.device_put(batch, NamedSharding(mesh, P("d")))
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state, batch)
  return params, state


def np_per_device_trajectory(params, batch, n_dev, direction, steps, lr=LR, momentum=MOMENTUM):
  """SGD on `direction(t, shards, w, state)`, each shard being (x_k, y_k)."""
  x, y = np.asarray(batch[0], np.float64), np.asarray(batch[1])
  size = x.shape[0] // n_dev
  shards = [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n_dev)]
  w = helpers.np_tree(params)
  trace, state = t_map(np.zeros_like, w), None
  for t in range(steps):
    d, state = direction(t, shards, w, state)
    trace = t_map(lambda tr, v: v + momentum * tr, trace, d)
    w = t_map(lambda p, tr: p - lr * tr, w, trace)
  return w


def _mean(trees):
  return t_map(lambda *v: sum(v) / len(v), *trees)


def test_asam_axis_name_under_shard_map():
  params = helpers.mlp_params()
  batch = helpers.mlp_batch(n=32)
  tx = sam_optax.asam(_sgd(), rho=0.5, axis_name="d")
  got, _ = _shard_map_run(tx, params, batch, 3)
  asam_np = np_asam(0.5, 0.01)

  def direction(t, shards, w, state):
    gps = []
    for xs, ys in shards:
      grad_at = lambda p, xs=xs, ys=ys: helpers.np_mlp_loss_and_grad(p, xs, ys)[1]
      gps.append(asam_np(t, grad_at(w), w, None, grad_at)[0])
    return _mean(gps), state

  want = np_per_device_trajectory(params, batch, 4, direction, 3)
  helpers.assert_trees_close(got, want, atol=1e-6)


def test_vasso_and_looksam_axis_name_state_stays_replicated():
  params = helpers.mlp_params()
  batch = helpers.mlp_batch(n=32)
  got, state = _shard_map_run(sam_optax.vasso(_sgd(), rho=0.1, theta=0.5, axis_name="d"),
                              params, batch, 3)

  def vasso_direction(t, shards, w, ema):
    grads = [helpers.np_mlp_loss_and_grad(w, xs, ys)[1] for xs, ys in shards]
    mix = (lambda g: g) if t == 0 else (lambda g: t_map(lambda a, b: 0.5 * a + 0.5 * b, ema, g))
    gps = [helpers.np_mlp_loss_and_grad(t_add(w, t_map(lambda v: 0.1 * v, t_unit(mix(g)))),
                                        xs, ys)[1] for g, (xs, ys) in zip(grads, shards)]
    return _mean(gps), mix(_mean(grads))

  want = np_per_device_trajectory(params, batch, 4, vasso_direction, 3)
  helpers.assert_trees_close(got, want, atol=1e-6)
  # LookSAM: g_v from device-mean gradients; its state comes out replicated (P()).
  got, state = _shard_map_run(sam_optax.looksam(_sgd(), rho=0.1, k=2, axis_name="d"),
                              params, batch, 3)

  def look_direction(t, shards, w, g_v):
    grads = [helpers.np_mlp_loss_and_grad(w, xs, ys)[1] for xs, ys in shards]
    g = _mean(grads)
    if t % 2:
      return t_add(g, g_v, 0.7 * t_norm(g) / t_norm(g_v)), g_v
    gp = _mean([helpers.np_mlp_loss_and_grad(
        t_add(w, t_map(lambda v: 0.1 * v, t_unit(gk))), xs, ys)[1]
                for gk, (xs, ys) in zip(grads, shards)])
    return gp, t_add(gp, g, -t_dot(g, gp) / t_dot(g, g))

  want = np_per_device_trajectory(params, batch, 4, look_direction, 3)
  helpers.assert_trees_close(got, want, atol=1e-6)


# --- Scoped perturbations ------------------------------------------------------------------

FLAX_LIKE = {
    "params": {
        "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
        "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
        "block1": {"bn2": {"scale": jnp.ones(2)}, "ln_f": {"bias": jnp.zeros(2)},
                   "Dense_0": {"kernel": jnp.ones((2, 2))}},
        "LayerNorm_1": {"scale": jnp.ones(2)},
        "normal_head": {"kernel": jnp.ones((2, 2))},
    }
}


def test_normalization_params_mask_selects_norm_layers():
  mask = sam_optax.normalization_params_mask(FLAX_LIKE)
  p = mask["params"]
  assert p["BatchNorm_0"] == {"scale": True, "bias": True}
  assert p["LayerNorm_1"] == {"scale": True}
  assert p["block1"]["bn2"] == {"scale": True} and p["block1"]["ln_f"] == {"bias": True}
  assert p["Conv_0"] == {"kernel": False, "bias": False}
  assert p["block1"]["Dense_0"] == {"kernel": False}
  # "normal_head" contains "norm" as a word part: documented to match.
  assert p["normal_head"] == {"kernel": True}


def test_sam_on_perturbs_only_normalization_leaves():
  w = {"conv": {"kernel": W["kernel"]}, "bn": {"bias": W["bias"]}}
  loss = lambda p: quad_loss({"kernel": p["conv"]["kernel"], "bias": p["bn"]["bias"]})
  tx = sam_optax.gap_guided_sharpness_aware(
      0.1, alpha=0.0, mask=sam_optax.normalization_params_mask)
  g = jax.grad(loss)(w)
  u, state = tx.update(g, tx.init(w), w, loss_fn=loss)
  eps = jax.tree.map(lambda a, b: np.asarray(a - b), u, g)
  np.testing.assert_array_equal(eps["conv"]["kernel"], 0.0)
  gb = np.asarray(g["bn"]["bias"], np.float64)
  np.testing.assert_allclose(eps["bn"]["bias"], 0.1 * gb / np.linalg.norm(gb), atol=1e-6)
  assert float(sam_optax.get_info(state).perturbation_norm) == pytest.approx(0.1)


def test_per_leaf_rho_scale_and_path_mask():
  g = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.grad(quad_loss)(W))
  unit = t_unit(g)
  scale = {"kernel": 2.0, "bias": 0.0}
  (eps,), _ = eps_of(sam_optax.interval_sharpness_aware(0.1, k=1, rho_scale=scale))
  np.testing.assert_allclose(eps["kernel"], 0.2 * unit["kernel"], atol=1e-6)
  np.testing.assert_array_equal(eps["bias"], 0.0)
  # The same as a callable built from the leaves' paths.
  by_path = sam_optax.path_mask(lambda path, leaf: 2.0 if path[-1] == "kernel" else 0.0)
  (eps2,), _ = eps_of(sam_optax.interval_sharpness_aware(0.1, k=1, rho_scale=by_path))
  helpers.assert_trees_close(eps2, eps, atol=0)
  # A mask excludes the leaf from the normalization too; rho_scale=0 does not.
  (eps3,), _ = eps_of(sam_optax.interval_sharpness_aware(
      0.1, k=1, mask={"kernel": True, "bias": False}))
  gk = g["kernel"]
  np.testing.assert_allclose(eps3["kernel"], 0.1 * gk / np.linalg.norm(gk), atol=1e-6)


def test_track_cosine_passes_through():
  _, state = eps_of(sam_optax.adaptive_sharpness_aware(0.5, track_cosine=True))
  assert np.isfinite(float(sam_optax.get_info(state).cosine))
  _, state = eps_of(sam_optax.adaptive_sharpness_aware(0.5))
  assert np.isnan(float(sam_optax.get_info(state).cosine))
