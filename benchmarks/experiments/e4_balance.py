"""E4: balanced feature learning. SAM relies more on a hard feature than GD.

Springer et al. (2024): when two features both predict the label, plain
gradient descent learns the easy one (large margin) and all but ignores the
hard one (small margin), while SAM suppresses the well-learned feature and
learns both. Toy version: ``x = (x_e, x_h)``, each block ``a·y·1/√d + σ ξ``
with margins ``a_e ≫ a_h``; a two-layer network with one hidden unit per
block, ``f(x) = v_e σ(w_e·x_e) + v_h σ(w_h·x_h)``, squared loss to ``y = ±1``,
full-batch GD alone or in :func:`sam_optax.sam`. Reliance on the hard feature:
``|v_h|‖w_h‖ / |v_e|‖w_e‖``
(:func:`sam_optax.diagnostics.block_contributions`).

``python -m benchmarks.experiments.e4_balance [--quick] [--seeds N]``
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from benchmarks.harness import experiment
from benchmarks.harness import methods
from benchmarks.harness import report
from benchmarks.harness.experiment import Experiment

NAME = "e4_balance"

ACTIVATIONS = {"linear": lambda z: z, "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class Config:
  n: int = 200
  d: int = 5  # dimensions per block
  easy_margin: float = 1.0
  hard_margin: float = 0.2
  noise: float = 0.05
  init: float = 0.1  # ‖w‖ and |v| of both units at initialization
  lr: float = 0.5
  steps: int = 3000
  warmup: int = 500  # ρ grows linearly from 0 over these steps
  rhos: Sequence[Optional[float]] = (None, 0.05, 0.1, 0.2)  # None: plain GD
  activations: Sequence[str] = ("linear", "tanh")
  seeds: Sequence[int] = tuple(range(5))


QUICK = Config(steps=1500, warmup=300, rhos=(None, 0.2), activations=("linear",), seeds=(0,))


def make_data(seed: int, cfg: Config):
  rng = np.random.default_rng(seed)
  y = rng.choice([-1.0, 1.0], cfg.n)
  blocks = [cfg.noise * rng.normal(size=(cfg.n, cfg.d)) + a * y[:, None] / np.sqrt(cfg.d)
            for a in (cfg.easy_margin, cfg.hard_margin)]
  return tuple(b.astype(np.float32) for b in blocks) + (y.astype(np.float32),)


def model(params, xe, xh, activation):
  act = ACTIVATIONS[activation]
  return params["v_e"] * act(xe @ params["w_e"]) + params["v_h"] * act(xh @ params["w_h"])


def init_params(cfg: Config):
  w = jnp.full((cfg.d,), cfg.init / np.sqrt(cfg.d))
  v = jnp.asarray(cfg.init)
  return {"w_e": w, "v_e": v, "w_h": w, "v_h": v}


def reliance(params) -> jax.Array:
  """``|v_h|‖w_h‖ / |v_e|‖w_e‖`` via :func:`sam_optax.diagnostics.block_contributions`."""
  d = params["w_e"].shape[-1]
  kernel = jnp.zeros((2 * d, 2)).at[:d, 0].set(params["w_e"]).at[d:, 1].set(params["w_h"])
  head = jnp.stack([params["v_e"], params["v_h"]])
  c = sam_optax.diagnostics.block_contributions(
      kernel, head, {"easy": slice(0, d), "hard": slice(d, 2 * d)})
  return c["hard"] / c["easy"]


def train(rho: Optional[float], activation: str, cfg: Config):
  """Trains GD (``rho=None``) or SAM on every seed at once; returns per-seed metrics."""
  datas = [make_data(s, cfg) for s in cfg.seeds]
  tests = [make_data(s + 10_000, cfg) for s in cfg.seeds]
  stack = lambda ds, i: jnp.asarray(np.stack([d[i] for d in ds]))
  xe, xh, y = (stack(datas, i) for i in range(3))
  te, th, ty = (stack(tests, i) for i in range(3))
  base = optax.sgd(cfg.lr)
  tx = base if rho is None else sam_optax.sam(
      base, rho=optax.linear_schedule(0.0, rho, cfg.warmup))

  def loss(params, batch):
    xe, xh, y = batch
    return 0.5 * jnp.mean((model(params, xe, xh, activation) - y) ** 2)

  step = methods.train_step(tx, loss)

  def one_run(xe, xh, y, te, th, ty):
    params = init_params(cfg)
    body = lambda carry, _: (step(*carry, (xe, xh, y)), None)
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=cfg.steps)
    acc = lambda a, b: jnp.mean((jnp.sign(model(params, a, b, activation)) == ty).astype(jnp.float32))
    # Out of distribution: the easy block taken from other examples (reversed
    # order; labels are independent), so only the hard block carries the label.
    return {"ratio": reliance(params), "train_loss": loss(params, (xe, xh, y)),
            "test_acc": acc(te, th), "shuffled_easy_acc": acc(te[::-1], th)}

  out = jax.jit(jax.vmap(one_run))(xe, xh, y, te, th, ty)
  return {k: np.asarray(v) for k, v in out.items()}


def run(cfg: Config = Config(), progress=None) -> list[dict]:
  records = []
  for activation in cfg.activations:
    for rho in cfg.rhos:
      out = train(rho, activation, cfg)
      for i, s in enumerate(cfg.seeds):
        records.append({"activation": activation, "method": "gd" if rho is None else "sam",
                        "rho": 0.0 if rho is None else rho, "seed": s,
                        **{k: float(v[i]) for k, v in out.items()}})
  return records


def mean_ratio(records, *, activation: str, method: str, rho: float) -> float:
  """Geometric mean over seeds of the hard/easy reliance ratio."""
  vals = [r["ratio"] for r in records
          if r["activation"] == activation and r["method"] == method and r["rho"] == rho]
  return float(np.exp(np.mean(np.log(vals))))


def summarize(records, cfg: Config = None) -> str:
  keys = list(dict.fromkeys((r["activation"], r["method"], r["rho"]) for r in records))
  rows = []
  for act, method, rho in keys:
    rs = [r for r in records if (r["activation"], r["method"], r["rho"]) == (act, method, rho)]
    ratios = np.array([r["ratio"] for r in rs])
    rows.append((act, "GD" if method == "gd" else f"SAM ρ={rho:g}",
                 f"{ratios.mean():.3g} ± {ratios.std():.2g}",
                 f"{mean_ratio(records, activation=act, method=method, rho=rho):.3g}",
                 report.mean_std([r["train_loss"] for r in rs], ".1e"),
                 report.mean_std([r["test_acc"] for r in rs], ".3f"),
                 report.mean_std([r["shuffled_easy_acc"] for r in rs], ".3f")))
  return report.markdown_table(
      ["units", "method", "hard/easy reliance |v_h|‖w_h‖ / |v_e|‖w_e‖", "geometric mean",
       "train loss", "test acc", "test acc, easy block shuffled"], rows)


def plot(records, cfg: Config = None):
  plt = report.pyplot()
  acts = list(dict.fromkeys(r["activation"] for r in records))
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, act in enumerate(acts):
    rhos = sorted({r["rho"] for r in records if r["activation"] == act})
    for rho in rhos:
      vals = [r["ratio"] for r in records if r["activation"] == act and r["rho"] == rho]
      ax.scatter([rho] * len(vals), vals, color=f"C{i}", alpha=0.4, s=14)
    ax.plot(rhos, [mean_ratio(records, activation=act, method="gd" if rho == 0 else "sam", rho=rho)
                   for rho in rhos], color=f"C{i}", marker="o", label=f"{act} units")
  ax.axhline(1.0, color="k", lw=0.5, ls=":")
  ax.set_yscale("log")
  ax.set_xlabel("SAM ρ (0: plain GD)")
  ax.set_ylabel("hard/easy reliance")
  ax.set_title("E4: reliance on the hard feature")
  ax.legend()
  return fig


def notes(records, cfg: Config) -> str:
  return (
      f"Setup: n = {cfg.n} examples, y = ±1; easy block a_e = {cfg.easy_margin}, hard block "
      f"a_h = {cfg.hard_margin}, each {cfg.d}-dimensional (x_B = a_B y 1/√{cfg.d} + "
      f"{cfg.noise} ξ); both units start at ‖w‖ = |v| = {cfg.init}; squared loss; "
      f"`optax.sgd({cfg.lr})`, {cfg.steps} full-batch steps, alone (GD) or in "
      f"`sam_optax.sam(..., rho=optax.linear_schedule(0, ρ, {cfg.warmup}))` (from so small an "
      "init, a full ρ at step 0 pushes both units to 0). Test: fresh data from the same "
      "distribution; 'easy block shuffled': the easy block taken from other test examples, so "
      f"only the hard block carries the label (chance = 0.5). {len(cfg.seeds)} seeds.\n\n"
      "Reference (one numpy calibration run): GD 0.022, SAM (ρ = 0.2) 0.57. With linear "
      "units SAM moves along the set of fits towards the flatter one, which puts the weight "
      "on the small-margin (hard) block; with saturating tanh units it can instead flatten "
      "the loss by saturating the easy unit, and relies less on the hard block than GD does: "
      "the balancing effect depends on the architecture.")


EXPERIMENT = Experiment(
    name=NAME, title="E4: balanced feature learning, GD vs SAM", doc=__doc__,
    default=Config(), quick=QUICK, run=run, summarize=summarize, notes=notes, plot=plot)


main = experiment.entry_point(EXPERIMENT)


if __name__ == "__main__":
  main()
