"""m-sharpness at every scale: all-reduces per step and step time against SGD.

Runs on the host CPU split into 8 simulated devices (set before JAX starts).
For each setting it builds the jitted training step (gradient, optimizer
update, apply) of SGD with momentum and of SAM around it, then reports

* the number of all-reduce ops in the compiled step (``compiled.as_text()``)
  and how many floats they carry;
* the median step time over interleaved rounds (every step once per round, so
  machine noise hits all alike, :mod:`benchmarks.harness.timing`) and its
  ratio to SGD in the same setting, paired round by round.

Settings:

- ``jit``: one device, the whole batch; plain SAM (m = batch).
- ``m=…``: one device, in-device m-sharpness, the per-group gradients from
  ``sam_optax.group_value_and_grad`` passed as ``group_grads=`` (two passes);
  ``m=… (no group_grads)`` lets ``update`` recompute them (three passes).
- ``pmap`` / ``shard_map``: 8 devices, one perturbation per device
  (``axis_name``); SGD there all-reduces its gradient once.
- ``shard_map × m=…``: 8 devices and in-device groups.

A second table sweeps in-device m-sharpness over three models (the MLP, CNN
and transformer block of :mod:`benchmarks.harness.models`), several m and the
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
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from benchmarks.harness import data
from benchmarks.harness import methods
from benchmarks.harness import models
from benchmarks.harness import report
from benchmarks.harness import timing

SAM, SGD = methods.SAM.name, methods.BASE
RHO, LR, MOMENTUM = methods.SAM.defaults()["rho"], 0.05, 0.9
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


def base():
  return optax.sgd(LR, momentum=MOMENTUM)


# --- Models ----------------------------------------------------------------------

# model -> (sizes, batch, m values) of the in-device table.
IN_DEVICE_MODELS = {
    "mlp": (dict(sizes=(256, 512, 512, 10)), 256, (128, 64, 32)),
    "cnn": (dict(channels=(16, 32, 64), image=32), 64, (32, 16)),
    "transformer": (dict(d_model=64, heads=4, seq=32), 64, (16, 8)),
}
QUICK_MODELS = {
    "mlp": (dict(sizes=(16, 32, 32, 10)), 32, (8,)),
    "cnn": (dict(channels=(4, 8), image=8), 16, (8,)),
    "transformer": (dict(d_model=16, heads=2, seq=8), 16, (8,)),
}


def workload(name: str, kwargs, batch: int, seed: int = 0):
  """``(params, loss(params, (x, y)), (x, y))`` for one model."""
  net = models.ARCHITECTURES[name](**kwargs)
  params = net.init(jax.random.PRNGKey(seed))
  return params, models.cross_entropy(net.apply), data.random_batch(net.input_shape, batch)


# --- Steps -----------------------------------------------------------------------


def in_device_steps(loss, ms, loops):
  """``{(label, m, loop): (tx, jitted step)}``: SGD, SAM, and SAM with ``m``.

  For every ``(m, loop)`` there is also ``sgd-groups``: SGD whose gradient is
  the mean of the per-group gradients, computed with the same loop (one pass
  over the same groups), to price that pass on its own.
  """
  sgd, sam = base(), methods.SAM.wrapper(base())
  steps = {(SGD, None, None): (sgd, methods.train_step(sgd, loss)),
           (SAM, None, None): (sam, methods.train_step(sam, loss))}
  for m in ms:
    for loop in loops:
      tx = methods.SAM.wrapper(base(), m=m, group_loop=loop)
      steps[(SAM, m, loop)] = (tx, methods.group_step(tx, loss, m, loop))
      steps[(f"{SGD}-groups", m, loop)] = (sgd, methods.group_step(sgd, loss, m, loop))
  return {k: (tx, jax.jit(f)) for k, (tx, f) in steps.items()}


def single_device_steps(loss, ms, no_group_grads_m):
  """``{name: (tx, step)}`` on one device: the steps of :func:`in_device_steps`
  (``group_loop='vmap'``) named for the first table, and SAM with ``m`` that
  recomputes the per-group gradients itself (``no_group_grads_m``)."""
  names = {(SGD, None, None): f"jit: {SGD}",
           (SAM, None, None): f"jit: {SAM} (m = batch)"}
  for m in ms:
    names[(SAM, m, "vmap")] = f"jit: {SAM} m={m}"
    names[(f"{SGD}-groups", m, "vmap")] = (
        f"jit: {SGD}, one vectorized pass over groups of m={m}")
  steps = {names[k]: v for k, v in in_device_steps(loss, ms, ["vmap"]).items()}
  if no_group_grads_m:
    m = no_group_grads_m
    tx = methods.SAM.wrapper(base(), m=m)

    def m3_step(params, state, batch):
      grads = jax.grad(loss)(params, batch)
      updates, state = tx.update(grads, state, params, loss_fn=loss, batch=batch)
      return optax.apply_updates(params, updates), state

    steps[f"jit: {SAM} m={m} (no group_grads)"] = (tx, jax.jit(m3_step))
  return steps


def _mapped_bodies(loss, axis, m=None):
  sgd = base()

  def sgd_body(params, state, batch):
    grads = jax.grad(loss)(sam_optax.per_device(params, axis) if axis == "s" else params, batch)
    grads = jax.lax.pmean(grads, axis)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  tx = methods.SAM.wrapper(base(), axis_name=axis, m=m)
  per_device = lambda p: sam_optax.per_device(p, axis)
  sam_body = (methods.train_step(tx, loss, per_device) if m is None
              else methods.group_step(tx, loss, m, params_fn=per_device))
  return (sgd, sgd_body), (tx, sam_body)


def pmap_steps(loss):
  (sgd, sgd_body), (tx, sam_body) = _mapped_bodies(loss, "p")
  return {f"pmap: {SGD}": (sgd, jax.pmap(sgd_body, axis_name="p")),
          f"pmap: {SAM}": (tx, jax.pmap(sam_body, axis_name="p"))}


def shard_map_steps(loss, mesh, ms):
  out = {}
  wrap = lambda f: jax.jit(jax.shard_map(
      f, mesh=mesh, in_specs=(P(), P(), P("s")), out_specs=(P(), P())))
  (sgd, sgd_body), (tx, sam_body) = _mapped_bodies(loss, "s")
  out[f"shard_map: {SGD}"] = (sgd, wrap(sgd_body))
  out[f"shard_map: {SAM}"] = (tx, wrap(sam_body))
  for m in ms:
    _, (tx, body) = _mapped_bodies(loss, "s", m)
    out[f"shard_map: {SAM} × m={m}"] = (tx, wrap(body))
  return out


# --- Measuring -------------------------------------------------------------------


def measure(cases, rounds: int, baseline) -> dict:
  """:func:`benchmarks.harness.timing.measure`, plus the all-reduce ops of each
  compiled step and its ratios (paired round by round) to ``baseline(key)``."""
  rows = timing.measure(cases, rounds)
  for row in rows.values():
    ops = all_reduce_ops(row.pop("compiled").as_text())
    row["all_reduces"], row["all_reduce_floats"] = len(ops), sum(_floats(o) for o in ops)
  for key, row in rows.items():
    row["baseline"] = baseline(key)
    row["paired"] = timing.paired(row, rows[row["baseline"]])
  return rows


def run(args):
  """The first table: one device, ``pmap`` and ``shard_map``, on the MLP."""
  sizes = (args.d_in,) + (args.width,) * args.depth + (args.classes,)
  b = args.per_device_batch
  params, loss, (x, y) = workload("mlp", dict(sizes=sizes), N_DEV * b)
  mesh = jax.make_mesh((N_DEV,), ("s",), axis_types=(jax.sharding.AxisType.Auto,))
  cases = {}
  for name, (tx, step) in single_device_steps(loss, args.m, args.no_group_grads_m).items():
    cases[name] = timing.Case(step, (params, tx.init(params), (x[:b], y[:b])))
  rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), t)
  pbatch = (x.reshape(N_DEV, b, -1), y.reshape(N_DEV, b))
  for name, (tx, step) in pmap_steps(loss).items():
    cases[name] = timing.Case(step, (rep(params), rep(tx.init(params)), pbatch))
  sbatch = jax.device_put((x, y), NamedSharding(mesh, P("s")))
  for name, (tx, step) in shard_map_steps(loss, mesh, args.shard_map_m).items():
    cases[name] = timing.Case(step, (params, tx.init(params), sbatch))
  rows = measure(cases, args.rounds, lambda name: f"{name.split(':')[0]}: {SGD}")
  return params, rows


def run_in_device(args):
  """The second table: every model's in-device steps."""
  results = {}
  for name in args.models:
    kwargs, batch, ms = (QUICK_MODELS if args.quick else IN_DEVICE_MODELS)[name]
    params, loss, xy = workload(name, kwargs, batch)
    cases = {key: timing.Case(step, (params, tx.init(params), xy))
             for key, (tx, step) in in_device_steps(loss, ms, args.loops).items()}
    rows = measure(cases, args.in_device_rounds, lambda key: (SGD, None, None))
    for (label, m, loop), row in rows.items():
      if label == SAM and m is not None:
        row["groups_ratio"] = timing.paired(row, rows[(f"{SGD}-groups", m, loop)])["median"]
    results[name] = {"batch": batch, "params": models.n_params(params), "rows": rows,
                     "kwargs": kwargs}
  return results


# --- Report ----------------------------------------------------------------------
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
      if label == f"{SGD}-groups":
        continue
      what = "— (SGD)" if label == SGD else ("batch (plain SAM)" if m is None else m)
      # XLA's cost analysis counts a loop body once: no FLOPs for `scan`.
      flops = "n/a" if loop == "scan" else f"{row['paired']['flops']:.2f}"
      groups = f"{row['groups_ratio']:.2f}" if "groups_ratio" in row else "—"
      lines.append(
          f"| {name} | {res['batch']} | {what} | {loop or '—'} | {flops} "
          f"| {row['paired']['temp']:.2f} | {row['ms']:.2f} | {row['paired']['median']:.2f} "
          f"| {row['paired']['min']:.2f} | {groups} |")
  lines += ["", "Models: " + "; ".join(
      f"{name} ({res['params']:,} params{', ' if res['kwargs'] else ''}"
      f"{', '.join(f'{k}={v}' for k, v in res['kwargs'].items())})"
      for name, res in results.items()) + ".", ""]
  best = []
  for name, res in results.items():
    for m in sorted({m for (label, m, _) in res["rows"] if m is not None}, reverse=True):
      cands = [(row["paired"]["median"], loop) for (label, mm, loop), row in res["rows"].items()
               if label == SAM and mm == m]
      ratio, loop = min(cands)
      best.append(f"{name} m={m}: {ratio:.2f}× ({loop})")
  lines += ["Fastest group loop per model and m, × SGD (median): "
            + "; ".join(best) + ".", ""]
  return lines


def _pass_lines(rows) -> list[str]:
  """SAM-with-m time in units of one vectorized pass over the same groups."""
  out = []
  for name, row in rows.items():
    m = re.fullmatch(rf"jit: {SAM} m=(\d+)", name)
    one = rows.get(f"jit: {SGD}, one vectorized pass over groups of m={m.group(1)}") if m else None
    if one:
      paired = timing.paired(row, one)
      out.append(f"- m={m.group(1)}: SAM step = {paired['median']:.2f} "
                 f"(median; {paired['min']:.2f} min) × an SGD "
                 "step that takes one vectorized pass over the same groups.")
  return out


def plot(rows, in_device):
  """Bar charts: × SGD per setting (top), in-device m per model and loop (bottom)."""
  plt = report.pyplot()
  panels = 2 if in_device else 1
  fig, axes = plt.subplots(panels, 1, figsize=(11, 4.2 * panels), squeeze=False)
  ax = axes[0, 0]
  names = [n for n in rows if "one vectorized pass" not in n]
  ax.bar(range(len(names)), [rows[n]["paired"]["median"] for n in names],
         color=[f"C{['jit', 'pmap', 'shard_map'].index(n.split(':')[0])}" for n in names])
  for i, n in enumerate(names):
    ax.text(i, rows[n]["paired"]["median"], f"{rows[n]['all_reduces']} AR", ha="center",
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
                                     if label == SAM and m is not None)]
    width = 0.8 / len(loops)
    for j, loop in enumerate(loops):
      vals = [in_device[name]["rows"][(SAM, m, loop)]["paired"]["median"] for name, m in groups]
      ax.bar(np.arange(len(groups)) + (j - len(loops) / 2 + 0.5) * width, vals,
             width, label=f"group_loop='{loop}'", color=f"C{j}")
    sam = [in_device[name]["rows"][(SAM, None, None)]["paired"]["median"] for name, _ in groups]
    ax.scatter(np.arange(len(groups)), sam, marker="_", s=400, color="k",
               zorder=3, label="plain SAM (m = batch)")
    ax.axhline(2.10, color="k", lw=0.8, ls=":", label="2.10 × SGD")
    top = 1.3 * max(row["paired"]["median"] for res in in_device.values()
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
  return fig


def records(rows, rounds: int) -> list[dict]:
  return [{"setting": name, "all_reduce_ops": row["all_reduces"],
           "all_reduce_floats": row["all_reduce_floats"], "flops": row["flops"],
           "bytes_accessed": row["bytes"], "flops_ratio_to_sgd": row["paired"]["flops"],
           "bytes_ratio_to_sgd": row["paired"]["bytes"], "median_ms_per_step": row["ms"],
           "median_ratio_to_sgd": row["paired"]["median"], "min_ms_per_step": row["min_ms"],
           "min_ratio_to_sgd": row["paired"]["min"], "baseline": row["baseline"],
           "rounds": rounds} for name, row in rows.items()]


def in_device_records(in_device, rounds: int) -> list[dict]:
  return [{"model": name, "batch": res["batch"], "params": res["params"], "step": label,
           "m": m or "", "group_loop": loop or "", "flops_ratio_to_sgd": row["paired"]["flops"],
           "temp_bytes": int(row["temp"]), "temp_ratio_to_sgd": row["paired"]["temp"],
           "median_ms_per_step": row["ms"], "median_ratio_to_sgd": row["paired"]["median"],
           "min_ratio_to_sgd": row["paired"]["min"],
           "ratio_to_sgd_over_groups": row.get("groups_ratio", ""), "rounds": rounds}
          for name, res in (in_device or {}).items()
          for (label, m, loop), row in res["rows"].items()]


def write(params, rows, args, in_device=None) -> str:
  lines = [
      "# m-sharpness at every scale: all-reduces and step time",
      "",
      f"MLP {args.d_in}→{'→'.join([str(args.width)] * args.depth)}→"
      f"{args.classes} ({models.n_params(params):,} params, relu, softmax cross-entropy), "
      f"per-device batch {args.per_device_batch}, SGD momentum {MOMENTUM} as "
      f"the base optimizer, ρ = {RHO}. Median (and min) of {args.rounds} interleaved "
      "jitted steps; the ratio is to SGD in the same setting (same devices, "
      "same per-device batch), median over rounds of the per-round ratio. "
      "`all-reduce ops` counts the ops in the "
      "compiled step; `floats` is what they carry. `FLOPs` and `bytes` are "
      "XLA's cost analysis of the compiled step (`compiled.cost_analysis()`): "
      "machine-independent, they count passes; the times price them on this "
      "host.",
      "",
      report.markdown_table(
          ["setting", "all-reduce ops", "floats all-reduced", "FLOPs × SGD", "bytes × SGD",
           "median ms / step", "× SGD (median)", "min ms / step", "× SGD (min)"],
          [(name, row["all_reduces"], f"{row['all_reduce_floats']:,}",
            f"{row['paired']['flops']:.2f}", f"{row['paired']['bytes']:.2f}",
            f"{row['ms']:.2f}", f"{row['paired']['median']:.2f}", f"{row['min_ms']:.2f}",
            f"{row['paired']['min']:.2f}") for name, row in rows.items()]),
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
      f"Host load average (1 min) {args.load[0]:.1f} before and {args.load[1]:.1f} after "
      "the run: the 8 simulated devices share the host's cores with whatever else runs, "
      "so the median is noisy; the min column is the least disturbed step.",
      "",
      "Command: `" + " ".join(["python -m benchmarks.distributed"] + args.argv) + "`",
  ]
  text = "\n".join(lines)
  report.write(os.path.join(args.out_dir, "distributed.md"), text,
               records=records(rows, args.rounds),
               tables={"in_device": in_device_records(in_device, args.in_device_rounds)},
               figure=plot(rows, in_device))
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
  parser.add_argument("--out-dir", default=report.RESULTS_DIR)
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.in_device_rounds = 3, 3
  elif min(args.rounds, args.in_device_rounds) < 20:
    parser.error("--rounds and --in-device-rounds must be at least 20 (the "
                 "median of >= 20 steps); use --quick for a smoke run")
  args.argv = list(argv) if argv is not None else sys.argv[1:]
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
