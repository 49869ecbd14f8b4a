"""Cost per step of each SAM variant, as a ratio to plain SGD.

Every method trains the same MLP on the same batch (scikit-learn's digits, no
download) with the same base optimizer (SGD, momentum 0.9). A step is the
whole jitted training step: the batch gradient, the transform's ``update``
(with its second pass, if any) and ``apply_updates``. The methods are timed
side by side in one run: each round times one block of ``--block`` steps of
every method, in a shuffled order, and a method's cost is the median over the
rounds of its mean step time in a block. A block spans whole periods of the
every-k methods (LookSAM, interval SAM), so their cheap and SAM steps are
both counted.

Run ``python -m benchmarks.variants_cost`` (writes
``benchmarks/results/variants_cost.md``); ``--help`` for the flags.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

K = 5  # period of LookSAM and interval SAM


def methods(base):
  """name -> (transform, needs loss_fn, second passes per step)."""
  return {
      "SGD (base)": (base, False, 0.0),
      "SAM": (sam_optax.sam(base, rho=0.05), True, 1.0),
      "ASAM": (sam_optax.asam(base, rho=0.5, eta=0.01), True, 1.0),
      "Fisher-SAM": (sam_optax.fisher_sam(base, rho=0.1, eta=1.0), True, 1.0),
      "GSAM": (sam_optax.gsam(base, rho=0.05, alpha=0.1), True, 1.0),
      "GNP": (sam_optax.gnp(base, rho=0.1, alpha=0.8), True, 1.0),
      f"LookSAM (k={K})": (sam_optax.looksam(base, rho=0.05, k=K, alpha=0.7), True, 1 / K),
      f"interval SAM (k={K})": (sam_optax.interval_sam(base, rho=0.05, k=K), True, 1 / K),
      "VaSSO": (sam_optax.vasso(base, rho=0.05, theta=0.9), True, 1.0),
      "F-SAM": (sam_optax.friendly_sam(base, rho=0.05), True, 1.0),
      "MSAM": (sam_optax.msam(base, rho=0.3, momentum=0.9), False, 0.0),
  }


def init_mlp(key, sizes):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a),
                   "b": jnp.zeros((b,))})
  return params


def mlp_loss(params, x, y):
  h = x
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = h @ params[-1]["w"] + params[-1]["b"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make_step(tx, needs_loss_fn, x, y):
  def step(params, state):
    loss_fn = lambda p: mlp_loss(p, x, y)
    value, grads = jax.value_and_grad(loss_fn)(params)
    kwargs = {"loss_fn": loss_fn} if needs_loss_fn else {}
    updates, state = tx.update(grads, state, params, value=value, **kwargs)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=512, help="width of the two hidden layers")
  parser.add_argument("--batch", type=int, default=512, help="examples per step")
  parser.add_argument("--block", type=int, default=K, help="steps per timed block (a multiple of k)")
  parser.add_argument("--rounds", type=int, default=60, help="timed blocks per method (median)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "variants_cost.md"))
  args = parser.parse_args(argv)

  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  x, y = load_digits(return_X_y=True)
  x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
  rng = np.random.default_rng(args.seed)
  idx = rng.choice(len(x), args.batch, replace=False)
  x, y = jnp.asarray(x[idx]), jnp.asarray(y[idx])
  sizes = (x.shape[1], args.hidden, args.hidden, 10)
  params0 = init_mlp(jax.random.PRNGKey(args.seed), sizes)
  n_params = sum(p.size for p in jax.tree.leaves(params0))

  base = optax.sgd(0.05, momentum=0.9)
  table = methods(base)
  runs = {}
  for name, (tx, needs_loss_fn, _) in table.items():
    step = make_step(tx, needs_loss_fn, x, y)
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    for _ in range(2 * K):  # compile and warm up (both kinds of step)
      params, state = step(params, state)
    jax.block_until_ready(params)
    runs[name] = [step, params, state, []]

  names = list(runs)
  for _ in range(args.rounds):
    rng.shuffle(names)
    for name in names:
      step, params, state, times = runs[name]
      t0 = time.perf_counter()
      for _ in range(args.block):
        params, state = step(params, state)
      jax.block_until_ready((params, state))
      times.append((time.perf_counter() - t0) / args.block)
      runs[name][1:3] = [params, state]

  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  med = {name: statistics.median(r[3]) for name, r in runs.items()}
  # Ratio to SGD within each round (same moment, so the same load), median.
  sgd_times = runs["SGD (base)"][3]
  ratio = {name: statistics.median(t / s for t, s in zip(r[3], sgd_times))
           for name, r in runs.items()}
  compiles = {name: r[0]._cache_size() for name, r in runs.items()}
  lines = [
      "# Cost per step of each SAM variant (ratio to SGD)",
      "",
      f"Measured by `python -m benchmarks.variants_cost` on {datetime.date.today()}: "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
      f"(shared with other jobs: load average {load:.1f} at the end), jax "
      f"{jax.__version__}, optax {optax.__version__}, backend "
      f"{jax.default_backend()}.",
      "",
      f"MLP {' → '.join(map(str, sizes))} (ReLU, {n_params:,} params), batch "
      f"{args.batch} from scikit-learn's digits, base optimizer `optax.sgd(0.05, "
      f"momentum=0.9)`. One step = batch gradient + `update` + `apply_updates`, "
      f"jitted. All methods timed side by side in one run: {args.rounds} rounds, "
      f"each timing a block of {args.block} consecutive steps of every method in "
      f"shuffled order ({args.rounds * args.block} steps per method). "
      "`ms / step`: median over rounds of the mean step time in a block. "
      "`ratio to SGD`: median over rounds of the block time divided by SGD's "
      "block time in the same round (pairing cancels slow changes in the "
      "machine's load).",
      "",
      "| method | second passes / step | ms / step | ratio to SGD | compilations |",
      "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name, (_, _, passes) in table.items():
    lines.append(f"| {name} | {passes:.1f} | {1e3 * med[name]:.2f} | "
                 f"{ratio[name]:.2f}× | {compiles[name]} |")
  look = ratio[f"LookSAM (k={K})"]
  msam = ratio["MSAM"]
  lines += [
      "",
      f"Targets: LookSAM (k={K}) ≤ 1.25× SGD: {look:.2f}× "
      f"({'met' if look <= 1.25 else 'NOT met'}); MSAM ≤ 1.05× SGD: {msam:.2f}× "
      f"({'met' if msam <= 1.05 else 'NOT met'}). One compilation per method "
      "(both kinds of LookSAM/interval step share one program).",
      "",
  ]
  stem = os.path.splitext(args.out)[0]
  lines += [f"Per-method values: `{os.path.basename(stem)}.csv`. Plot: "
            f"`{os.path.basename(stem)}.png`.", ""]
  text = "\n".join(lines)
  print(text)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  with open(stem + ".csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "second_passes_per_step", "median_ms_per_step",
                "ratio_to_sgd", "compilations", "rounds", "block"])
    for name, (_, _, passes) in table.items():
      w.writerow([name, passes, f"{1e3 * med[name]:.4f}", f"{ratio[name]:.4f}",
                  compiles[name], args.rounds, args.block])
  plot(table, ratio, stem + ".png")
  return ratio


def plot(table, ratio, path: str) -> None:
  """Bar chart of each method's cost × SGD, with the 1× and 2× lines."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(table)
  fig, ax = plt.subplots(figsize=(9, 3.8))
  kinds = {"no second pass": "C0", "a second pass every k steps": "C1",
           "a second pass every step": "C2"}

  def kind(passes):
    return list(kinds)[0 if passes == 0 else 1 if passes < 1 else 2]

  ax.bar(range(len(names)), [ratio[n] for n in names],
         color=[kinds[kind(table[n][2])] for n in names])
  for label, color in kinds.items():
    ax.bar([0], [0], color=color, label=label)
  ax.legend(fontsize=7, loc="upper right")
  for i, n in enumerate(names):
    ax.text(i, ratio[n], f"{ratio[n]:.2f}", ha="center", va="bottom", fontsize=7)
  ax.axhline(1, color="k", lw=0.5)
  ax.axhline(2, color="k", lw=0.5, ls=":")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("step time / SGD's (paired median)")
  ax.set_title("Cost per step of each SAM variant")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
