"""Fuzz: random chains of optax members around a sharpness-aware block.

Random pytrees (nesting, shapes), dtypes, members before and after the block,
and every method's block. The invariant: the update is finite and matches a
float64 reference, or the call raises an error that names the argument —
never a silent wrong answer.

The reference for the members *before* the block is the documented rule: the
block perturbs along the updates it receives and hands on ∇L(w + ε),
recomputed from ``loss_fn`` (so whatever came before is undone).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sam_optax
from sam_optax._src import registry

SETTINGS = settings(max_examples=40, deadline=None)

_X64 = bool(jax.config.jax_enable_x64)
DTYPES = ("float32", "bfloat16") + (("float64",) if _X64 else ())
TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float64": 1e-12}

# Members before the block: (name, transform, the first step's update in numpy).
PRE = {
    "clip": (lambda: optax.clip_by_global_norm(0.1),
             lambda g, w: [x * min(1.0, 0.1 / _norm(g)) for x in g]),
    "decay": (lambda: optax.add_decayed_weights(0.3),
              lambda g, w: [x + 0.3 * y for x, y in zip(g, w)]),
    "scale": (lambda: optax.scale(2.5), lambda g, w: [2.5 * x for x in g]),
    "adam": (optax.scale_by_adam,
             lambda g, w: [x / (np.abs(x) + 1e-8) for x in g]),
}
POST = {
    "clip": lambda: optax.clip_by_global_norm(1.0),
    "decay": lambda: optax.add_decayed_weights(1e-2),
    "adam": optax.scale_by_adam,
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
}


def _norm(leaves):
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))


@st.composite
def problems(draw):
  """A pytree of random shapes and one dtype, with L(w) = Σ a w²/2 + b w."""
  dtype = draw(st.sampled_from(DTYPES))
  n = draw(st.integers(1, 4))
  shapes = [tuple(draw(st.lists(st.integers(1, 3), max_size=2))) for _ in range(n)]
  seed = draw(st.integers(0, 2 ** 16))
  rng = np.random.default_rng(seed)
  w = [rng.normal(size=s) for s in shapes]
  a = [rng.uniform(0.5, 2.0, size=s) for s in shapes]
  b = [rng.normal(size=s) for s in shapes]
  layout = draw(st.sampled_from(["dict", "list", "nested"]))
  return dtype, layout, w, a, b


def _tree(layout, leaves):
  if layout == "dict":
    return {f"p{i}": x for i, x in enumerate(leaves)}
  if layout == "list":
    return list(leaves)
  return {"block": {"inner": list(leaves[:1]), "rest": tuple(leaves[1:])}}


def _loss(layout, a, b):
  a_t, b_t = _tree(layout, a), _tree(layout, b)

  def loss_fn(params):
    terms = jax.tree.map(
        lambda w, ai, bi: jnp.sum(0.5 * ai * w.astype(jnp.float32) ** 2
                                  + bi * w.astype(jnp.float32)),
        params, a_t, b_t)
    return sum(jax.tree.leaves(terms))

  return loss_fn


def _promotion(members):
  """optax's Adam promotes dtypes (its bias correction); scope that to it."""
  if "adam" in members:
    return jax.numpy_dtype_promotion("standard")
  return contextlib.nullcontext()


def _as(dtype, leaves):
  return [jnp.asarray(x, dtype) for x in leaves]


@SETTINGS
@given(problems(), st.lists(st.sampled_from(sorted(PRE)), max_size=2),
       st.lists(st.sampled_from(sorted(POST)), min_size=1, max_size=3),
       st.floats(0.0, 1.0))
def test_sam_block_in_a_random_chain_matches_the_reference(
    problem, pre, post, rho):
  dtype, layout, w, a, b = problem
  # Round the data to the params' dtype first: the reference starts where the
  # transform starts.
  w = [np.asarray(jnp.asarray(x, dtype), np.float64) for x in w]
  a = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in a]
  b = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in b]
  params = _tree(layout, _as(dtype, w))
  loss_fn = _loss(layout, _as("float32", a), _as("float32", b))
  tx = optax.chain(*[PRE[p][0]() for p in pre],
                   sam_optax.sharpness_aware(rho),
                   *[POST[p]() for p in post])
  grads = jax.grad(loss_fn)(params)
  with _promotion(pre + post):
    updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)

  # The reference, in float64: the block's input, ε along it, ∇L(w + ε).
  g = [ai * x + bi for ai, x, bi in zip(a, w, b)]
  u = g
  for p in pre:
    u = PRE[p][1](u, w)
  scale = rho / _norm(u) if _norm(u) > 0 else 0.0
  g_p = [ai * (x + scale * ui) + bi for ai, x, ui, bi in zip(a, w, u, b)]
  post_tx = optax.chain(*[POST[p]() for p in post])
  with _promotion(post):
    expected, _ = post_tx.update(_tree(layout, _as(dtype, g_p)),
                                 post_tx.init(params), params)
  got, want = jax.tree.leaves(updates), jax.tree.leaves(expected)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for x, y, p in zip(got, want, jax.tree.leaves(params)):
    assert x.dtype == p.dtype
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64),
                               rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


BLOCKS = [m for m in registry.METHODS if m.block is not None]


@SETTINGS
@given(problems(), st.sampled_from(BLOCKS),
       st.lists(st.sampled_from(sorted(POST)), min_size=1, max_size=3),
       st.sampled_from([0.0, 0.05, 0.5]))
def test_every_block_in_a_random_chain_is_finite_and_exact_at_rho_zero(
    problem, method, post, rho):
  dtype, layout, w, a, b = problem
  params = _tree(layout, _as(dtype, w))
  loss_fn = _loss(layout, _as("float32", a), _as("float32", b))
  example = {k: v for k, v in method.example.items() if k != "rho"}
  block = method.block(rho, **example)
  tx = optax.chain(block, *[POST[p]() for p in post])
  grads = jax.grad(loss_fn)(params)
  with _promotion(post):
    updates, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for x, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert x.dtype == p.dtype
    assert bool(jnp.all(jnp.isfinite(x)))
  if rho == 0.0:
    # ρ = 0: every method hands on exactly the gradient at w.
    post_tx = optax.chain(*[POST[p]() for p in post])
    with _promotion(post):
      expected, _ = post_tx.update(grads, post_tx.init(params), params)
    for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(x, np.float64),
                                 np.asarray(y, np.float64),
                                 rtol=TOL[dtype], atol=TOL[dtype])


# Hostile inputs drawn at random: each must raise an error naming the argument.
BAD = [
    ("rho", lambda: sam_optax.sharpness_aware(-0.1), "rho"),
    ("rho", lambda: sam_optax.sharpness_aware(float("nan")), "rho"),
    ("m", lambda: sam_optax.sharpness_aware(0.05, m=0), "m"),
    ("group_loop", lambda: sam_optax.sharpness_aware(0.05, m=2, group_loop="x"),
     "group_loop"),
    ("p", lambda: sam_optax.sharpness_aware(0.05, p=0.5), "p"),
]


@pytest.mark.parametrize("arg,build,word", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_naming_the_argument(arg, build, word):
  del arg
  with pytest.raises((ValueError, TypeError), match=word):
    build()


@SETTINGS
@given(problems(), st.sampled_from(["int", "missing_loss"]))
def test_bad_calls_in_a_random_tree_raise_naming_the_argument(problem, bad):
  dtype, layout, w, a, b = problem
  leaves = _as(dtype, w)
  loss_fn = _loss(layout, _as("float32", a), _as("float32", b))
  tx = optax.chain(sam_optax.sharpness_aware(0.05), optax.sgd(0.1))
  if bad == "int":
    leaves[0] = jnp.zeros(leaves[0].shape, jnp.int32)
    with pytest.raises(TypeError, match="params"):
      tx.init(_tree(layout, leaves))
  else:
    params = _tree(layout, leaves)
    grads = jax.grad(loss_fn)(params)
    with pytest.raises(TypeError, match="loss_fn"):
      tx.update(grads, tx.init(params), params)
