"""The main job: SGD vs SAM (and its variants) on digits with noisy labels.

Offline and CPU-friendly: trains an MLP with SGD (momentum) and with the same
optimizer wrapped in :func:`sam_optax.sam` (and, with ``--methods``, in any
method of the library's list), on scikit-learn's digits whose training
labels are partly replaced by random ones, and reports the clean test
accuracy. Prints a table and writes it, the per-run results and a plot of the
accuracy curves to ``--out``.

Run ``python -m benchmarks.reproduce --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import optax

from benchmarks.harness import data as data_lib
from benchmarks.harness import environment
from benchmarks.harness import methods as methods_lib
from benchmarks.harness import report
from benchmarks.harness import training


def run(methods, *, noise: float, rho: float, lr: float, seeds: int, epochs: int,
        batch_size: int, hidden: int, progress=None) -> dict:
  """Trains every method on ``seeds`` seeds; returns per-method, per-seed results."""
  seed_list = list(range(seeds))
  data = data_lib.stack([data_lib.noisy_digits(noise, s) for s in seed_list])
  results = {}
  for method in methods:
    if progress is not None:
      progress.set_postfix(method=method)
    tx = methods_lib.build(method, optax.sgd(lr, momentum=0.9), rho)
    out = training.train_runs(tx, data, seed_list, sizes=(data.x_train.shape[-1], hidden, hidden, 10),
                              epochs=epochs, batch_size=batch_size, progress=progress)
    results[method] = [{
        "seed": s,
        "curve": [float(a) for a in out["curve"][i]],
        "best_test_acc": float(out["curve"][i].max()),
        "final_test_acc": float(out["curve"][i, -1]),
        "train_acc_noisy": float(out["train_acc_noisy"][i]),
    } for i, s in enumerate(seed_list)]
  return results


def format_table(results, args, elapsed_s: float) -> str:
  header = (f"Digits, {args.noise:.0%} label noise, MLP {args.hidden}x{args.hidden}, "
            f"SGD(lr={args.lr}, momentum=0.9, batch {args.batch_size}), SAM ρ={args.rho}, "
            f"{args.epochs} epochs, {args.seeds} seed(s); mean ± std over seeds")
  rows = []
  for method, runs in results.items():
    rows.append((method, methods_lib.describe(method, args.rho),
                 report.mean_std([r["best_test_acc"] for r in runs]),
                 report.mean_std([r["final_test_acc"] for r in runs]),
                 f"{np.mean([r['train_acc_noisy'] for r in runs]):.3f}"))
  table = report.markdown_table(
      ["method", "setting", "best clean test acc", "final clean test acc",
       "train acc (noisy labels)"], rows)
  return "\n".join([header, "", table, "", environment.line(elapsed_s)])


def plot(results, args, path: str) -> None:
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, runs in results.items():
    curves = np.array([r["curve"] for r in runs])
    epochs = np.arange(1, curves.shape[1] + 1)
    mean, std = curves.mean(0), curves.std(0)
    ax.plot(epochs, mean, label=method)
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
  ax.set_xlabel("epoch")
  ax.set_ylabel("clean test accuracy")
  ax.set_title(f"digits, {args.noise:.0%} label noise, {args.seeds} seed(s)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  available = methods_lib.names()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--noise", type=float, default=0.6, help="fraction of random training labels")
  parser.add_argument("--rho", type=float, default=0.3,
                      help="SAM radius (variants scale it, see the table's 'setting')")
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds")
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=256, help="MLP width (two hidden layers)")
  parser.add_argument("--methods", default="sgd,sam",
                      help=f"comma-separated, or 'all'; available: {','.join(available)}")
  parser.add_argument("--quick", action="store_true", help="1 seed, 8 epochs, width 64: a smoke run")
  parser.add_argument("--out", default="runs/main", help="folder for the table, JSON and plot")
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds, args.epochs, args.hidden = 1, 8, 64
  methods = methods_lib.parse(args.methods, available, "--methods", parser.error)
  if not 0 <= args.noise <= 1:
    parser.error(f"--noise {args.noise}: must be a fraction in [0, 1]")

  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  with tqdm(total=len(methods) * args.epochs, desc=f"training ({args.seeds} seeds at once)",
            unit="epoch") as bar:
    results = run(methods, noise=args.noise, rho=args.rho, lr=args.lr, seeds=args.seeds,
                  epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden,
                  progress=bar)
  elapsed = time.time() - t0

  table = format_table(results, args, elapsed)
  print("\n" + table)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"args": vars(args), "env": environment.environment(), "results": results}, f, indent=1)
  path = os.path.join(args.out, "accuracy.png")
  plot(results, args, path)
  print(f"wrote {args.out}/table.md, results.json and {path}")
  return results


if __name__ == "__main__":
  main()
