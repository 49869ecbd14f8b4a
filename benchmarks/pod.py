"""Pod scale: collectives and memory of a SAM step with sharded params, per layout.

Runs on the host CPU split into 8 simulated devices (set before JAX starts),
as a 'data' 4 × 'model' 2 mesh. For each layout of the params and the batch
it compiles the jitted training step (gradient, optimizer update, apply;
params and optimizer state donated, the state sharded like the params) of

* ``sgd``: SGD with momentum alone (one pass, one gradient reduction);
* ``hand_sam``: a hand-written SAM step around it (the target,
  :mod:`benchmarks.harness.methods`);
* ``sam``: ``sam_optax.sam`` around it,

and reports, from the compiled program (no timing: these are properties of
the program, the same on any host):

* the collective ops per step (all-reduce, all-gather, reduce-scatter,
  collective-permute, all-to-all, from ``compiled.as_text()``) and the bytes
  their operands hold on one device, × SGD's and × the hand-written SAM's;
* XLA's temp memory (``memory_analysis()``), × the hand-written SAM's and ×
  the bytes of the params one device holds.

Layouts (an MLP whose kernels alternate column- and row-parallel under
tensor parallelism):

- ``dp``: data parallel, params replicated, batch over all 8 devices;
- ``fsdp``: every kernel's rows over all 8 devices, batch over all 8;
- ``tp``: tensor parallel within 'model' (2), batch over 'data' (4);
- ``hybrid``: kernels' rows sharded within 'model', replicated across
  'data'; batch over all 8 devices.

All four run under ``jax.jit`` (GSPMD partitions the step; one ε for the
global batch). Data parallel also runs under ``jax.shard_map`` with
replicated params and ``axis_name='data'`` (one ε per device), where SGD
all-reduces its gradient with ``pmean`` and the hand-written SAM step
perturbs each device with its own gradient.

Run ``python -m benchmarks.pod --help``; ``--quick`` is a smoke run on a
tiny MLP.
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import os
import re
import sys
import time
from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from benchmarks.harness import data
from benchmarks.harness import environment
from benchmarks.harness import methods
from benchmarks.harness import models
from benchmarks.harness import report

SGD, HAND, SAM = methods.BASE, "hand_sam", methods.SAM.name
STEPS = (SGD, HAND, SAM)
RHO, LR, MOMENTUM = methods.SAM.defaults()["rho"], 0.05, 0.9
MESH_SHAPE = (("data", 4), ("model", 2))
ALL = ("data", "model")
LAYOUTS = ("dp", "fsdp", "tp", "hybrid")
LAYOUT_NAMES = {"dp": "data parallel", "fsdp": "FSDP", "tp": "tensor parallel",
                "hybrid": "hybrid (FSDP in 'model')"}

# --- Reading collectives from a compiled program -----------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")


class Collective(NamedTuple):
  """One collective op of a compiled program.

  Attributes:
    kind: ``'all-reduce'``, ``'all-gather'``, ... (async ``-start`` ops
      under their plain name; ``-done`` ops are not counted).
    operand_shapes: the operands' shapes, e.g. ``('f32[4,8]', 'f32[]')``.
    operand_bytes: the bytes the operands hold on one device.
  """

  kind: str
  operand_shapes: tuple
  operand_bytes: int


def _element_bytes(dtype: str) -> float:
  if dtype == "pred":
    return 1
  bits = re.match(r"[a-z]+(\d+)", dtype)
  return int(bits.group(1)) / 8 if bits else 0


def _arrays(shape_text: str) -> list[tuple[str, str]]:
  return _ARRAY.findall(shape_text)


def _bytes(shape_text: str) -> int:
  return int(sum(_element_bytes(t) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                 for t, dims in _arrays(shape_text)))


def collective_ops(compiled_text: str) -> list[Collective]:
  """Every collective op in an HLO module's text (``compiled.as_text()``),
  with the shapes and bytes of its operands (looked up from the
  instructions that define them)."""
  shapes, out = {}, []
  for line in compiled_text.splitlines():
    m = _INSTRUCTION.match(_COMMENT.sub("", line))
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name.lstrip("%")] = shape
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind not in COLLECTIVES:
      continue
    operands = [o.strip().split()[-1].lstrip("%") for o in rest.split(")", 1)[0].split(",")
                if o.strip()]
    unknown = [o for o in operands if o not in shapes]
    if unknown or not operands:
      raise ValueError(f"cannot read the operands of this {kind} op: {line.strip()[:200]}")
    texts = [shapes[o] for o in operands]
    arrays = tuple(f"{t}[{d}]" for text in texts for t, d in _arrays(text))
    out.append(Collective(kind, arrays, sum(_bytes(t) for t in texts)))
  return out


def summary(ops: Sequence[Collective]) -> str:
  """``'15: 8 all-gather, 6 all-reduce, 1 all-to-all'``."""
  counts = {}
  for op in ops:
    counts[op.kind] = counts.get(op.kind, 0) + 1
  return f"{len(ops)}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


# --- Layouts and steps ---------------------------------------------------------------


def mesh():
  names = tuple(n for n, _ in MESH_SHAPE)
  return jax.make_mesh(tuple(s for _, s in MESH_SHAPE), names,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def layout_specs(layout: str, params) -> tuple:
  """``(params' PartitionSpecs, batch's PartitionSpec)`` for the harness MLP
  (a list of ``{'w', 'b'}`` layers)."""
  def layer(i):
    if layout == "dp":
      return {"w": P(), "b": P()}
    if layout == "fsdp":
      return {"w": P(ALL), "b": P()}
    if layout == "hybrid":
      return {"w": P("model"), "b": P()}
    if layout == "tp":  # column-parallel, then row-parallel
      return ({"w": P(None, "model"), "b": P("model")} if i % 2 == 0
              else {"w": P("model"), "b": P()})
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
  return [layer(i) for i in range(len(params))], P("data") if layout == "tp" else P(ALL)


def state_shardings(tx, params, shardings, mesh_):
  """The optimizer state's shardings: the params' on params-shaped leaves
  (``optax.tree_map_params``), replicated elsewhere."""
  return optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
      transform_non_params=lambda _: NamedSharding(mesh_, P()))


def _base():
  return optax.sgd(LR, momentum=MOMENTUM)


def jit_steps(loss: Callable, batch_size: int) -> dict:
  """``{name: (tx, step)}`` of :data:`STEPS` under plain ``jit``."""
  out = {}
  for name in STEPS:
    if name == SAM:
      tx = methods.SAM.wrapper(_base(), rho=RHO)
      out[name] = (tx, methods.train_step(tx, loss))
    else:
      entry = methods.entries(batch_size)[name]
      init, step = entry.make(loss, _base(), batch_size)
      out[name] = (optax.GradientTransformation(init, None), step)
  return out


def compile_steps(params, shardings, batch, mesh_, loss: Callable,
                  names: Sequence[str] = STEPS) -> dict:
  """``{name: compiled}``: each step jitted with params and state donated,
  lowered on ``params`` (placed as ``shardings``), its state sharded like the
  params, and ``batch``."""
  steps = jit_steps(loss, jax.tree.leaves(batch)[0].shape[0])
  out = {}
  for name in names:
    tx, step = steps[name]
    state = jax.jit(tx.init, out_shardings=state_shardings(tx, params, shardings, mesh_))(params)
    out[name] = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
  return out


def _hand_sam_per_device(loss: Callable, base, axis: str) -> Callable:
  """A hand-written SAM step under shard_map: each device its own ε, one
  ``pmean`` of ∇L(w+ε)."""
  def step(params, state, batch):
    w = sam_optax.per_device(params, axis)
    grads = jax.grad(loss)(w, batch)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    scale = RHO / jnp.maximum(norm, 1e-12)
    perturbed = jax.tree.map(lambda p, g: p + scale * g, w, grads)
    g_sam = jax.lax.pmean(jax.grad(loss)(perturbed, batch), axis)
    updates, state = base.update(g_sam, state, params)
    return optax.apply_updates(params, updates), state
  return step


def shard_map_steps(loss: Callable, mesh_) -> dict:
  """``{name: (tx, jitted step)}`` under shard_map over all devices,
  replicated params, one perturbation per device (``axis_name``)."""
  axis = ALL
  base = _base()

  def sgd(params, state, batch):
    grads = jax.lax.pmean(jax.grad(loss)(sam_optax.per_device(params, axis), batch), axis)
    updates, state = base.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  tx = methods.SAM.wrapper(_base(), rho=RHO, axis_name=axis)
  bodies = {SGD: (base, sgd), HAND: (base, _hand_sam_per_device(loss, base, axis)),
            SAM: (tx, methods.train_step(tx, loss, lambda p: sam_optax.per_device(p, axis)))}
  return {name: (t, jax.jit(jax.shard_map(f, mesh=mesh_, in_specs=(P(), P(), P(axis)),
                                          out_specs=(P(), P())), donate_argnums=(0, 1)))
          for name, (t, f) in bodies.items()}


# --- Measuring -----------------------------------------------------------------------


def _per_device_bytes(params, shardings) -> int:
  """The bytes of the params one device holds."""
  total = 0
  for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    shard = s.shard_shape(a.shape)
    total += int(np.prod(shard)) * a.dtype.itemsize
  return total


def _row(compiled) -> dict:
  ops = collective_ops(compiled.as_text())
  return {"ops": ops, "n_ops": len(ops), "bytes": sum(op.operand_bytes for op in ops),
          "temp": compiled.memory_analysis().temp_size_in_bytes}


def _one_step_gap(steps_and_args) -> float:
  """max |sam − hand_sam| over the params after one step (a sanity check)."""
  after = {}
  for name, (step, args) in steps_and_args.items():
    args = jax.tree.map(jnp.copy, args)  # the step donates them
    after[name] = step(*args)[0]
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(after[SAM]), jax.tree.leaves(after[HAND])))


def run(args) -> list[dict]:
  net = models.mlp(tuple(args.sizes))
  params0 = net.init(jax.random.PRNGKey(0))
  loss = models.cross_entropy(net.apply)
  xy = data.random_batch(net.input_shape, args.batch)
  mesh_ = mesh()
  rows = []
  settings = [("jit", layout) for layout in args.layouts]
  if args.shard_map:
    settings.append(("shard_map", "dp"))
  for mode, layout in settings:
    specs, batch_spec = layout_specs(layout, params0)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh_, s), specs)
    params = jax.device_put(params0, shardings)
    batch = jax.device_put(xy, NamedSharding(mesh_, batch_spec))
    if mode == "jit":
      steps = {name: (tx, jax.jit(step, donate_argnums=(0, 1)))
               for name, (tx, step) in jit_steps(loss, args.batch).items()}
      init = lambda tx: jax.jit(tx.init, out_shardings=state_shardings(
          tx, params, shardings, mesh_))(params)
    else:
      steps = shard_map_steps(loss, mesh_)
      init = lambda tx: jax.device_put(tx.init(params0), NamedSharding(mesh_, P()))
    compiled, args_of = {}, {}
    for name, (tx, step) in steps.items():
      args_of[name] = (params, init(tx), batch)
      compiled[name] = step.lower(*args_of[name]).compile()
    measured = {name: _row(c) for name, c in compiled.items()}
    gap = _one_step_gap({n: (compiled[n], args_of[n]) for n in (SAM, HAND)})
    held = _per_device_bytes(params0, shardings)
    for name, r in measured.items():
      rows.append({
          "mode": mode, "layout": layout, "step": name,
          "collective_ops": r["n_ops"], "collectives": summary(r["ops"]),
          "collective_bytes": r["bytes"],
          "bytes_x_sgd": r["bytes"] / max(measured[SGD]["bytes"], 1),
          "bytes_x_hand_sam": r["bytes"] / max(measured[HAND]["bytes"], 1),
          "ops_x_sgd": r["n_ops"] / max(measured[SGD]["n_ops"], 1),
          "temp_bytes": r["temp"], "temp_x_hand_sam": r["temp"] / max(measured[HAND]["temp"], 1),
          "temp_x_sgd": r["temp"] / max(measured[SGD]["temp"], 1),
          "params_bytes_per_device": held, "temp_x_params": r["temp"] / held,
          "sam_vs_hand_sam_max_abs_diff": gap,
      })
  return rows


# --- Report --------------------------------------------------------------------------


def _hand(rows, r) -> dict:
  """The hand-written SAM row of ``r``'s setting."""
  return next(h for h in rows if h["step"] == HAND and (h["mode"], h["layout"]) == (
      r["mode"], r["layout"]))


def _table(rows) -> str:
  return report.markdown_table(
      ["mode", "layout", "step", "collective ops", "bytes / device", "bytes × SGD",
       "bytes − hand SAM", "temp MB", "temp × hand SAM", "temp × params"],
      [(r["mode"], LAYOUT_NAMES[r["layout"]], r["step"], r["collectives"],
        f"{r['collective_bytes']:,}", f"{r['bytes_x_sgd']:.3f}",
        f"{r['collective_bytes'] - _hand(rows, r)['collective_bytes']:+,}",
        f"{r['temp_bytes'] / 2**20:.2f}", f"{r['temp_x_hand_sam']:.3f}",
        f"{r['temp_x_params']:.2f}") for r in rows])


def headline(rows) -> str:
  sam = [r for r in rows if r["step"] == SAM]
  extra_bytes = [r["collective_bytes"] - _hand(rows, r)["collective_bytes"] for r in sam]
  extra_ops = [r["collective_ops"] - _hand(rows, r)["collective_ops"] for r in sam]
  t = [r["temp_x_hand_sam"] for r in sam]
  x = [r["bytes_x_sgd"] for r in sam if r["mode"] == "jit"]
  gap = max(r["sam_vs_hand_sam_max_abs_diff"] for r in sam)
  return (f"`sam_optax.sam` against the hand-written SAM step, over {len(sam)} settings: "
          f"collective bytes + {min(extra_bytes)}–{max(extra_bytes)} B and "
          f"{min(extra_ops)}–{max(extra_ops)} more collective ops (the step's statistics: "
          f"scalars); under `jit` {min(x):.3f}–{max(x):.3f} × SGD's bytes (the gradient is "
          f"reduced twice); temp memory × {min(t):.3f}–{max(t):.3f} the hand-written step's. "
          f"After one step the params of the two differ by {gap:.1e} at most.")


def plot(rows):
  plt = report.pyplot()
  settings = list(dict.fromkeys((r["mode"], r["layout"]) for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  width = 0.8 / len(STEPS)
  for i, name in enumerate(STEPS):
    for ax, key in zip(axes, ("bytes_x_sgd", "temp_x_params")):
      vals = [next(r[key] for r in rows if (r["mode"], r["layout"]) == s and r["step"] == name)
              for s in settings]
      ax.bar(np.arange(len(settings)) + (i - len(STEPS) / 2 + 0.5) * width, vals, width,
             label=name, color=f"C{i}")
  labels = [f"{mode}:\n{layout}" for mode, layout in settings]
  for ax in axes:
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(labels, fontsize=7)
  axes[0].set_ylabel("collective bytes per step / SGD's")
  axes[0].axhline(2, color="k", lw=0.5, ls=":")
  axes[0].set_title("Collective bytes per device and step")
  axes[1].set_ylabel("temp memory / params held per device")
  axes[1].set_title("Compiled temp memory (params and state donated)")
  axes[0].legend(fontsize=7)
  return fig


def write(rows, args, elapsed_s: float) -> str:
  """The table (``args.out``), its CSV and plot beside it; returns the text."""
  net_params = sum(a * b + b for a, b in zip(args.sizes[:-1], args.sizes[1:]))
  mesh_text = " × ".join(f"'{n}' {s}" for n, s in MESH_SHAPE)
  text = "\n\n".join([
      "# Pod scale: collectives and memory per step, by layout",
      ("Tiny model (smoke run). " if args.quick else "") + f"MLP {'→'.join(map(str, args.sizes))} ({net_params:,} params, float32, relu, "
      f"softmax cross-entropy), global batch {args.batch}, 8 simulated CPU devices as a "
      f"{mesh_text} mesh; SGD momentum {MOMENTUM} as the base optimizer, ρ = {RHO}. "
      "Every step is jitted with params and optimizer state donated, the state sharded "
      "like the params. `collective ops` and `bytes / device` are read from the compiled "
      "program (`compiled.as_text()`: all-reduce, all-gather, reduce-scatter, "
      "collective-permute, all-to-all; the bytes their operands hold on one device). "
      "`temp` is XLA's compiled temp memory (`memory_analysis()`); `temp × params` is over "
      "the bytes of the params one device holds. Under `jit` the step is plain SAM (one ε "
      "for the global batch), partitioned by GSPMD; under `shard_map` the params are "
      "replicated and every device perturbs with its own gradient (`axis_name`). No "
      "timing: these are properties of the compiled program.",
      _table(rows),
      headline(rows),
      "Layouts: data parallel (params replicated, batch over all devices); FSDP (every "
      "kernel's rows over all 8 devices); tensor parallel (kernels alternately column- and "
      "row-parallel within 'model', batch over 'data'); hybrid (kernels' rows sharded within "
      "'model', replicated across 'data', batch over all devices). XLA:CPU reduces FSDP "
      "gradients with all-reduce and all-to-all rather than reduce-scatter; other backends "
      "choose their own ops, so compare the rows of one layout with each other.",
      "Command: `" + " ".join(["python -m benchmarks.pod"] + args.argv) + "`",
  ])
  report.write(args.out, text, records=rows, figure=plot(rows),
               environment_line=environment.line(elapsed_s))
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1024, 1024, 10],
                      help="MLP layer sizes, input first (kernel rows divisible by 8)")
  parser.add_argument("--batch", type=int, default=256, help="global batch (divisible by 8)")
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
  parser.add_argument("--no-shard-map", dest="shard_map", action="store_false",
                      help="skip the shard_map row (data parallel, replicated params)")
  parser.add_argument("--quick", action="store_true", help="a tiny MLP: a smoke run")
  parser.add_argument("--out", default=os.path.join(report.RESULTS_DIR, "pod_cpu.md"))
  args = parser.parse_args(argv)
  args.argv = list(argv) if argv is not None else sys.argv[1:]
  if args.quick:
    args.sizes, args.batch = [32, 64, 64, 10], 32
  if any(s % 8 for s in args.sizes[:-1]) or args.batch % 8:
    parser.error("--sizes (but the last) and --batch must be multiples of 8 (the devices)")
  t0 = time.perf_counter()
  rows = run(args)
  text = write(rows, args, time.perf_counter() - t0)
  print(text)
  return rows


if __name__ == "__main__":
  main()
