"""Hostile input to the diagnostics: float64 params, extreme scales, bad data.

One test per reproducer of the reliability findings, named after its finding
(F4: float64 params under x64; F11: a loss scaled by 1e±30; F23: input
validation). Every test states its dtypes, so it holds with x64 off (the
default of the suite) and on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import diagnostics

# --- F4: float64 params under jax_enable_x64. ---------------------------------

# A dense quadratic on a pytree with a known spectrum: L(w) = ½ wᵀHw + cᵀw.
_SPECTRUM = np.array([4.0, 2.5, 1.0, 0.5, -0.25, -1.5])
_DIM = len(_SPECTRUM)


def _dense_hessian(seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(_DIM, _DIM)))
  return (q * _SPECTRUM) @ q.T


def _tree_quadratic(h, c):
  def loss(p):
    w = jnp.concatenate([jnp.ravel(p["a"]), p["b"].astype(p["a"].dtype)])
    return 0.5 * w @ (h @ w) + c @ w
  return loss


def _tree_params(dtype_a, dtype_b):
  rng = np.random.default_rng(1)
  return {"a": jnp.asarray(rng.normal(size=(2, 2)), dtype_a),
          "b": jnp.asarray(rng.normal(size=(2,)), dtype_b)}


def test_F4_diagnostics_float64_params_under_x64():
  h = _dense_hessian()
  want = np.sort(np.linalg.eigvalsh(h))[::-1]
  with jax.enable_x64(True):
    params = _tree_params(jnp.float64, jnp.float64)
    loss = _tree_quadratic(jnp.asarray(h, jnp.float64),
                           jnp.asarray(np.arange(_DIM) / 7.0, jnp.float64))
    top = diagnostics.hessian_top_eigenvalue(loss, params, num_iters=_DIM)
    power = diagnostics.hessian_top_eigenvalue(loss, params, num_iters=400,
                                               method="power")
    vals, vecs = diagnostics.hessian_top_eigenvalues(
        loss, params, k=3, num_iters=_DIM, return_eigenvectors=True)
    trace = diagnostics.hessian_trace(loss, params, num_samples=3)
    hv = diagnostics.hessian_vector_product(
        loss, params, {"a": jnp.ones((2, 2), jnp.float32),
                       "b": jnp.ones(2, jnp.float32)})
    jitted = jax.jit(lambda p: diagnostics.hessian_top_eigenvalue(
        loss, p, num_iters=_DIM))(params)
  for got in (top, power, vals, trace, jitted, *jax.tree.leaves((hv, vecs))):
    assert got.dtype == jnp.float64
  # float64 accuracy: a float32 computation would be off by ~1e-7.
  np.testing.assert_allclose(float(top), want[0], rtol=1e-12)
  np.testing.assert_allclose(float(jitted), want[0], rtol=1e-12)
  np.testing.assert_allclose(float(power), want[0], rtol=1e-10)
  np.testing.assert_allclose(np.asarray(vals), want[:3], rtol=1e-12)
  np.testing.assert_allclose(np.concatenate([np.ravel(hv["a"]), hv["b"]]),
                             h @ np.ones(_DIM), rtol=1e-12)
  # Hutchinson: zᵀHz for three Rademacher draws, each exact in float64.
  assert abs(float(trace) - np.trace(h)) < 2 * np.abs(h).sum()


def test_F4_diagnostics_trace_float64_exact_on_diagonal():
  d = np.array([3.0, -1.0, 0.25, 7.0])
  with jax.enable_x64(True):
    dd = jnp.asarray(d, jnp.float64)
    got = diagnostics.hessian_trace(lambda w: 0.5 * jnp.sum(dd * w ** 2),
                                    jnp.ones(4, jnp.float64), num_samples=5)
  assert got.dtype == jnp.float64
  assert float(got) == d.sum()


def test_F4_diagnostics_mixed_and_float32_params_under_x64():
  h = _dense_hessian()
  want = np.linalg.eigvalsh(h)[-1]
  with jax.enable_x64(True):
    loss = _tree_quadratic(jnp.asarray(h, jnp.float64), jnp.zeros(_DIM, jnp.float64))
    mixed = _tree_params(jnp.float64, jnp.float32)
    got_mixed = diagnostics.hessian_top_eigenvalue(loss, mixed, num_iters=_DIM)
    trace_mixed = diagnostics.hessian_trace(loss, mixed, num_samples=2)
    loss32 = _tree_quadratic(jnp.asarray(h, jnp.float32), jnp.zeros(_DIM, jnp.float32))
    f32 = _tree_params(jnp.float32, jnp.float32)
    got32 = diagnostics.hessian_top_eigenvalue(loss32, f32, num_iters=_DIM)
    power32 = diagnostics.hessian_top_eigenvalue(loss32, f32, method="power",
                                                 num_iters=400)
    trace32 = diagnostics.hessian_trace(loss32, f32, num_samples=2)
  assert got_mixed.dtype == trace_mixed.dtype == jnp.float64
  assert got32.dtype == power32.dtype == trace32.dtype == jnp.float32
  np.testing.assert_allclose(float(got_mixed), want, rtol=1e-6)
  np.testing.assert_allclose(float(got32), want, rtol=1e-5)
  np.testing.assert_allclose(float(power32), want, rtol=1e-5)


def test_F4_diagnostics_m_sharpness_float64_under_x64():
  # One normalized ascent step per group, against a float64 numpy reference.
  rng = np.random.default_rng(2)
  x, y, w = rng.normal(size=(8, 3)), rng.normal(size=8), rng.normal(size=3)
  rho, m = 0.1, 4

  def np_loss(w, xb, yb):
    return np.mean((xb @ w - yb) ** 2)

  want = []
  for k in range(len(x) // m):
    xb, yb = x[k * m:(k + 1) * m], y[k * m:(k + 1) * m]
    g = 2 * xb.T @ (xb @ w - yb) / m
    want.append(np_loss(w + rho * g / np.linalg.norm(g), xb, yb) - np_loss(w, xb, yb))
  with jax.enable_x64(True):
    got = diagnostics.m_sharpness(
        lambda w, c: jnp.mean((c[0] @ w - c[1]) ** 2), jnp.asarray(w, jnp.float64),
        (jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)), rho=rho, m=m)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-12)


# --- F11: Lanczos and power iteration at any scale. ---------------------------

_DIAG = np.array([3.0, 2.0, 1.0, 0.5])


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_F11_lanczos_top_eigenvalue_of_a_scaled_quadratic(scale):
  # β of 1e±30 squared leaves float32's range; it used to read as a breakdown
  # and λ_max came out 27% low.
  d = jnp.asarray(_DIAG, jnp.float32)
  loss = lambda p: scale * (0.5 * jnp.sum(d * p ** 2))
  w = jnp.ones(4, jnp.float32)
  for method, num_iters in (("lanczos", 4), ("power", 60)):
    got = diagnostics.hessian_top_eigenvalue(loss, w, num_iters=num_iters,
                                             method=method)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), 3.0 * scale, rtol=1e-5, err_msg=method)
  vals = diagnostics.hessian_top_eigenvalues(loss, w, k=4, num_iters=4)
  np.testing.assert_allclose(np.asarray(vals, np.float64), _DIAG * scale, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_F11_lanczos_dense_hessian_at_extreme_scale(scale):
  # Same Ritz values, times the scale, as at scale 1 (relative breakdown test).
  h = _dense_hessian(3)
  h32 = jnp.asarray(h, jnp.float32)
  loss = lambda p: scale * (0.5 * p @ (h32 @ p))
  w = jnp.asarray(np.random.default_rng(4).normal(size=_DIM), jnp.float32)
  vals = diagnostics.hessian_top_eigenvalues(loss, w, k=_DIM, num_iters=_DIM)
  np.testing.assert_allclose(np.asarray(vals, np.float64) / scale, _SPECTRUM,
                             rtol=1e-5, atol=1e-5)


def test_F11_m_sharpness_tiny_gradient():
  # A linear loss: one step of length ρ gives exactly ρ‖g‖; ‖g‖² = 4e-50
  # underflows float32, which used to give ε = 0 and 0 sharpness.
  g = 1e-25
  loss = lambda w, chunk: g * jnp.sum(w) + 0.0 * jnp.sum(chunk)
  got = diagnostics.m_sharpness(loss, jnp.zeros(4, jnp.float32),
                                jnp.ones((2, 1), jnp.float32), rho=0.5, m=None)
  np.testing.assert_allclose(float(got), 0.5 * g * 2.0, rtol=1e-6)


# --- F23: input validation. ----------------------------------------------------

Q32 = lambda p: jnp.sum(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(p)]) ** 2)


def test_F23_zero_size_only_leaf():
  empty = jnp.zeros((0,), jnp.float32)
  msg = r"`params` has no array leaves, or only leaves of size 0"
  for fn in (lambda: diagnostics.hessian_top_eigenvalue(jnp.sum, empty),
             lambda: diagnostics.hessian_top_eigenvalue(jnp.sum, empty, method="power"),
             lambda: diagnostics.hessian_top_eigenvalues(jnp.sum, {"a": empty}, k=1),
             lambda: diagnostics.hessian_trace(jnp.sum, [empty, jnp.zeros((3, 0))]),
             lambda: diagnostics.hessian_vector_product(jnp.sum, empty, empty)):
    with pytest.raises(ValueError, match=r"sam_optax.diagnostics.hessian_.*" + msg):
      fn()
  with pytest.raises(ValueError, match=r"m_sharpness`: " + msg):
    diagnostics.m_sharpness(lambda w, c: jnp.sum(w) + jnp.sum(c), empty,
                            jnp.ones((2, 1), jnp.float32), rho=0.1, m=1)
  # A 0-size leaf next to real ones is just no parameters: H = 2 I on the rest.
  params = {"a": jnp.zeros((0, 3), jnp.float32), "b": jnp.ones(3, jnp.float32)}
  assert float(diagnostics.hessian_top_eigenvalue(Q32, params, num_iters=3)) == pytest.approx(2.0)
  assert float(diagnostics.hessian_trace(Q32, params, num_samples=2)) == pytest.approx(6.0)


def _probe_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  return x, y


def test_F23_probe_nan_feature():
  x, y = _probe_data()
  bad = x.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match=(
      r"linear_probe_accuracy`: `features` has 1 non-finite value\(s\) \(NaN or "
      r"±inf\), the first in example 3")):
    diagnostics.linear_probe_accuracy(bad, y)
  bad_test = x.copy()
  bad_test[[5, 7], 0] = np.inf
  with pytest.raises(ValueError, match=r"`test_features` has 2 non-finite.*example 5"):
    diagnostics.linear_probe_accuracy(x, y, test_features=bad_test, test_labels=y)
  # Traced features cannot be checked: the accuracy is NaN, not a number.
  probe = jax.jit(lambda f: diagnostics.linear_probe_accuracy(f, y, num_classes=2))
  assert np.isnan(float(probe(bad)))
  assert 0.5 < float(probe(x)) <= 1.0


def test_F23_probe_negative_label():
  x, y = _probe_data()
  bad = y.copy()
  bad[2] = -1
  with pytest.raises(ValueError, match=(
      r"linear_probe_accuracy`: `labels` must hold class indices 0 ≤ y < "
      r"num_classes \(2\); entry 2 is -1")):
    diagnostics.linear_probe_accuracy(x, bad)
  with pytest.raises(ValueError, match=r"`test_labels` must hold.*\(2\); entry 0 is 2"):
    diagnostics.linear_probe_accuracy(x, y, test_features=x,
                                      test_labels=np.full(20, 2, np.int32),
                                      num_classes=2)
  probe = jax.jit(lambda labels: diagnostics.linear_probe_accuracy(x, labels, num_classes=2))
  assert np.isnan(float(probe(bad)))


def test_F23_block_index_out_of_range():
  kernel, head = jnp.ones((4, 3), jnp.float32), jnp.ones(3, jnp.float32)
  with pytest.raises(ValueError, match=(
      r"block_contributions`: block 'a' lists input index 7, but `kernel` has 4 "
      r"inputs \(rows\); indices must be in \[0, 4\)")):
    diagnostics.block_contributions(kernel, head, {"a": [7]})
  with pytest.raises(ValueError, match=r"block 'b' lists input index -5"):
    diagnostics.block_contributions(kernel, head, {"a": [0], "b": [1, -5]})
  with pytest.raises(ValueError, match=r"block 'a' lists input 1 more than once"):
    diagnostics.block_contributions(kernel, head, {"a": [1, -3]})
  with pytest.raises(TypeError, match=r"coordinates of block 'a' must be a slice.*float"):
    diagnostics.block_contributions(kernel, head, {"a": [0.0, 1.0]})
  # In range, negative indices count from the end, as in numpy.
  k = np.arange(12.0).reshape(4, 3)
  got = diagnostics.block_contributions(jnp.asarray(k, jnp.float32), head, {"a": [-1, 0]})
  np.testing.assert_allclose(float(got["a"]),
                             np.sum(np.linalg.norm(k[[3, 0]], axis=0)), rtol=1e-6)


def test_F23_empty_block():
  kernel = jnp.asarray(np.arange(12.0).reshape(4, 3), jnp.float32)
  head = jnp.array([1.0, -2.0, 0.5], jnp.float32)
  got = diagnostics.block_contributions(
      kernel, head, {"list": [], "slice": slice(2, 2),
                     "mask": np.zeros(4, bool), "all": slice(None)})
  assert float(got["list"]) == float(got["slice"]) == float(got["mask"]) == 0.0
  want = np.sum(np.abs([1.0, -2.0, 0.5]) * np.linalg.norm(np.arange(12.0).reshape(4, 3), axis=0))
  np.testing.assert_allclose(float(got["all"]), want, rtol=1e-6)


def test_F23_feature_reliance_tuple_representation():
  x, y = _probe_data()
  with pytest.raises(TypeError, match=(
      r"feature_reliance`: `representation_fn\(params, inputs\)` must return one "
      r"array of features `\[n, \.\.\.\]`.*probe set 'a' it returned a tuple of "
      r"length 2")):
    diagnostics.feature_reliance(lambda p, v: (v @ p, v), jnp.ones((3, 2), jnp.float32),
                                 {"a": (x, y)})
  with pytest.raises(ValueError, match=(
      r"returned features of shape \(19, 3\) for probe set 'a', whose labels have "
      r"20 entries")):
    diagnostics.feature_reliance(lambda p, v: v[1:], None, {"a": (x, y)})
  with pytest.raises(ValueError, match=r"probe set 'a' must be a pair `\(inputs, labels\)`"):
    diagnostics.feature_reliance(lambda p, v: v, None, {"a": x})
