"""Step time and compiled memory of every method, side by side with its peers.

On the same model, batch and base optimizer (SGD with momentum), one jitted
training step (batch gradient, ``update``, ``apply_updates``) of:

- ``sgd``: the base optimizer alone (one pass per step);
- ``hand_sam``: a hand-written SAM step (two passes): the target;
- ``optax_contrib_sam``: ``optax.contrib.sam`` in opaque mode;
- every method of the library's list (``sam_optax._src.registry``) at its
  defaults: ``sam``, ``asam``, ..., ``looksam`` and ``interval_sam`` (the
  second pass every k-th step), ``msam`` (one pass);
- ``sam_m``: SAM with in-device m-sharpness, ``m = batch / 4``, per-group
  gradients from :func:`sam_optax.group_value_and_grad`.

Models (``--models``): an MLP, a CNN and a transformer block on random
inputs, and ``digits_mlp`` (64 → 512 → 512 → 10 on scikit-learn's digits).
Every step is compiled (compile time and XLA's compiled temp memory are
recorded), warmed up, then timed in interleaved rounds
(:mod:`benchmarks.harness.timing`): a round runs ``--steps-per-round``
consecutive steps of every method (whole periods of the every-k methods).
The table reports the median ms/step, the per-round ratios to SGD and to the
hand-written SAM step (median, IQR), the temp memory and its ratio to the
hand-written step, and the compilations of each step. Ratios are the result;
absolute times depend on the machine.

Run ``python -m benchmarks.step_time --help``; ``--out`` writes the markdown
table, a CSV and a bar plot.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness import data
from benchmarks.harness import methods as methods_lib
from benchmarks.harness import models
from benchmarks.harness import report
from benchmarks.harness import timing

REFERENCES = (methods_lib.BASE, "hand_sam")  # ratios are taken to these peers

# name -> (architecture, its sizes, its sizes for smoke runs, batch maker)
WORKLOADS = {
    "mlp": ("mlp", {}, models.SMALL["mlp"], data.random_batch),
    "cnn": ("cnn", {}, models.SMALL["cnn"], data.random_batch),
    "transformer": ("transformer", {}, models.SMALL["transformer"], data.random_batch),
    "digits_mlp": ("mlp", dict(sizes=(64, 512, 512, 10)), dict(sizes=(64, 32, 32, 10)),
                   data.digits_batch),
}
DEFAULT_MODELS = ("mlp", "cnn", "transformer")


def model(name: str, dtype=jnp.float32, small: bool = False) -> models.Model:
  arch, kwargs, small_kwargs, _ = WORKLOADS[name]
  return models.ARCHITECTURES[arch](**(small_kwargs if small else kwargs), dtype=dtype)


def cases(name: str, batch: int, dtype, methods: Optional[Sequence[str]] = None,
          seed: int = 0, small: bool = False) -> tuple[dict, dict]:
  """``({method: timing.Case}, {method: Entry})`` on one (model, batch, dtype)."""
  net = model(name, dtype, small)
  params = net.init(jax.random.PRNGKey(seed))
  xy = WORKLOADS[name][3](net.input_shape, batch, dtype)
  loss = models.cross_entropy(net.apply)
  base = optax.sgd(0.01, momentum=0.9)
  entries = {n: e for n, e in methods_lib.entries(batch).items() if not methods or n in methods}
  out = {}
  for method, entry in entries.items():
    init, step = entry.make(loss, base, batch)
    out[method] = timing.Case(jax.jit(step), (params, init(params), xy))
  return out, entries


def benchmark(name: str, batch: int, dtype, *, rounds: int, steps_per_round: int,
              methods: Optional[Sequence[str]] = None, seed: int = 0, small: bool = False):
  """Compiles and times every method on one (model, batch, dtype); returns stats."""
  steps, entries = cases(name, batch, dtype, methods, seed, small)
  rows = timing.measure(steps, rounds, steps_per_round)
  stats = {}
  for method, row in rows.items():
    st = {"ms": row["ms"], "compile_s": row["compile_s"], "temp_bytes": row["temp"],
          "times": row["times"], "passes": entries[method].passes,
          "compilations": steps[method].step._cache_size()}  # pylint: disable=protected-access
    for ref in REFERENCES:
      if ref in rows:
        paired = timing.paired(row, rows[ref])
        st[f"ratio_{ref}_median"], st[f"ratio_{ref}_iqr"] = paired["median"], paired["iqr"]
    stats[method] = st
  return stats


def records(results) -> list[dict]:
  out = []
  for (name, batch, dtype), stats in results.items():
    hand = stats.get("hand_sam", {})
    for method, st in stats.items():
      out.append({
          "model": name, "batch": batch, "dtype": dtype, "method": method,
          "ms_per_step": st["ms"],
          "x_sgd": st.get("ratio_sgd_median", float("nan")),
          "x_hand_sam": st.get("ratio_hand_sam_median", float("nan")),
          "x_hand_sam_iqr": "{:.3f}-{:.3f}".format(*st.get("ratio_hand_sam_iqr", (np.nan,) * 2)),
          "temp_mb": st["temp_bytes"] / 2**20,
          "temp_x_hand_sam": st["temp_bytes"] / hand.get("temp_bytes", float("nan")),
          "compile_s": st["compile_s"],
          "passes": st["passes"],
          "compilations": st["compilations"],
      })
  return out


def format_table(rows) -> str:
  return report.markdown_table(
      ["model", "batch", "dtype", "method", "passes", "ms/step", "× SGD",
       "× hand SAM (IQR over rounds)", "temp MB", "temp × hand SAM", "compile s",
       "compilations"],
      [(r["model"], r["batch"], r["dtype"], r["method"], f"{r['passes']:g}",
        f"{r['ms_per_step']:.2f}", f"{r['x_sgd']:.2f}",
        f"{r['x_hand_sam']:.3f} ({r['x_hand_sam_iqr']})", f"{r['temp_mb']:.3g}",
        f"{r['temp_x_hand_sam']:.3f}", f"{r['compile_s']:.2f}", r["compilations"])
       for r in rows])


def headline(rows) -> str:
  """SAM against the hand-written step; every method's cost against its passes."""
  sam = methods_lib.SAM.name
  ours = [r for r in rows if r["method"] == sam]
  text = ""
  if ours:
    t = [r["x_hand_sam"] for r in ours]
    text = (f"`sam_optax.{sam}` vs the hand-written SAM step over {len(ours)} configurations: "
            f"time × {np.median(t):.3f} median (range {min(t):.3f}–{max(t):.3f}; goal ≤ 1.01)")
    big = [r for r in ours if r["temp_mb"] >= 1.0]
    small = [r for r in ours if r["temp_mb"] < 1.0]
    if big:
      m = [r["temp_x_hand_sam"] for r in big]
      text += (f"; temp memory × {np.median(m):.3f} median (range {min(m):.3f}–{max(m):.3f}; "
               f"goal ≤ 1.05) where the step needs ≥ 1 MB of temp memory")
    if small:
      extra = [r["temp_mb"] * (1 - 1 / r["temp_x_hand_sam"]) for r in small]
      names = ", ".join(f"{r['model']} b={r['batch']}" for r in small)
      text += f"; below 1 MB ({names}) the difference is {max(extra) * 1024:.0f} KB at most"
    text += ".\n\n"
  per_method = {}
  for r in rows:
    per_method.setdefault((r["method"], r["passes"]), []).append(r["x_sgd"])
  return text + ("Time × SGD, median over configurations (passes per step): " + ", ".join(
      f"{m} {np.median(v):.2f} ({p:g})" for (m, p), v in per_method.items()) + ".")


def plot(rows):
  plt = report.pyplot()
  configs = list(dict.fromkeys((r["model"], r["batch"], r["dtype"]) for r in rows))
  names = list(dict.fromkeys(r["method"] for r in rows))
  fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.12 * len(configs) * len(names) + 3), 6.5),
                           sharex=True)
  width = 0.8 / len(names)
  for i, m in enumerate(names):
    for ax, key in zip(axes, ("x_sgd", "temp_x_hand_sam")):
      vals = [next((r[key] for r in rows if (r["model"], r["batch"], r["dtype"]) == c
                    and r["method"] == m), np.nan) for c in configs]
      ax.bar(np.arange(len(configs)) + (i - len(names) / 2 + 0.5) * width, vals, width,
             label=m, color=plt.cm.tab20(i % 20))
  axes[0].set_ylabel("time per step / SGD's")
  axes[0].axhline(1, color="k", lw=0.5)
  axes[0].axhline(2, color="k", lw=0.5, ls=":")
  axes[1].set_ylabel("temp memory / hand SAM's")
  axes[1].set_yscale("log")
  axes[1].axhline(1, color="k", lw=0.5)
  axes[1].set_xticks(np.arange(len(configs)))
  axes[1].set_xticklabels([f"{m}\nb={b}, {d}" for m, b, d in configs])
  axes[0].legend(ncol=min(7, len(names)), fontsize=6, loc="upper left")
  axes[0].set_title("Step time and compiled temp memory, side by side")
  fig.tight_layout()
  return fig


def write(out: str, title: str, rows, environment_line: Optional[str] = None) -> str:
  """Writes the table (``out``), ``.csv`` and ``.png`` beside it; returns the text."""
  text = "\n\n".join([title, format_table(rows), headline(rows)])
  report.write(out, text, records=rows, figure=plot(rows), environment_line=environment_line)
  return text


def replot(out: str):
  """Table and plot again from the CSV beside ``out`` (no measuring)."""
  with open(out) as f:
    title = f.readline().rstrip("\n")
  rows = report.read_csv(os.path.splitext(out)[0] + ".csv")
  print(write(out, title, rows, report.recorded_environment(out)))
  return rows


def main(argv=None):
  period = methods_lib.period()
  choices = methods_lib.entry_names()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=None,
                      help=f"comma-separated, from {','.join(WORKLOADS)} "
                      f"(default: {','.join(DEFAULT_MODELS)})")
  parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--steps-per-round", type=int, default=period,
                      help=f"a multiple of {period} holds whole periods of the every-k methods")
  parser.add_argument("--methods", default="all",
                      help=f"comma-separated subset of {','.join(choices)} (default: all)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny models, batch 8, 2 rounds: a smoke run (default models: mlp)")
  parser.add_argument("--out", default="", help="write the table to this .md file (+ .csv, .png)")
  parser.add_argument("--replot", action="store_true",
                      help="rewrite --out's table and plot from its CSV (no measuring)")
  args = parser.parse_args(argv)
  if args.replot:
    if not args.out:
      parser.error("--replot needs --out (the .md file of an earlier run)")
    return replot(args.out)
  if args.quick:
    args.batch, args.rounds, args.steps_per_round = [8], 2, period
  if args.models is None:
    args.models = "mlp" if args.quick else ",".join(DEFAULT_MODELS)
  names = methods_lib.parse(args.models, list(WORKLOADS), "--models", parser.error)
  chosen = methods_lib.parse(args.methods, choices, "--methods", parser.error)
  if not chosen:
    parser.error("no method to run (check --methods)")
  dtype = jnp.dtype(args.dtype)
  results = {}
  for name in names:
    for batch in args.batch:
      results[(name, batch, args.dtype)] = benchmark(
          name, batch, dtype, rounds=args.rounds, steps_per_round=args.steps_per_round,
          methods=chosen, small=args.quick)
  rows = records(results)
  title = (("Tiny models (smoke run). " if args.quick else "")
           + f"Step time, median over {args.rounds} interleaved rounds of "
           f"{args.steps_per_round} jitted steps per method (ratios: median of the per-round "
           "ratios). SGD(momentum 0.9) base; every method at its defaults (the hand-written "
           f"SAM and `optax.contrib.sam` at SAM's ρ = {methods_lib.SAM.defaults()['rho']}); "
           f"in-device m: {methods_lib.GROUPS} groups per batch.")
  if args.out:
    print(write(args.out, title, rows))
  else:
    print("\n\n".join([title, format_table(rows), headline(rows)]))
  return results


if __name__ == "__main__":
  main()
