"""Bad input: each mistake raises a clear error naming the argument and the fix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

W = jnp.array([1.0, 2.0])
LOSS = lambda w: jnp.sum(w ** 2)


def _update(tx, loss_fn=LOSS, params=W, grads=None, **kw):
  grads = jax.grad(LOSS)(W) if grads is None else grads
  return tx.update(grads, tx.init(params), params, loss_fn=loss_fn, **kw)


def test_missing_loss_fn():
  tx = sam_optax.sam(optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"`sam_optax.sam.update` needs the keyword argument `loss_fn`"):
    tx.update(jax.grad(LOSS)(W), tx.init(W), W)


def test_missing_loss_fn_mentions_aux_when_has_aux():
  tx = sam_optax.sharpness_aware(0.05, has_aux=True)
  with pytest.raises(TypeError, match=r"returns `\(loss, aux\)`"):
    tx.update(W, tx.init(W), W)


def test_missing_params():
  tx = sam_optax.sharpness_aware(0.05)
  with pytest.raises(ValueError, match=r"needs `params` \(received None\)"):
    tx.update(W, tx.init(W), None, loss_fn=LOSS)


def test_loss_returns_non_scalar():
  tx = sam_optax.sharpness_aware(0.05)
  with pytest.raises(ValueError, match=r"must return a scalar loss.*shape \(2,\).*jnp.mean"):
    _update(tx, loss_fn=lambda w: w ** 2)


def test_loss_returns_tuple_without_has_aux():
  tx = sam_optax.sharpness_aware(0.05)
  with pytest.raises(TypeError, match=r"returned a tuple of length 2, but `has_aux=False`.*`has_aux=True`"):
    _update(tx, loss_fn=lambda w: (jnp.sum(w ** 2), {"acc": 1.0}))


def test_has_aux_with_bare_scalar():
  tx = sam_optax.sharpness_aware(0.05, has_aux=True)
  with pytest.raises(TypeError, match=r"must return a pair `\(loss, aux\)`, but it returned a single value"):
    _update(tx)


def test_integer_loss():
  tx = sam_optax.sharpness_aware(0.05)
  with pytest.raises(TypeError, match=r"floating-point loss"):
    _update(tx, loss_fn=lambda w: jnp.sum(w).astype(jnp.int32))


@pytest.mark.parametrize("rho", [-0.1, math.nan, math.inf])
def test_bad_rho(rho):
  with pytest.raises(ValueError, match=r"ρ must be a finite number ≥ 0.*rho=0.05"):
    sam_optax.sam(optax.sgd(0.1), rho=rho)
  with pytest.raises(ValueError, match=r"sharpness_aware\(rho="):
    sam_optax.sharpness_aware(rho)


@pytest.mark.parametrize("p", [1, 0.5, -2, math.nan, "two"])
def test_bad_p(p):
  with pytest.raises(ValueError, match=r"p must be > 1"):
    sam_optax.sharpness_aware(0.05, p=p)


def test_usam_with_p():
  with pytest.raises(ValueError, match=r"USAM.*has no norm"):
    sam_optax.sharpness_aware(0.05, normalize=False, p=3)


def test_tree_mismatch():
  params = {"a": W, "b": W}
  tx = sam_optax.sharpness_aware(0.05)
  with pytest.raises(ValueError, match=r"different tree structures"):
    tx.update({"a": W}, tx.init(params), params, loss_fn=lambda p: jnp.sum(p["a"]))


def test_integer_params():
  tx = sam_optax.sam(optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"params leaf \['step'\] has dtype int32.*floating point"):
    tx.init({"w": W, "step": jnp.zeros((), jnp.int32)})


def test_negative_schedule_is_clamped_not_an_error():
  tx = sam_optax.sharpness_aware(lambda count: -1.0)
  u, state = _update(tx)
  np.testing.assert_array_equal(u, jax.grad(LOSS)(W))
  assert float(sam_optax.get_info(state).rho) == 0.0


def test_structural_arg_injected():
  with pytest.raises(TypeError, match=r"`p` is structural.*static_args=\('p',\)"):
    optax.inject_hyperparams(sam_optax.sam)(optax.sgd(0.1), rho=0.05, p=3.0).init(W)


def test_bad_m():
  for m in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match=r"m is the number of examples per perturbation"):
      sam_optax.sharpness_aware(0.05, m=m)


def test_axis_name_not_bound():
  tx = sam_optax.sharpness_aware(0.05, axis_name="batch")
  with pytest.raises(NameError, match=r"no axis named 'batch' is bound here.*`jax.shard_map` or `jax.pmap`.*axis_name=None"):
    jax.jit(lambda: _update(tx))()


def test_get_info_without_sam_block():
  with pytest.raises(ValueError, match=r"expected exactly one sharpness-aware block.*found 0"):
    sam_optax.get_info(optax.sgd(0.1).init(W))


def test_mask_tree_mismatch():
  params = {"a": W, "b": W}
  tx = sam_optax.sharpness_aware(0.05, mask={"a": True})
  with pytest.raises(ValueError, match=r"`mask`: the mask tree does not match the params tree"):
    tx.update(params, tx.init(params), params, loss_fn=lambda p: jnp.sum(p["a"] ** 2))


@pytest.mark.parametrize("value", [
    (jnp.float32(3.0), jnp.float32(1.0)),   # the (loss, aux) pair of has_aux=True
    {"loss": 3.0},
    jnp.ones((1,)),
], ids=["loss-aux-pair", "dict", "shape-1"])
def test_value_must_be_the_scalar_loss(value):
  tx = sam_optax.sam(optax.sgd(0.1), 0.05)
  with pytest.raises(ValueError, match=r"`sam_optax.sam.update\(\.\.\., value=\.\.\.\)`: value is the "
                     r"unperturbed loss L\(w\), a scalar; got a non-scalar \w+.*pass `value=loss`"):
    _update(tx, value=value)
  _update(tx, value=jnp.float32(1.0))  # a scalar is fine


def test_numpy_integer_m_is_accepted_everywhere():
  """`m` is checked by one rule: a numpy integer is a positive integer too."""
  loss = lambda w, c: jnp.mean((c @ w) ** 2)
  w, x = jnp.ones((3,)), jnp.ones((8, 3))
  value, grads, group_grads = sam_optax.group_value_and_grad(loss, np.int64(4))(w, x)
  assert group_grads.shape == (2, 3)
  tx = sam_optax.sam(optax.sgd(0.1), 0.05, m=np.int64(4))
  tx.update(grads, tx.init(w), w, loss_fn=loss, batch=x, group_grads=group_grads, value=value)
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match=r"m is the number of examples per perturbation"):
      sam_optax.group_value_and_grad(loss, bad)
