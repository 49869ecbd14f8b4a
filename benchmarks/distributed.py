"""m-sharpness at every scale: all-reduces per step and step time against SGD.

Runs on the host CPU split into 8 simulated devices (set before JAX starts).
For each setting it builds the jitted training step (gradient, optimizer
update, apply) of SGD with momentum and of SAM around it, then reports

* the number of all-reduce ops in the compiled step (``compiled.as_text()``)
  and how many floats they carry;
* the median step time over interleaved rounds (every step once per round, so
  machine noise hits all alike) and its ratio to SGD in the same setting.

Settings:

- ``jit``: one device, the whole batch; plain SAM (m = batch).
- ``m=…``: one device, in-device m-sharpness, the per-group gradients from
  ``sam_optax.group_value_and_grad`` passed as ``group_grads=`` (two passes);
  ``m=… (no group_grads)`` lets ``update`` recompute them (three passes).
- ``pmap`` / ``shard_map``: 8 devices, one perturbation per device
  (``axis_name``); SGD there all-reduces its gradient once.
- ``shard_map × m=…``: 8 devices and in-device groups.

A second table sweeps in-device m-sharpness over three models (the MLP, and
the CNN and transformer block of ``benchmarks.step_time``), several m and the
three group loops (``group_loop='vmap'|'unroll'|'scan'``), with XLA's FLOPs and
compiled temp memory beside the times (``--models``, ``--loops``).
``--quick`` is a smoke run on tiny models.

Ratios are the result; absolute times depend on the machine (and on other
work running on it). Run ``python -m benchmarks.distributed --help``.
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import time

import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RHO, LR, MOMENTUM = 0.05, 0.05, 0.9
N_DEV = 8

_ALL_REDUCE = re.compile(
    r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.*?)\s+all-reduce(?:-start)?\(")


def all_reduce_ops(compiled_text: str) -> list[str]:
  """Result shapes of every all-reduce op in a compiled HLO module."""
  return [m.group(1) for m in map(_ALL_REDUCE.match, compiled_text.splitlines())
          if m]


def _floats(shape_text: str) -> int:
  total = 0
  for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", shape_text):
    total += int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


# --- Model ---------------------------------------------------------------------


def make_mlp(width: int, depth: int, d_in: int, classes: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), depth + 1)
  sizes = [d_in] + [width] * depth + [classes]
  return [{"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a),
           "b": jnp.zeros((b,))}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def loss(params, batch):
  x, y = batch
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def base():
  return optax.sgd(LR, momentum=MOMENTUM)


# --- Steps -----------------------------------------------------------------------


def single_device_steps(ms, no_group_grads_m):
  """``{name: (tx, step(params, state, batch))}`` on one device.

  The steps of :func:`in_device_steps` for the MLP (``group_loop='vmap'``),
  named for the first table, and SAM with ``m`` that recomputes the per-group
  gradients itself (``no_group_grads_m``).
  """
  names = {("sgd", None, None): "jit: sgd",
           ("sam", None, None): "jit: sam (m = batch)"}
  for m in ms:
    names[("sam", m, "vmap")] = f"jit: sam m={m}"
    names[("sgd-groups", m, "vmap")] = (
        f"jit: sgd, one vectorized pass over groups of m={m}")
  steps = {names[k]: v for k, v in in_device_steps(loss, ms, ["vmap"]).items()}
  if no_group_grads_m:
    m = no_group_grads_m
    tx = sam_optax.sam(base(), RHO, m=m)

    def m3_step(params, state, batch):
      grads = jax.grad(loss)(params, batch)
      updates, state = tx.update(grads, state, params, loss_fn=loss, batch=batch)
      return optax.apply_updates(params, updates), state

    steps[f"jit: sam m={m} (no group_grads)"] = (tx, jax.jit(m3_step))
  return steps


def _mapped_bodies(axis, m=None):
  sgd = base()

  def sgd_body(params, state, batch):
    grads = jax.grad(loss)(sam_optax.per_device(params, axis) if axis == "s" else params, batch)
    grads = jax.lax.pmean(grads, axis)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  tx = sam_optax.sam(base(), RHO, axis_name=axis, m=m)

  def sam_body(params, state, batch):
    w = sam_optax.per_device(params, axis)
    if m is None:
      loss_fn = lambda p: loss(p, batch)
      grads = jax.grad(loss_fn)(w)
      updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
    else:
      _, grads, group_grads = sam_optax.group_value_and_grad(loss, m)(w, batch)
      updates, state = tx.update(grads, state, params, loss_fn=loss,
                                 batch=batch, group_grads=group_grads)
    return optax.apply_updates(params, updates), state

  return (sgd, sgd_body), (tx, sam_body)


def pmap_steps():
  (sgd, sgd_body), (tx, sam_body) = _mapped_bodies("p")
  return {"pmap: sgd": (sgd, jax.pmap(sgd_body, axis_name="p")),
          "pmap: sam": (tx, jax.pmap(sam_body, axis_name="p"))}


def shard_map_steps(mesh, ms):
  out = {}
  wrap = lambda f: jax.jit(jax.shard_map(
      f, mesh=mesh, in_specs=(P(), P(), P("s")), out_specs=(P(), P())))
  (sgd, sgd_body), (tx, sam_body) = _mapped_bodies("s")
  out["shard_map: sgd"] = (sgd, wrap(sgd_body))
  out["shard_map: sam"] = (tx, wrap(sam_body))
  for m in ms:
    _, (tx, body) = _mapped_bodies("s", m)
    out[f"shard_map: sam × m={m}"] = (tx, wrap(body))
  return out


# --- In-device m across models and group loops ---------------------------------

# model name -> (builder kwargs, batch, m values). The MLP is the one above; the
# CNN and the transformer block are those of ``benchmarks.step_time``.
IN_DEVICE_MODELS = {
    "mlp": (dict(), 256, (128, 64, 32)),
    "cnn": (dict(channels=(16, 32, 64), image=32), 64, (32, 16)),
    "transformer": (dict(d_model=64, heads=4, seq=32), 64, (16, 8)),
}
QUICK_MODELS = {
    "mlp": (dict(width=32, depth=2, d_in=16), 32, (8,)),
    "cnn": (dict(channels=(4, 8), image=8), 16, (8,)),
    "transformer": (dict(d_model=16, heads=2, seq=8), 16, (8,)),
}


def _model(name, kwargs, batch, seed=0):
  """``(params, loss(params, (x, y)), (x, y))`` for one model of the sweep."""
  from benchmarks import step_time  # pylint: disable=import-outside-toplevel
  if name == "mlp":
    kw = {"width": 512, "depth": 2, "d_in": 256, **kwargs}
    params = make_mlp(kw["width"], kw["depth"], kw["d_in"], 10, seed)
    shape, fn = (kw["d_in"],), loss
  else:
    params, apply, shape = step_time.MODELS[name](
        jax.random.key(seed), jnp.float32, **kwargs)

    def fn(params, chunk):
      x, y = chunk
      logits = apply(params, x).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  rng = np.random.default_rng(seed)
  data = (jnp.asarray(rng.normal(size=(batch,) + shape), jnp.float32),
          jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32))
  return params, fn, data


def in_device_steps(fn, ms, loops):
  """``{(label, m, loop): (tx, jitted step)}``: SGD, SAM, and SAM with ``m``.

  For every ``(m, loop)`` there is also ``sgd-groups``: SGD whose gradient is
  the mean of the per-group gradients, computed with the same loop (one pass
  over the same groups), to price that pass on its own.
  """
  sgd = base()

  def sgd_step(params, state, batch):
    updates, state = sgd.update(jax.grad(fn)(params, batch), state, params)
    return optax.apply_updates(params, updates), state

  sam = sam_optax.sam(base(), RHO)

  def sam_step(params, state, batch):
    loss_fn = lambda p: fn(p, batch)
    updates, state = sam.update(jax.grad(loss_fn)(params), state, params,
                                loss_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  steps = {("sgd", None, None): (sgd, sgd_step),
           ("sam", None, None): (sam, sam_step)}
  for m in ms:
    for loop in loops:
      tx = sam_optax.sam(base(), RHO, m=m, group_loop=loop)
      value_and_grads = sam_optax.group_value_and_grad(fn, m, group_loop=loop)

      def m_step(params, state, batch, tx=tx, value_and_grads=value_and_grads):
        _, grads, group_grads = value_and_grads(params, batch)
        updates, state = tx.update(grads, state, params, loss_fn=fn,
                                   batch=batch, group_grads=group_grads)
        return optax.apply_updates(params, updates), state

      def groups_step(params, state, batch, value_and_grads=value_and_grads):
        _, grads, _ = value_and_grads(params, batch)
        updates, state = sgd.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      steps[("sam", m, loop)] = (tx, m_step)
      steps[("sgd-groups", m, loop)] = (sgd, groups_step)
  return {k: (tx, jax.jit(f)) for k, (tx, f) in steps.items()}


def run_in_device(args):
  """Times every model's in-device steps; rows as in :func:`run`, per model."""
  models = QUICK_MODELS if args.quick else IN_DEVICE_MODELS
  results = {}
  for name in args.models:
    kwargs, batch, ms = models[name]
    params, fn, data = _model(name, kwargs, batch)
    cases = {}
    for key, (tx, step) in in_device_steps(fn, ms, args.loops).items():
      cases[key] = (step, (params, tx.init(params), data))
    rows = measure(cases, args.in_device_rounds)
    sgd = rows[("sgd", None, None)]
    for (label, m, loop), row in rows.items():
      # Paired: each step's time over SGD's in the same round (the same
      # moment, so the same machine load), median over rounds.
      row["ratio"] = statistics.median(
          t / s for t, s in zip(row["times"], sgd["times"]))
      row["min_ratio"] = row["min_ms"] / sgd["min_ms"]
      row["flops_ratio"] = row["flops"] / sgd["flops"]
      row["temp_ratio"] = row["temp"] / max(sgd["temp"], 1)
      if label == "sam" and m is not None:
        groups = rows[("sgd-groups", m, loop)]
        row["groups_ratio"] = statistics.median(
            t / s for t, s in zip(row["times"], groups["times"]))
    n_params = sum(a.size for a in jax.tree.leaves(params))
    results[name] = {"batch": batch, "params": n_params, "rows": rows,
                     "kwargs": kwargs}
  return results


def _in_device_lines(results, args) -> list[str]:
  lines = [
      "## In-device m-sharpness across models and group loops",
      "",
      "One device, per-group gradients from `sam_optax.group_value_and_grad` "
      "passed as `group_grads=` (two passes). `group_loop`: `vmap` runs all "
      "groups in one vectorized pass (every weight becomes b/m copies: batched "
      "matmuls, grouped convolutions), `unroll` one group after another as "
      "straight-line code, `scan` one group after another in a loop (one "
      "perturbed copy alive). `× SGD` is the SAM step's time over the plain "
      "SGD step's (`jax.grad` of the whole batch) in the same round, median "
      f"over {args.in_device_rounds} interleaved rounds (and min over min); "
      "`× SGD over groups` is the same against an SGD step that takes one pass "
      "over the same groups with the same loop. `temp` is XLA's compiled temp memory "
      "(`memory_analysis()`); `FLOPs` is XLA's cost analysis, which counts a "
      "loop body once (so none for `scan`).",
      "",
      "| model | batch | m | group_loop | FLOPs × SGD | temp × SGD "
      "| median ms / step | × SGD (median) | × SGD (min) | × SGD over groups |",
      "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, res in results.items():
    for (label, m, loop), row in res["rows"].items():
      if label == "sgd-groups":
        continue
      what = "— (SGD)" if label == "sgd" else ("batch (plain SAM)" if m is None else m)
      # XLA's cost analysis counts a loop body once: no FLOPs for `scan`.
      flops = "n/a" if loop == "scan" else f"{row['flops_ratio']:.2f}"
      groups = f"{row['groups_ratio']:.2f}" if "groups_ratio" in row else "—"
      lines.append(
          f"| {name} | {res['batch']} | {what} | {loop or '—'} | {flops} "
          f"| {row['temp_ratio']:.2f} | {row['ms']:.2f} | {row['ratio']:.2f} "
          f"| {row['min_ratio']:.2f} | {groups} |")
  lines += ["", "Models: " + "; ".join(
      f"{name} ({res['params']:,} params{', ' if res['kwargs'] else ''}"
      f"{', '.join(f'{k}={v}' for k, v in res['kwargs'].items())})"
      for name, res in results.items()) + ".", ""]
  best = []
  for name, res in results.items():
    for m in sorted({m for (label, m, _) in res["rows"] if m is not None}, reverse=True):
      cands = [(row["ratio"], loop) for (label, mm, loop), row in res["rows"].items()
               if label == "sam" and mm == m]
      ratio, loop = min(cands)
      best.append(f"{name} m={m}: {ratio:.2f}× ({loop})")
  lines += ["Fastest group loop per model and m, × SGD (median): "
            + "; ".join(best) + ".", ""]
  return lines


# --- Timing ----------------------------------------------------------------------


def xla_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled step as one dict (``{}`` if none)."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def measure(cases, rounds: int, jit_to_lower=()) -> dict:
  """Compiles, warms up and times every case in ``rounds`` interleaved rounds.

  ``cases``: ``{key: (step, args)}``; a key in ``jit_to_lower`` is lowered
  through ``jax.jit(step)`` (a ``pmap``). Each row holds the compiled step's
  all-reduce ops and the floats they carry, XLA's FLOPs and bytes accessed,
  its temp memory, the per-round times and their median and min in ms.
  """
  rows = {}
  for key, (step, a) in cases.items():
    compiled = (jax.jit(step) if key in jit_to_lower else step).lower(*a).compile()
    ops = all_reduce_ops(compiled.as_text())
    cost = xla_cost(compiled)
    rows[key] = {"all_reduces": len(ops),
                 "all_reduce_floats": sum(_floats(o) for o in ops),
                 "flops": float(cost.get("flops", float("nan"))),
                 "bytes": float(cost.get("bytes accessed", float("nan"))),
                 "temp": compiled.memory_analysis().temp_size_in_bytes,
                 "times": []}
    jax.block_until_ready(step(*a))  # compile and warm up
    jax.block_until_ready(step(*a))
  for _ in range(rounds):
    for key, (step, a) in cases.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(*a))
      rows[key]["times"].append(time.perf_counter() - t0)
  for row in rows.values():
    row["ms"] = 1e3 * statistics.median(row["times"])
    row["min_ms"] = 1e3 * min(row["times"])
  return rows


def run(args):
  params = make_mlp(args.width, args.depth, args.d_in, args.classes)
  b = args.per_device_batch
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N_DEV * b, args.d_in)), jnp.float32)
  y = jnp.asarray(rng.integers(0, args.classes, size=(N_DEV * b,)), jnp.int32)
  mesh = jax.make_mesh((N_DEV,), ("s",), axis_types=(jax.sharding.AxisType.Auto,))

  cases = {}  # name -> (step, args)
  local = (x[:b], y[:b])
  for name, (tx, step) in single_device_steps(args.m, args.no_group_grads_m).items():
    cases[name] = (step, (params, tx.init(params), local))
  rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), t)
  pbatch = (x.reshape(N_DEV, b, -1), y.reshape(N_DEV, b))
  for name, (tx, step) in pmap_steps().items():
    cases[name] = (step, (rep(params), rep(tx.init(params)), pbatch))
  sbatch = jax.device_put((x, y), NamedSharding(mesh, P("s")))
  for name, (tx, step) in shard_map_steps(mesh, args.shard_map_m).items():
    cases[name] = (step, (params, tx.init(params), sbatch))

  rows = measure(cases, args.rounds,
                 jit_to_lower=[n for n in cases if n.startswith("pmap")])
  for name, row in rows.items():
    sgd = {"jit": "jit: sgd", "pmap": "pmap: sgd",
           "shard_map": "shard_map: sgd"}[name.split(":")[0]]
    row["baseline"] = sgd
  for row in rows.values():
    row["ratio"] = row["ms"] / rows[row["baseline"]]["ms"]
    row["min_ratio"] = row["min_ms"] / rows[row["baseline"]]["min_ms"]
    row["flops_ratio"] = row["flops"] / rows[row["baseline"]]["flops"]
    row["bytes_ratio"] = row["bytes"] / rows[row["baseline"]]["bytes"]
  return params, rows


def environment() -> str:
  dev = jax.devices()[0]
  import jaxlib  # pylint: disable=import-outside-toplevel
  return (f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, optax "
          f"{optax.__version__}, numpy {np.__version__}, sam_optax "
          f"{sam_optax.__version__}, python {platform.python_version()}; "
          f"{jax.device_count()} simulated {dev.platform} devices on "
          f"{platform.machine()} ({platform.processor() or 'unknown cpu'}) "
          f"with {os.cpu_count()} cores, {platform.system()} "
          f"{platform.release()}; {datetime.date.today().isoformat()}")


def _pass_lines(rows) -> list[str]:
  """SAM-with-m time in units of one vectorized pass over the same groups."""
  out = []
  for name, row in rows.items():
    m = re.fullmatch(r"jit: sam m=(\d+)", name)
    one = rows.get(f"jit: sgd, one vectorized pass over groups of m={m.group(1)}") if m else None
    if one:
      out.append(f"- m={m.group(1)}: SAM step = {row['ms'] / one['ms']:.2f} "
                 f"(median; {row['min_ms'] / one['min_ms']:.2f} min) × an SGD "
                 "step that takes one vectorized pass over the same groups.")
  return out


def plot(rows, in_device, path: str) -> None:
  """Bar charts: × SGD per setting (top), in-device m per model and loop (bottom)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = 2 if in_device else 1
  fig, axes = plt.subplots(panels, 1, figsize=(11, 4.2 * panels), squeeze=False)
  ax = axes[0, 0]
  names = [n for n in rows if "one vectorized pass" not in n]
  ax.bar(range(len(names)), [rows[n]["ratio"] for n in names],
         color=[f"C{['jit', 'pmap', 'shard_map'].index(n.split(':')[0])}" for n in names])
  for i, n in enumerate(names):
    ax.text(i, rows[n]["ratio"], f"{rows[n]['all_reduces']} AR", ha="center",
            va="bottom", fontsize=7)
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels([n.replace(": ", ":\n") for n in names], fontsize=7)
  ax.axhline(1, color="k", lw=0.5)
  ax.axhline(2.10, color="k", lw=0.8, ls=":")
  ax.set_ylabel("step time / SGD's (median)")
  ax.set_title("MLP: all-reduce ops per step (AR) and time, jit / pmap / shard_map")
  if in_device:
    ax = axes[1, 0]
    loops = list(dict.fromkeys(loop for res in in_device.values()
                               for (_, _, loop) in res["rows"] if loop))
    groups = [(name, m) for name, res in in_device.items()
              for m in dict.fromkeys(m for (label, m, _) in res["rows"]
                                     if label == "sam" and m is not None)]
    width = 0.8 / len(loops)
    for j, loop in enumerate(loops):
      vals = [in_device[name]["rows"][("sam", m, loop)]["ratio"] for name, m in groups]
      ax.bar(np.arange(len(groups)) + (j - len(loops) / 2 + 0.5) * width, vals,
             width, label=f"group_loop='{loop}'", color=f"C{j}")
    sam = [in_device[name]["rows"][("sam", None, None)]["ratio"] for name, _ in groups]
    ax.scatter(np.arange(len(groups)), sam, marker="_", s=400, color="k",
               zorder=3, label="plain SAM (m = batch)")
    ax.axhline(2.10, color="k", lw=0.8, ls=":", label="2.10 × SGD")
    top = 1.3 * max(row["ratio"] for res in in_device.values()
                    for row in res["rows"].values())
    ax.set_yscale("log")
    ax.set_ylim(0.9, top)
    ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50) if t < top]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{name}\nm={m}" for name, m in groups])
    ax.set_ylabel("step time / SGD's (paired median)")
    ax.set_title("In-device m-sharpness: group loops across models")
    ax.legend(fontsize=7, ncol=5, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(params, rows, args, in_device=None) -> str:
  n_params = sum(a.size for a in jax.tree.leaves(params))
  lines = [
      "# m-sharpness at every scale: all-reduces and step time",
      "",
      f"MLP {args.d_in}→{'→'.join([str(args.width)] * args.depth)}→"
      f"{args.classes} ({n_params:,} params, relu, softmax cross-entropy), "
      f"per-device batch {args.per_device_batch}, SGD momentum {MOMENTUM} as "
      f"the base optimizer, ρ = {RHO}. Median (and min) of {args.rounds} interleaved "
      "jitted steps; the ratio is to SGD in the same setting (same devices, "
      "same per-device batch). `all-reduce ops` counts the ops in the "
      "compiled step; `floats` is what they carry. `FLOPs` and `bytes` are "
      "XLA's cost analysis of the compiled step (`compiled.cost_analysis()`): "
      "machine-independent, they count passes; the times price them on this "
      "host.",
      "",
      "| setting | all-reduce ops | floats all-reduced | FLOPs × SGD "
      "| bytes × SGD | median ms / step | × SGD (median) | min ms / step "
      "| × SGD (min) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, row in rows.items():
    lines.append(f"| {name} | {row['all_reduces']} | {row['all_reduce_floats']:,} "
                 f"| {row['flops_ratio']:.2f} | {row['bytes_ratio']:.2f} "
                 f"| {row['ms']:.2f} | {row['ratio']:.2f} | {row['min_ms']:.2f} "
                 f"| {row['min_ratio']:.2f} |")
  lines += [
      "",
      "Reading it: SAM under `pmap`/`shard_map` all-reduces once per step, like "
      "SGD; that one op carries ∇L(w+ε) and the step's statistics (a few "
      "scalars). In-device m-sharpness with `group_grads=` is two passes (its "
      "FLOPs are about 2× SGD's); without it, `update` recomputes the "
      "per-group gradients, a third pass (about 3× SGD's FLOPs). A pass over "
      "groups moves more bytes than a plain pass, though: each group has its "
      "own weight gradient and, in the second pass, its own perturbed copy of "
      "the weights, so b/m params-sized buffers are written and read and the "
      "weight-gradient matmuls become batched matmuls. An MLP does only 2 "
      "FLOPs per param and example, so on a CPU that traffic shows in the "
      "time once m is small; models that reuse their weights (convolutions, "
      "long sequences) do far more FLOPs per param. The `sgd, one vectorized "
      "pass` rows price one pass over the groups.",
      "",
  ] + _pass_lines(rows) + [""] + (_in_device_lines(in_device, args) if in_device else []) + [
      "Plot: `distributed.png`; per-row values: `distributed.csv`"
      + (", `distributed_in_device.csv`." if in_device else "."),
      "",
      f"Environment: {environment()}. Host load average (1 min) "
      f"{args.load[0]:.1f} before and {args.load[1]:.1f} after the run: the "
      "8 simulated devices share the host's cores with whatever else runs, "
      "so the median is noisy; the min column is the least disturbed step.",
      "",
      "Command: `" + " ".join(["python -m benchmarks.distributed"] + args.argv) + "`",
      "",
  ]
  text = "\n".join(lines)
  os.makedirs(args.out_dir, exist_ok=True)
  plot(rows, in_device, os.path.join(args.out_dir, "distributed.png"))
  with open(os.path.join(args.out_dir, "distributed.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.out_dir, "distributed.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["setting", "all_reduce_ops", "all_reduce_floats", "flops",
                "bytes_accessed", "flops_ratio_to_sgd", "bytes_ratio_to_sgd",
                "median_ms_per_step", "median_ratio_to_sgd", "min_ms_per_step",
                "min_ratio_to_sgd", "baseline", "rounds"])
    for name, row in rows.items():
      w.writerow([name, row["all_reduces"], row["all_reduce_floats"],
                  f"{row['flops']:.0f}", f"{row['bytes']:.0f}",
                  f"{row['flops_ratio']:.4f}", f"{row['bytes_ratio']:.4f}",
                  f"{row['ms']:.4f}", f"{row['ratio']:.4f}",
                  f"{row['min_ms']:.4f}", f"{row['min_ratio']:.4f}",
                  row["baseline"], args.rounds])
  if in_device:
    with open(os.path.join(args.out_dir, "distributed_in_device.csv"), "w",
              newline="") as f:
      w = csv.writer(f)
      w.writerow(["model", "batch", "params", "step", "m", "group_loop",
                  "flops_ratio_to_sgd", "temp_bytes", "temp_ratio_to_sgd",
                  "median_ms_per_step", "median_ratio_to_sgd",
                  "min_ratio_to_sgd", "ratio_to_sgd_over_groups", "rounds"])
      for name, res in in_device.items():
        for (label, m, loop), row in res["rows"].items():
          w.writerow([name, res["batch"], res["params"], label, m or "", loop or "",
                      f"{row['flops_ratio']:.4f}", row["temp"],
                      f"{row['temp_ratio']:.4f}", f"{row['ms']:.4f}",
                      f"{row['ratio']:.4f}", f"{row['min_ratio']:.4f}",
                      f"{row['groups_ratio']:.4f}" if "groups_ratio" in row else "",
                      args.in_device_rounds])
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--d-in", type=int, default=256)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--per-device-batch", type=int, default=256)
  parser.add_argument("--m", type=int, nargs="*", default=[64],
                      help="in-device m for the MLP rows of the first table")
  parser.add_argument("--no-group-grads-m", type=int, default=64)
  parser.add_argument("--shard-map-m", type=int, nargs="*", default=[64])
  parser.add_argument("--rounds", type=int, default=50)
  parser.add_argument("--models", nargs="*", default=list(IN_DEVICE_MODELS),
                      choices=list(IN_DEVICE_MODELS),
                      help="models of the in-device m table (none: skip it)")
  parser.add_argument("--loops", nargs="+", default=["vmap", "unroll", "scan"],
                      choices=["vmap", "unroll", "scan"],
                      help="group loops of the in-device m table")
  parser.add_argument("--in-device-rounds", type=int, default=40)
  parser.add_argument("--quick", action="store_true",
                      help="tiny models and few rounds: a smoke run")
  parser.add_argument("--out-dir", default=RESULTS_DIR)
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.in_device_rounds = 3, 3
  elif min(args.rounds, args.in_device_rounds) < 20:
    parser.error("--rounds and --in-device-rounds must be at least 20 (the "
                 "median of >= 20 steps); use --quick for a smoke run")
  args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
  load_before = os.getloadavg()[0]
  if args.quick:
    args.width, args.d_in, args.per_device_batch = 32, 16, 16
    args.m, args.no_group_grads_m, args.shard_map_m = [8], 8, [8]
  params, rows = run(args)
  in_device = run_in_device(args) if args.models else None
  args.load = (load_before, os.getloadavg()[0])
  print(write(params, rows, args, in_device))


if __name__ == "__main__":
  main()
