"""SAM's equations: the transform against a pure-numpy reference and by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers


def _run(tx, params, loss_fn, steps):
  """The trajectory and final state of `steps` jitted steps (no `value=`)."""
  traj, state, _ = helpers.train_steps(tx, params, loss_fn, steps, value=False)
  return traj, state


def test_sam_sgd_matches_numpy_reference_trajectory():
  params, (x, y), loss_fn = helpers.mlp_problem()
  tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
  traj, _ = _run(tx, params, loss_fn, steps=8)
  ref = helpers.np_sam_sgd_trajectory(params, x, y, rho=0.05, lr=0.1,
                                      momentum=0.9, steps=8)
  for got, want in zip(traj, ref):
    helpers.assert_trees_close(got, want, atol=1e-6)
  # The trajectory really differs from plain SGD (the test can fail).
  sgd_traj, _ = _run(sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.0),
                     params, loss_fn, steps=8)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(sgd_traj[-1]), jax.tree.leaves(traj[-1])))
  assert diff > 1e-3


def test_sam_equals_chain_of_block_and_base():
  params, _, loss_fn = helpers.mlp_problem()
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam: decay ** int count
    a, _ = _run(sam_optax.sam(optax.adam(1e-2), rho=0.1), params, loss_fn, 5)
    b, _ = _run(optax.chain(sam_optax.sharpness_aware(0.1), optax.adam(1e-2)),
                params, loss_fn, 5)
  helpers.assert_trees_close(a[-1], b[-1], atol=0)


def test_matches_hand_written_jax_sam_step_exactly():
  params, _, loss_fn = helpers.mlp_problem()
  base = optax.sgd(0.05, momentum=0.9)

  def hand_step(params, state):
    g = jax.grad(loss_fn)(params)
    norm = optax.tree.norm(g)
    eps = jax.tree.map(lambda v: 0.05 * v / norm, g)
    g_sam = jax.grad(loss_fn)(jax.tree.map(jnp.add, params, eps))
    updates, state = base.update(g_sam, state, params)
    return optax.apply_updates(params, updates), state

  ours, _ = _run(sam_optax.sam(base, rho=0.05), params, loss_fn, 5)
  p, s = params, base.init(params)
  for _ in range(5):
    p, s = jax.jit(hand_step)(p, s)
  helpers.assert_trees_close(ours[-1], p, atol=1e-7)


def test_epsilon_and_statistics_by_hand():
  w = jnp.array([3.0, 4.0])
  loss_fn = lambda w: 0.5 * jnp.sum(w ** 2) + w[0]
  g = jax.grad(loss_fn)(w)  # [4, 4]
  tx = sam_optax.sharpness_aware(rho=0.5, track_cosine=True)
  state = tx.init(w)
  value = loss_fn(w)
  u, state = tx.update(g, state, w, loss_fn=loss_fn, value=value)
  eps = 0.5 * g / jnp.linalg.norm(g)
  np.testing.assert_allclose(u, jax.grad(loss_fn)(w + eps), rtol=1e-6)
  info = sam_optax.get_info(state)
  np.testing.assert_allclose(info.perturbation_norm, 0.5, rtol=1e-6)
  np.testing.assert_allclose(info.grad_norm, jnp.linalg.norm(g), rtol=1e-6)
  np.testing.assert_allclose(info.perturbed_loss, loss_fn(w + eps), rtol=1e-6)
  np.testing.assert_allclose(info.loss, value, rtol=1e-6)
  np.testing.assert_allclose(info.sharpness, loss_fn(w + eps) - value, rtol=1e-5)
  np.testing.assert_allclose(info.perturbed_grad_norm, jnp.linalg.norm(u), rtol=1e-6)
  cos = jnp.dot(g, u) / jnp.linalg.norm(g) / jnp.linalg.norm(u)
  np.testing.assert_allclose(info.cosine, cos, rtol=1e-6)
  np.testing.assert_allclose(info.rho, 0.5)
  assert int(state.count) == 1


def test_sharpness_is_nan_without_value():
  w = jnp.array([1.0, 2.0])
  loss_fn = lambda w: jnp.sum(w ** 2)
  tx = sam_optax.sharpness_aware(0.1)
  _, state = tx.update(jax.grad(loss_fn)(w), tx.init(w), w, loss_fn=loss_fn)
  info = sam_optax.get_info(state)
  assert np.isnan(info.sharpness) and np.isnan(info.loss)
  assert np.isnan(info.cosine)  # not tracked unless track_cosine=True
  assert np.isfinite(info.perturbed_loss)


@pytest.mark.parametrize("p", [1.5, 3.0, math.inf])
def test_p_norm_perturbation(p):
  w = jnp.array([1.0, -2.0, 0.5])
  loss_fn = lambda w: jnp.sum(w ** 3) / 3.0
  g = np.asarray(jax.grad(loss_fn)(w), np.float64)
  rho = 0.3
  if p == math.inf:
    eps = rho * np.sign(g)
  else:
    q = p / (p - 1)
    eps = rho * np.sign(g) * np.abs(g) ** (q - 1) / np.sum(np.abs(g) ** q) ** ((q - 1) / q)
  tx = sam_optax.sharpness_aware(rho, p=p)
  u, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(w), w, loss_fn=loss_fn)
  np.testing.assert_allclose(u, (np.asarray(w) + eps) ** 2, rtol=1e-5)
  # ε lies on the p-sphere of radius ρ.
  assert np.isclose(np.linalg.norm(eps, ord=p), rho)


def test_usam_unnormalized():
  w = jnp.array([1.0, -2.0])
  loss_fn = lambda w: jnp.sum(w ** 3) / 3.0
  g = jax.grad(loss_fn)(w)
  tx = sam_optax.sharpness_aware(0.1, normalize=False)
  u, _ = tx.update(g, tx.init(w), w, loss_fn=loss_fn)
  np.testing.assert_allclose(u, (w + 0.1 * g) ** 2, rtol=1e-6)


def test_zero_gradient_gives_zero_epsilon():
  w = {"a": jnp.zeros(3), "b": jnp.ones((2, 2))}
  loss_fn = lambda p: jnp.sum(p["a"] ** 2) + 0.0 * jnp.sum(p["b"])
  g = jax.tree.map(jnp.zeros_like, w)
  for p in (2.0, 3.0, math.inf):
    tx = sam_optax.sam(optax.sgd(0.1), rho=0.05, p=p, track_cosine=True)
    u, state = tx.update(g, tx.init(w), w, loss_fn=loss_fn)
    for leaf in jax.tree.leaves(u):
      assert np.all(np.isfinite(leaf)) and np.all(leaf == 0)
    info = sam_optax.get_info(state)
    assert float(info.perturbation_norm) == 0.0
    assert float(info.cosine) == 0.0


def test_rho_zero_is_exactly_the_base_optimizer():
  params, _, loss_fn = helpers.mlp_problem()
  base = optax.adamw(1e-2, weight_decay=1e-3)
  with jax.numpy_dtype_promotion("standard"):  # optax's AdamW: decay ** int count
    ours, _ = _run(sam_optax.sam(base, rho=0.0), params, loss_fn, 5)
    base_traj, _ = _run(base, params, loss_fn, 5)
  helpers.assert_trees_close(ours[-1], base_traj[-1], atol=0)


def test_rho_schedule_is_followed_and_clamped():
  w = jnp.array([2.0, 1.0])
  loss_fn = lambda w: jnp.sum(w ** 2)
  schedule = lambda count: 0.1 - 0.1 * jnp.asarray(count, jnp.float32)  # 0.1, 0, -0.1 (clamped)
  tx = sam_optax.sharpness_aware(schedule)
  state = tx.init(w)
  rhos = []
  for _ in range(3):
    _, state = tx.update(jax.grad(loss_fn)(w), state, w, loss_fn=loss_fn)
    rhos.append(float(sam_optax.get_info(state).rho))
    assert np.isclose(float(sam_optax.get_info(state).perturbation_norm), rhos[-1])
  np.testing.assert_allclose(rhos, [0.1, 0.0, 0.0], atol=1e-7)


def test_has_aux_loss():
  w = jnp.array([1.0, 2.0])

  def loss_fn(w):
    return jnp.sum(w ** 2), {"stat": w.sum()}

  tx = sam_optax.sam(optax.sgd(0.1), rho=0.1, has_aux=True)
  g, _ = jax.grad(loss_fn, has_aux=True)(w)
  u, state = tx.update(g, tx.init(w), w, loss_fn=loss_fn)
  eps = 0.1 * g / jnp.linalg.norm(g)
  np.testing.assert_allclose(u, -0.1 * 2 * (w + eps), rtol=1e-6)


def test_bf16_params_stay_bf16_and_norms_are_f32():
  params, _, loss_fn = helpers.mlp_problem(dtype=jnp.bfloat16)
  tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
  traj, state = _run(tx, params, loss_fn, 2)
  for leaf in jax.tree.leaves(traj[-1]):
    assert leaf.dtype == jnp.bfloat16
  info = sam_optax.get_info(state)
  for field in info:
    assert field.dtype == jnp.float32
  # ‖ε‖ is ρ up to bf16 rounding of the perturbed params.
  np.testing.assert_allclose(info.perturbation_norm, 0.05, rtol=1e-2)


def test_init_on_shape_dtype_struct():
  params = helpers.mlp_params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = sam_optax.sam(optax.adam(1e-3), rho=0.05)
  state_shape = jax.eval_shape(tx.init, abstract)
  concrete = tx.init(params)
  assert jax.tree.structure(state_shape) == jax.tree.structure(concrete)
  # init itself accepts ShapeDtypeStruct leaves when nothing params-sized is made.
  block_state = sam_optax.sharpness_aware(0.05).init(abstract)
  assert int(block_state.count) == 0
