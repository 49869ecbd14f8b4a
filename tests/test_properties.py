"""Property tests (hypothesis): invariants of the SAM perturbation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sam_optax

vectors = hnp.arrays(np.float32, st.integers(1, 6),
                     elements=st.floats(-10, 10, width=32, allow_subnormal=False))
rhos = st.floats(0.001, 2.0)

SETTINGS = settings(max_examples=30, deadline=None)


def _eps(g, rho, loss_fn=None, w=None, **kw):
  """The ε the transform used, read back through a linear loss."""
  w = jnp.zeros_like(g) if w is None else w
  # For a linear loss L(w) = <c, w>, ∇L(w + ε) = c, so read ε via a loss
  # whose gradient is w itself: L = ½‖w‖², ∇L(w + ε) = w + ε.
  loss_fn = loss_fn or (lambda w: 0.5 * jnp.sum(w ** 2))
  tx = sam_optax.sharpness_aware(rho, **kw)
  u, state = tx.update(g, tx.init(w), w, loss_fn=loss_fn)
  return u - w, state


@SETTINGS
@given(vectors, rhos)
def test_epsilon_norm_is_rho_for_nonzero_gradient(g, rho):
  g = jnp.asarray(g)
  eps, state = _eps(g, rho)
  norm = float(np.linalg.norm(np.asarray(g, np.float64)))
  if not 1e-18 < norm < 1e18:  # zero, or ‖g‖² outside float32's range
    assert float(jnp.linalg.norm(eps)) == 0.0
  else:
    np.testing.assert_allclose(jnp.linalg.norm(eps), rho, rtol=1e-5)
    np.testing.assert_allclose(sam_optax.get_info(state).perturbation_norm, rho, rtol=1e-5)


@SETTINGS
@given(vectors, st.floats(0.01, 100.0))
def test_scaling_the_loss_leaves_epsilon_unchanged(g, c):
  g = jnp.asarray(g)
  w = jnp.linspace(-1.0, 1.0, g.shape[0])
  e1, _ = _eps(g, 0.1, w=w)
  # Scaling the loss by c scales its gradient by c; ε = ρ g/‖g‖ is unchanged.
  e2, _ = _eps(c * g, 0.1, w=w)
  np.testing.assert_allclose(e1, e2, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(vectors)
def test_rho_zero_is_identity_on_the_gradient(g):
  g = jnp.asarray(g)
  w = jnp.linspace(-1.0, 1.0, g.shape[0])
  loss_fn = lambda w: jnp.sum(jnp.sin(w))
  g = jax.grad(loss_fn)(w) + 0.0 * g
  tx = sam_optax.sam(optax.sgd(0.1), rho=0.0)
  u, _ = tx.update(g, tx.init(w), w, loss_fn=loss_fn)
  np.testing.assert_array_equal(u, -0.1 * g)


@SETTINGS
@given(vectors, rhos)
def test_deterministic(g, rho):
  g = jnp.asarray(g)
  a, _ = _eps(g, rho)
  b, _ = _eps(g, rho)
  np.testing.assert_array_equal(a, b)


@SETTINGS
@given(vectors, rhos)
@example(np.array([3.3e-32], np.float32), 1.0)  # ‖g‖² underflows in float32
@example(np.array([5.95e-37, -1e-30], np.float32), 0.015625)
@example(np.array([3e20, -1e21], np.float32), 0.5)  # ‖g‖² overflows
def test_epsilon_points_along_gradient(g, rho):
  g = jnp.asarray(g)
  eps, _ = _eps(g, rho)
  g64 = np.asarray(g, np.float64)  # the reference in float64
  norm = float(np.linalg.norm(g64))
  if 1e-18 < norm < 1e18:
    np.testing.assert_allclose(eps, rho * g64 / norm, rtol=1e-4, atol=1e-6)
  else:
    # ‖g‖² outside float32's range: documented as ε = 0 (a base step).
    np.testing.assert_array_equal(eps, np.zeros_like(eps))
