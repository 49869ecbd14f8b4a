"""The models of the benchmarks: an MLP, a CNN and a pre-norm transformer block.

Each builder returns a :class:`Model`: ``init(key) -> params`` (He-normal
weights, zero biases, in ``dtype``), ``apply(params, x) -> logits`` and the
shape of one example. :data:`SMALL` holds tiny sizes for smoke runs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax


class Model(NamedTuple):
  init: Callable  # key -> params
  apply: Callable  # (params, x) -> logits
  input_shape: tuple[int, ...]


def _dense(key, a, b, dtype):
  return {"w": (jax.random.normal(key, (a, b)) * jnp.sqrt(2.0 / a)).astype(dtype),
          "b": jnp.zeros((b,), dtype)}


def _conv(key, k, cin, cout, dtype):
  w = jax.random.normal(key, (k, k, cin, cout)) * jnp.sqrt(2.0 / (k * k * cin))
  return {"w": w.astype(dtype), "b": jnp.zeros((cout,), dtype)}


def mlp(sizes: Sequence[int] = (784, 512, 512, 512, 10), dtype=jnp.float32) -> Model:
  """ReLU MLP with layer ``sizes`` (input first, classes last)."""

  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense(k, a, b, dtype) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def apply(params, x):
    x = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]

  return Model(init, apply, (sizes[0],))


def cnn(channels: Sequence[int] = (16, 32, 64), image: int = 32, classes: int = 10,
        dtype=jnp.float32) -> Model:
  """3×3 convolutions (ReLU, 2×2 max-pool) on ``image``² RGB, mean-pooled head."""

  def init(key):
    keys = jax.random.split(key, len(channels) + 1)
    params, cin = [], 3
    for k, c in zip(keys, channels):
      params.append(_conv(k, 3, cin, c, dtype))
      cin = c
    return params + [_dense(keys[-1], cin, classes, dtype)]

  def apply(params, x):
    for layer in params[:-1]:
      x = jax.lax.conv_general_dilated(
          x, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jax.nn.relu(x + layer["b"])
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.mean(axis=(1, 2))
    return x @ params[-1]["w"] + params[-1]["b"]

  return Model(init, apply, (image, image, 3))


def transformer(d_model: int = 64, heads: int = 4, seq: int = 32, mlp_ratio: int = 4,
                classes: int = 10, dtype=jnp.float32) -> Model:
  """One pre-norm transformer block (attention + MLP) on a sequence of vectors."""

  def init(key):
    ks = jax.random.split(key, 5)
    norm = lambda: {"scale": jnp.ones((d_model,), dtype), "bias": jnp.zeros((d_model,), dtype)}
    return {
        "ln1": norm(),
        "qkv": _dense(ks[0], d_model, 3 * d_model, dtype),
        "proj": _dense(ks[1], d_model, d_model, dtype),
        "ln2": norm(),
        "fc1": _dense(ks[2], d_model, mlp_ratio * d_model, dtype),
        "fc2": _dense(ks[3], mlp_ratio * d_model, d_model, dtype),
        "head": _dense(ks[4], d_model, classes, dtype),
    }

  def norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

  def apply(params, x):
    b, t, _ = x.shape
    h = norm(params["ln1"], x)
    qkv = (h @ params["qkv"]["w"] + params["qkv"]["b"]).reshape(b, t, 3, heads, d_model // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d_model // heads).astype(x.dtype)
    att = jax.nn.softmax(att.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d_model)
    x = x + out @ params["proj"]["w"] + params["proj"]["b"]
    h = norm(params["ln2"], x)
    h = jax.nn.gelu(h @ params["fc1"]["w"] + params["fc1"]["b"])
    x = x + h @ params["fc2"]["w"] + params["fc2"]["b"]
    return x.mean(1) @ params["head"]["w"] + params["head"]["b"]

  return Model(init, apply, (seq, d_model))


ARCHITECTURES = {"mlp": mlp, "cnn": cnn, "transformer": transformer}

# Tiny versions, for smoke runs (``--quick``).
SMALL = {"mlp": dict(sizes=(64, 32, 32, 10)), "cnn": dict(channels=(8, 16), image=8),
         "transformer": dict(d_model=16, heads=2, seq=8)}


def cross_entropy(apply: Callable) -> Callable:
  """``loss(params, (x, y))``: mean softmax cross-entropy, logits in float32."""

  def loss(params, batch):
    x, y = batch
    logits = apply(params, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def accuracy(apply: Callable) -> Callable:
  """``accuracy(params, (x, y))``: the fraction of arg-max hits."""

  def acc(params, batch):
    x, y = batch
    return jnp.mean((jnp.argmax(apply(params, x), -1) == y).astype(jnp.float32))

  return acc


def n_params(params) -> int:
  return sum(a.size for a in jax.tree.leaves(params))
