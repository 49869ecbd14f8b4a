"""Diagnostics against closed forms, dense references and brute force."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import diagnostics
from tests import helpers

# --- Quadratics with a known spectrum on a pytree. ---------------------------

SHAPES = {"a": (3, 4), "b": (5,)}  # 17 parameters
DIM = 17


def _unravel(vec, dtype=jnp.float32):
  a = vec[:12].reshape(3, 4)
  b = vec[12:]
  return {"a": a.astype(dtype), "b": b.astype(dtype)}


def _ravel(params):
  return jnp.concatenate([jnp.ravel(params["a"]), jnp.ravel(params["b"])])


def _quadratic_matrix(spectrum, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  return (q * np.asarray(spectrum, np.float64)) @ q.T


def _quadratic_loss(params, h, c, lin):
  """``L(w) = ½ (w − c)ᵀ H (w − c) + linᵀw`` on the raveled pytree."""
  w = _ravel(params).astype(jnp.float32)
  d = w - c
  return 0.5 * d @ (h @ d) + lin @ w


def _quadratic(spectrum, seed=0):
  h = _quadratic_matrix(spectrum, seed)
  rng = np.random.default_rng(seed + 100)
  c, lin = (jnp.asarray(rng.normal(size=DIM), jnp.float32) for _ in range(2))
  h32 = jnp.asarray(h, jnp.float32)
  return (lambda params: _quadratic_loss(params, h32, c, lin)), h


def _params(dtype=jnp.float32, seed=1):
  rng = np.random.default_rng(seed)
  return _unravel(jnp.asarray(rng.normal(size=DIM)), dtype)


SPECTRA = {
    "positive": np.r_[10.0, 6.0, np.linspace(4.0, 0.1, DIM - 2)],
    "negative_dominates": np.r_[3.0, 1.0, np.linspace(0.5, -2.0, DIM - 3), -20.0],
    "all_negative": np.r_[-0.5, np.linspace(-1.0, -5.0, DIM - 2), -12.0],
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("method,num_iters", [("lanczos", DIM), ("lanczos", 40),
                                              ("power", 300)])
def test_top_eigenvalue_on_known_spectra(dtype, method, num_iters):
  # bf16 params: a bf16 Hessian-vector product would be off by ~1e-2, so
  # 1e-4 also checks that the curvature is computed in f32.
  rng = np.random.default_rng(7)
  c, lin = (jnp.asarray(rng.normal(size=DIM), jnp.float32) for _ in range(2))

  @jax.jit  # one compilation for all spectra (the Hessian is an argument)
  def top(h, params):
    return diagnostics.hessian_top_eigenvalue(
        lambda p: _quadratic_loss(p, h, c, lin), params, num_iters=num_iters,
        method=method, key=jax.random.key(3))

  for name, spectrum in SPECTRA.items():
    h = _quadratic_matrix(spectrum)
    got = top(jnp.asarray(h, jnp.float32), _params(dtype))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np.linalg.eigvalsh(h)[-1], rtol=1e-4,
                               err_msg=name)
  assert top._cache_size() == 1  # pylint: disable=protected-access


def test_repeated_eigenvalues_give_no_spurious_zero():
  # Lanczos breaks down after two steps (two distinct eigenvalues); a restart
  # must not put a 0 into the spectrum, which would exceed λ_max = −1 here.
  diag = jnp.array([-1.0, -1.0, -1.0, -3.0, -3.0, -3.0])
  loss = lambda w: 0.5 * jnp.sum(diag * w ** 2)
  for method in ("lanczos", "power"):
    got = diagnostics.hessian_top_eigenvalue(loss, jnp.ones(6), num_iters=6,
                                             method=method)
    np.testing.assert_allclose(float(got), -1.0, rtol=1e-5)
  vals = diagnostics.hessian_top_eigenvalues(loss, jnp.ones(6), k=6, num_iters=6)
  np.testing.assert_allclose(vals, [-1, -1, -1, -3, -3, -3], rtol=1e-5)


def test_top_eigenvalue_of_mlp_matches_dense_hessian():
  params = helpers.mlp_params()
  batch = helpers.mlp_batch()
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  dense = jax.jit(jax.hessian(lambda v: helpers.mlp_loss(unravel(v), batch)))(flat)
  want = np.linalg.eigvalsh(np.asarray(dense, np.float64))
  loss = lambda p: helpers.mlp_loss(p, batch)
  top3 = diagnostics.hessian_top_eigenvalues(loss, params, k=3, num_iters=40)
  np.testing.assert_allclose(top3, want[::-1][:3], rtol=1e-4, atol=1e-6)
  # Hessian-vector product against the dense Hessian.
  v = jax.tree.map(jnp.ones_like, params)
  hv = diagnostics.hessian_vector_product(loss, params, v)
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hv)[0],
                             dense @ jnp.ones_like(flat), rtol=1e-5, atol=1e-6)


# --- Top-k and trace on a known diagonal Hessian. -----------------------------

DIAG = {"u": jnp.array([[9.0, -1.0], [3.0, 0.5]], jnp.float32),
        "v": jnp.array([7.0, 5.0, -4.0], jnp.float32)}


def _diag_loss(params):
  return 0.5 * sum(jnp.sum(DIAG[k] * params[k] ** 2) for k in DIAG)


def _diag_params():
  return {"u": jnp.ones((2, 2), jnp.float32), "v": jnp.ones(3, jnp.float32)}


def test_top_k_on_diagonal_hessian():
  vals, vecs = diagnostics.hessian_top_eigenvalues(
      _diag_loss, _diag_params(), k=3, num_iters=7, return_eigenvectors=True)
  np.testing.assert_allclose(vals, [9.0, 7.0, 5.0], rtol=1e-5)
  # The eigenvectors are the coordinate vectors of 9, 7 and 5 (up to sign).
  expected = [("u", (0, 0)), ("v", (0,)), ("v", (1,))]
  for i, (leaf, index) in enumerate(expected):
    vec = {k: np.asarray(x[i]) for k, x in vecs.items()}
    norm = np.sqrt(sum(np.sum(x ** 2) for x in vec.values()))
    np.testing.assert_allclose(norm, 1.0, rtol=1e-5)
    np.testing.assert_allclose(abs(vec[leaf][index]), 1.0, rtol=1e-5)
  assert vecs["u"].shape == (3, 2, 2) and vecs["v"].shape == (3, 3)


def test_hessian_vector_product_is_f32_for_bf16_params():
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _diag_params())
  v = {"u": jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.bfloat16), "v": jnp.ones(3, jnp.bfloat16)}
  hv = diagnostics.hessian_vector_product(_diag_loss, p16, v)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(hv))
  np.testing.assert_allclose(hv["u"], DIAG["u"] * v["u"].astype(jnp.float32))
  np.testing.assert_allclose(hv["v"], DIAG["v"])


def test_trace_exact_on_diagonal_hessian():
  # For a diagonal Hessian, zᵀHz = tr H for every Rademacher probe.
  want = float(sum(jnp.sum(d) for d in DIAG.values()))
  for s in (1, 5):
    got = diagnostics.hessian_trace(_diag_loss, _diag_params(), num_samples=s,
                                    key=jax.random.key(s))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_trace_unbiased_on_dense_hessian():
  loss, h = _quadratic(SPECTRA["positive"])
  n = 2000
  got = float(diagnostics.hessian_trace(loss, _params(), num_samples=n))
  off = h - np.diag(np.diag(h))
  stderr = np.sqrt(2 * np.sum(off ** 2) / n)
  assert abs(got - np.trace(h)) < 4 * stderr, (got, np.trace(h), stderr)


# --- Under jit and a mesh. ----------------------------------------------------

def _sharded_problem():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(16, 8)) / 4, jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)) * 0.1, jnp.float32)}
  x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)

  def loss(p, batch=(x, y)):
    xb, yb = batch
    return jnp.mean((jnp.tanh(xb @ p["w"] + p["b"]) - yb) ** 2)

  return params, (x, y), loss


def _measure(p, batch):
  loss = _sharded_problem()[2]
  f = lambda q: loss(q, batch)
  return (diagnostics.hessian_top_eigenvalue(f, p, num_iters=20),
          diagnostics.hessian_trace(f, p, num_samples=8),
          diagnostics.m_sharpness(loss, p, batch, rho=0.1, m=4, ascent_steps=2))


@functools.lru_cache(maxsize=None)
def _measure_unsharded():
  params, batch, _ = _sharded_problem()
  return jax.jit(_measure)(params, batch)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_under_a_mesh_matches_unsharded(axis_type):
  params, batch, loss = _sharded_problem()
  kind = {"auto": jax.sharding.AxisType.Auto,
          "explicit": jax.sharding.AxisType.Explicit}[axis_type]
  mesh = jax.make_mesh((8,), ("d",), axis_types=(kind,))
  P = jax.sharding.PartitionSpec
  if axis_type == "auto":  # params and batch sharded, GSPMD propagates.
    w_spec, b_spec, batch_spec = P("d", None), P(), P("d", None)
  else:  # explicit: params sharded over their output axis, batch replicated.
    w_spec, b_spec, batch_spec = P(None, "d"), P("d"), P()
  sharded = {"w": jax.device_put(params["w"], jax.NamedSharding(mesh, w_spec)),
             "b": jax.device_put(params["b"], jax.NamedSharding(mesh, b_spec))}
  sbatch = jax.device_put(batch, jax.NamedSharding(mesh, batch_spec))

  want = _measure_unsharded()
  with jax.set_mesh(mesh):
    got = jax.jit(_measure)(sharded, sbatch)
  for g, w in zip(got, want):
    np.testing.assert_allclose(float(g), float(w), rtol=1e-5)
  assert float(want[0]) > 0


def test_jit_compiles_once_and_accepts_traced_rho_and_key():
  params, batch, loss = _sharded_problem()
  f = jax.jit(lambda p, key, rho: (
      diagnostics.hessian_top_eigenvalue(lambda q: loss(q, batch), p, key=key),
      diagnostics.m_sharpness(loss, p, batch, rho=rho, m=8)))
  for i in range(3):
    f(params, jax.random.key(i), 0.05 * i)
  assert f._cache_size() == 1  # pylint: disable=protected-access


# --- m-sharpness against brute force. -----------------------------------------

def _np_group_loss(w, x, y):
  return np.mean((x @ w - y) ** 2)


def _np_brute_force_m_sharpness(w, x, y, rho, m, points=200_001):
  """Max over the ρ-circle (the max of a convex loss is on the boundary)."""
  theta = np.linspace(0, 2 * np.pi, points)
  eps = rho * np.stack([np.cos(theta), np.sin(theta)], 1)  # [points, 2]
  out = []
  for k in range(len(x) // m):
    xk, yk = x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]
    base = _np_group_loss(w, xk, yk)
    r = (w + eps) @ xk.T - yk  # [points, m]
    out.append(np.max(np.mean(r ** 2, 1)) - base)
  return np.mean(out)


def _np_one_step_m_sharpness(w, x, y, rho, m):
  out = []
  for k in range(len(x) // m):
    xk, yk = x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]
    g = 2 * xk.T @ (xk @ w - yk) / m
    eps = rho * g / np.linalg.norm(g)
    out.append(max(_np_group_loss(w + eps, xk, yk) - _np_group_loss(w, xk, yk), 0.0))
  return np.mean(out)


def _regression(n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 2))
  y = rng.normal(size=n)
  w = rng.normal(size=2) * 0.3
  return w, x, y


def _sq_loss(w, chunk):
  xb, yb = chunk
  return jnp.mean((xb @ w - yb) ** 2)


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_m_sharpness_matches_brute_force(m):
  w, x, y = _regression()
  rho = 0.3
  args = (jnp.asarray(w, jnp.float32),
          (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  truth = _np_brute_force_m_sharpness(w, x, y, rho, m)
  one = float(diagnostics.m_sharpness(_sq_loss, *args, rho=rho, m=m))
  np.testing.assert_allclose(one, _np_one_step_m_sharpness(w, x, y, rho, m),
                             rtol=1e-5, atol=1e-6)
  assert one <= truth + 1e-6
  many = float(diagnostics.m_sharpness(_sq_loss, *args, rho=rho, m=m,
                                       ascent_steps=30))
  assert one - 1e-6 <= many <= truth + 1e-6
  np.testing.assert_allclose(many, truth, rtol=1e-4)


def test_m_sharpness_one_step_is_exact_for_a_linear_loss():
  # L_k(w) = −mean_i y_i x_i·w is linear: the max over the ball is ρ‖c_k‖.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 3))
  y = rng.choice([-1.0, 1.0], size=12)
  loss = lambda w, chunk: -jnp.mean(chunk[1] * (chunk[0] @ w))
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  for m in (1, 3, 4, 12, None):
    mm = 12 if m is None else m
    c = [(y[k * mm:(k + 1) * mm, None] * x[k * mm:(k + 1) * mm]).mean(0)
         for k in range(12 // mm)]
    want = 0.2 * np.mean([np.linalg.norm(v) for v in c])
    got = diagnostics.m_sharpness(loss, jnp.zeros(3, jnp.float32), batch, rho=0.2, m=m)
    np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-7)
  # Smaller groups are sharper (Jensen): the ordering of the paper.
  vals = [float(diagnostics.m_sharpness(loss, jnp.zeros(3, jnp.float32), batch,
                                        rho=0.2, m=m))
          for m in (1, 4, 12)]
  assert vals[0] > vals[1] > vals[2]


def test_m_sharpness_zero_radius_and_zero_gradient():
  w, x, y = _regression()
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  assert float(diagnostics.m_sharpness(_sq_loss, jnp.asarray(w, jnp.float32), batch,
                                       rho=0.0, m=2, ascent_steps=3)) == 0.0
  flat = lambda w, chunk: jnp.sum(w) * 0.0 + jnp.mean(chunk[1])
  got = diagnostics.m_sharpness(flat, jnp.zeros(2, jnp.float32), batch, rho=0.5, m=2,
                                ascent_steps=3)
  assert float(got) == 0.0


# --- Step statistics. ----------------------------------------------------------

def test_step_statistics_by_hand():
  a = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
  rho = 0.3

  def loss(params):
    w = jnp.concatenate([params["x"], params["y"][None]])
    return 0.5 * w @ (jnp.asarray(a, jnp.float32) @ w) + w[0]

  params = {"x": jnp.array([1.0, -2.0], jnp.float32), "y": jnp.array(0.5, jnp.float32)}
  w = np.array([1.0, -2.0, 0.5])
  np_loss = lambda v: 0.5 * v @ a @ v + v[0]
  np_grad = lambda v: a @ v + np.array([1.0, 0.0, 0.0])
  g = np_grad(w)
  eps = rho * g / np.linalg.norm(g)
  g_sam = np_grad(w + eps)
  want = {
      "loss": np_loss(w),
      "perturbed_loss": np_loss(w + eps),
      "sharpness": np_loss(w + eps) - np_loss(w),
      "grad_norm": np.linalg.norm(g),
      "perturbation_norm": rho,
      "perturbed_grad_norm": np.linalg.norm(g_sam),
      "cosine": g @ g_sam / (np.linalg.norm(g) * np.linalg.norm(g_sam)),
      "rho": rho,
  }
  tx = optax.chain(optax.add_decayed_weights(0.0),
                   sam_optax.sam(optax.sgd(0.1), rho=rho, track_cosine=True))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss, value=value)
    return optax.apply_updates(params, updates), state, \
        diagnostics.step_statistics(state, prefix="sam/")

  _, state, stats = step(params, state)
  assert sorted(stats) == sorted("sam/" + k for k in want)
  for k, v in want.items():
    assert stats["sam/" + k].dtype == jnp.float32 and stats["sam/" + k].shape == ()
    np.testing.assert_allclose(float(stats["sam/" + k]), v, rtol=1e-6, atol=1e-6)
  # The same from the SAMInfo itself, and outside jit.
  direct = diagnostics.step_statistics(sam_optax.get_info(state))
  for k, v in want.items():
    np.testing.assert_allclose(float(direct[k]), v, rtol=1e-6, atol=1e-6)


# --- Feature reliance. ---------------------------------------------------------

def _np_ridge_probe_accuracy(x, y, xt, yt, c, l2):
  x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
  t = np.eye(c)[y]
  mx, mt = x.mean(0), t.mean(0)
  xc, tc = x - mx, t - mt
  d = x.shape[1]
  lam = l2 * np.sum(xc ** 2) / d
  w = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ tc)
  return np.mean(np.argmax((xt - mx) @ w + mt, 1) == yt)


def test_linear_probe_matches_numpy_ridge():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 6))
  y = rng.integers(0, 3, 120)
  x[:, 0] += 1.5 * y  # class signal in one coordinate, plus noise
  xtr, ytr, xte, yte = x[:80], y[:80], x[80:], y[80:]
  want = _np_ridge_probe_accuracy(xtr, ytr, xte, yte, 3, 1e-2)
  got = diagnostics.linear_probe_accuracy(
      jnp.asarray(xtr, jnp.float32), jnp.asarray(ytr), test_features=jnp.asarray(xte, jnp.float32),
      test_labels=jnp.asarray(yte), l2=1e-2)
  np.testing.assert_allclose(float(got), want, atol=1e-6)
  assert 0.6 < want < 1.0  # informative features, an imperfect probe
  # Primal (d <= n) and dual (d > n) forms give the same probe.
  wide = rng.normal(size=(30, 50))
  yw = rng.integers(0, 2, 30)
  wide[:, 3] += 2.0 * yw
  ref = _np_ridge_probe_accuracy(wide[:20], yw[:20], wide[20:], yw[20:], 2, 1e-1)
  got = diagnostics.linear_probe_accuracy(
      jnp.asarray(wide[:20], jnp.float32), jnp.asarray(yw[:20]),
      test_features=jnp.asarray(wide[20:], jnp.float32), test_labels=jnp.asarray(yw[20:]),
      l2=1e-1, num_classes=2)
  np.testing.assert_allclose(float(got), ref, atol=1e-6)
  # Constant features: the probe predicts the majority class, no NaN.
  const = diagnostics.linear_probe_accuracy(jnp.zeros((10, 3)), jnp.array([1] * 7 + [0] * 3))
  np.testing.assert_allclose(float(const), 0.7)


def test_feature_reliance_sees_which_block_is_used():
  rng = np.random.default_rng(0)
  n = 400
  y = rng.integers(0, 2, n)
  sign = (2 * y - 1).astype(np.float32)
  noise = rng.normal(size=(n, 4)).astype(np.float32)
  # Inputs [easy (2), hard (2)]; each probe set carries the label in one block.
  easy_only = np.concatenate([sign[:, None] + 0.3 * noise[:, :2], noise[:, 2:]], 1)
  hard_only = np.concatenate([noise[:, :2], 0.5 * sign[:, None] + 0.3 * noise[:, 2:]], 1)
  rep = lambda w, x: jnp.tanh(x @ w)
  probes = {"easy": (jnp.asarray(easy_only), jnp.asarray(y)),
            "hard": (jnp.asarray(hard_only), jnp.asarray(y))}
  uses_easy = jnp.diag(jnp.array([1.0, 1.0, 0.0, 0.0], jnp.float32))  # ignores the hard block
  uses_both = jnp.eye(4, dtype=jnp.float32)
  a = diagnostics.feature_reliance(rep, uses_easy, probes)
  b = diagnostics.feature_reliance(rep, uses_both, probes)
  assert float(a["easy"]) > 0.95 and abs(float(a["hard"]) - 0.5) < 0.1
  assert float(b["easy"]) > 0.95 and float(b["hard"]) > 0.8
  # Under jit with num_classes given.
  c = jax.jit(lambda w: diagnostics.feature_reliance(rep, w, probes, num_classes=2))(uses_easy)
  np.testing.assert_allclose(float(c["hard"]), float(a["hard"]))


def test_block_contributions_by_hand():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(5, 3))
  head = rng.normal(size=(3, 2))
  blocks = {"easy": [0, 1], "hard": slice(2, 5)}
  got = diagnostics.block_contributions(jnp.asarray(kernel), jnp.asarray(head), blocks)
  hn = np.linalg.norm(head, axis=1)
  np.testing.assert_allclose(float(got["easy"]),
                             np.sum(hn * np.linalg.norm(kernel[:2], axis=0)), rtol=1e-6)
  np.testing.assert_allclose(float(got["hard"]),
                             np.sum(hn * np.linalg.norm(kernel[2:], axis=0)), rtol=1e-6)
  # One unit per block: the ratio |v_h|‖w_h‖ / |v_e|‖w_e‖ of the experiment.
  k2 = jnp.array([[3.0, 0.0], [4.0, 0.0], [0.0, 0.6], [0.0, 0.8]])
  v2 = jnp.array([2.0, -0.5])
  mask = np.array([True, True, False, False])
  c = diagnostics.block_contributions(k2, v2, {"easy": mask, "hard": ~mask})
  np.testing.assert_allclose(float(c["hard"] / c["easy"]), (0.5 * 1.0) / (2.0 * 5.0),
                             rtol=1e-6)


# --- Bad input. ----------------------------------------------------------------

Q = lambda w: jnp.sum(w ** 2)
W = jnp.ones(4)
BATCH = (jnp.ones((6, 4)), jnp.ones(6))
CHUNK_LOSS = lambda w, c: jnp.mean((c[0] @ w - c[1]) ** 2)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_bad_num_iters(bad):
  with pytest.raises(ValueError, match=(
      r"`sam_optax.diagnostics.hessian_top_eigenvalue\(num_iters=.*\)`: num_iters "
      r"is the number of Hessian-vector products and must be a positive Python "
      r"integer.*`num_iters=20`")):
    diagnostics.hessian_top_eigenvalue(Q, W, num_iters=bad)


def test_bad_num_samples_k_method():
  with pytest.raises(ValueError, match=r"hessian_trace\(num_samples=0\)`: num_samples"):
    diagnostics.hessian_trace(Q, W, num_samples=0)
  with pytest.raises(ValueError, match=(
      r"hessian_top_eigenvalues\(k=5, num_iters=3\)`: k eigenvalues need at least "
      r"k Lanczos steps and at most as many as there are parameters \(4\)")):
    diagnostics.hessian_top_eigenvalues(Q, W, k=5, num_iters=3)
  with pytest.raises(ValueError, match=r"hessian_top_eigenvalues\(k=0\)`: k is the number"):
    diagnostics.hessian_top_eigenvalues(Q, W, k=0)
  with pytest.raises(ValueError, match=r"method='qr'.*`method='lanczos'`"):
    diagnostics.hessian_top_eigenvalue(Q, W, method="qr")


def test_bad_params_and_loss():
  with pytest.raises(TypeError, match=r"params leaf .* has dtype int32"):
    diagnostics.hessian_top_eigenvalue(lambda w: jnp.sum(w ** 2.0),
                                       jnp.arange(3, dtype=jnp.int32))
  with pytest.raises(ValueError, match=r"`params` has no array leaves"):
    diagnostics.hessian_trace(lambda p: 0.0, {})
  with pytest.raises(ValueError, match=r"must return a scalar loss.*shape \(4,\)"):
    diagnostics.hessian_top_eigenvalue(lambda w: w ** 2, W)
  with pytest.raises(ValueError, match=r"hessian_vector_product`: `vector` must be a "
                     r"pytree of the same structure as `params`"):
    diagnostics.hessian_vector_product(Q, W, [W, W])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_rho(bad):
  with pytest.raises(ValueError, match=(
      r"`sam_optax.diagnostics.m_sharpness\(rho=.*\)`: ρ is the radius of the "
      r"perturbation ball and must be a finite number ≥ 0.*`rho=0.05`")):
    diagnostics.m_sharpness(CHUNK_LOSS, W, BATCH, rho=bad, m=2)


def test_m_not_dividing_batch():
  with pytest.raises(ValueError, match=(
      r"`sam_optax.diagnostics.m_sharpness\(m=4\)`: m \(examples per "
      r"perturbation\) must divide the batch size, but the batch has 6 "
      r"examples. Pick m among the divisors of 6 \(1, 2, 3, 6\)")):
    diagnostics.m_sharpness(CHUNK_LOSS, W, BATCH, rho=0.1, m=4)
  with pytest.raises(ValueError, match=r"m_sharpness\(m=0\)`: m is the number of examples"):
    diagnostics.m_sharpness(CHUNK_LOSS, W, BATCH, rho=0.1, m=0)
  with pytest.raises(ValueError, match=r"ascent_steps=0\)`: ascent_steps is the number"):
    diagnostics.m_sharpness(CHUNK_LOSS, W, BATCH, rho=0.1, m=2, ascent_steps=0)
  for bad in (-1.0, True, float("inf")):
    with pytest.raises(ValueError, match=rf"step_size={bad}\)`: the ascent step size"):
      diagnostics.m_sharpness(CHUNK_LOSS, W, BATCH, rho=0.1, m=2, ascent_steps=2,
                              step_size=bad)
  with pytest.raises(ValueError, match=r"same leading batch axis.*\['5', '6'\]"):
    diagnostics.m_sharpness(CHUNK_LOSS, W, (jnp.ones((6, 4)), jnp.ones(5)), rho=0.1, m=2)


def test_bad_probe_input():
  x = jnp.ones((10, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"`labels` must be a 1-D integer array.*float32"):
    diagnostics.linear_probe_accuracy(x, jnp.ones(10, jnp.float32))
  for bad in (0.0, True, float("nan"), lambda step: 1e-3):
    with pytest.raises(ValueError, match=r"l2=.*\)`: the relative ridge strength"):
      diagnostics.linear_probe_accuracy(x, jnp.zeros(10, jnp.int32), l2=bad)
  with pytest.raises(ValueError, match=r"pass both `test_features` and `test_labels`"):
    diagnostics.linear_probe_accuracy(x, jnp.zeros(10, jnp.int32), test_features=x)
  with pytest.raises(ValueError, match=r"labels are traced.*Pass `num_classes=`"):
    jax.jit(diagnostics.linear_probe_accuracy)(x, jnp.zeros(10, jnp.int32))
  with pytest.raises(ValueError, match=r"train_fraction=1.0\)`.*in \(0, 1\)"):
    diagnostics.feature_reliance(lambda p, x: x, None, {"a": (x, jnp.zeros(10, jnp.int32))},
                                 train_fraction=1.0)
  with pytest.raises(ValueError, match=r"`kernel` of shape \[d_in, hidden\]"):
    diagnostics.block_contributions(jnp.ones((3, 2)), jnp.ones(3), {"a": [0]})
