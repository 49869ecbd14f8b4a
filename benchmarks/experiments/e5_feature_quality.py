"""E5: feature quality, measured the paper's way: linear probes on a frozen representation.

Springer, Nagarajan & Raghunathan (ICLR 2024) claim that SAM learns
*better features* when data hold redundant or spurious features: it
suppresses the well-learned (easy) feature so that the others get learned
too. They measure it with linear probes: freeze the trained network, fit a
linear classifier on its representation for each feature (with the other
feature made uninformative) and compare accuracies; on spurious data they
report worst-group accuracy. Three settings, all offline:

* ``toy``: the two-block toy of E4, with each unit's weights started in a
  random direction and noise in every coordinate, so a probe on the two
  hidden units reads how well each unit has *learned* its block's
  direction. Full-batch training, squared or logistic loss.
* ``dominoes`` (CIFAR-MNIST in spirit): each input is a scikit-learn digit
  (0 vs 1: the easy half, linearly separable) next to an MNIST-1D sequence
  (5 vs 8: the hard half; a linear readout of the raw sequence gets 0.76, an
  MLP trained on it alone about 0.9), both predicting the label in training.
  A ReLU MLP, cross-entropy, mini-batch SGD with momentum, alone or wrapped.
  The ``hard half only`` row trains on the hard half alone (the easy half
  random): the ceiling of the hard probe.
* ``spurious`` (Waterbirds in spirit): the label is the MNIST-1D class; the
  digit agrees with it on 95% of training examples. Worst-group accuracy
  over the 4 groups (label × digit) of the model, and of a linear probe
  refitted on a group-balanced held-out set (last-layer retraining).

Methods: SGD, :func:`sam_optax.sam`, :func:`sam_optax.asam` (ρ × 10, its
default scale) and m-SAM: SAM with in-device m-sharpness (``sam(..., m=)``,
one ε per group of m examples; not MSAM, the momentum method); a ρ sweep.
Probes: :func:`sam_optax.diagnostics.feature_reliance` and
:func:`sam_optax.diagnostics.linear_probe_accuracy`, fitted on one held-out
half of each probe set and scored on the other.

``python -m benchmarks.experiments.e5_feature_quality [--quick] [--seeds N]``
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from benchmarks.harness import experiment
from benchmarks.harness import methods as methods_lib
from benchmarks.harness import models
from benchmarks.harness import report
from benchmarks.harness.experiment import Experiment
from sam_optax._src.registry import BY_NAME

NAME = "e5_feature_quality"
M_SAM = "sam_m"  # SAM with in-device m-sharpness (m-SAM)
SETTINGS = ("toy", "dominoes", "spurious")


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  n: int = 200
  d: int = 20  # dimensions per block; the signal is on the first
  easy_margin: float = 1.0
  hard_margin: float = 0.2
  noise: float = 0.1
  init: float = 0.1  # ‖w‖ (random direction) and |v| of both units at initialization
  lr: float = 0.5
  steps: int = 3000
  warmup: int = 500  # ρ grows linearly from 0 over these steps
  m: int = 50  # m-SAM: groups of m examples of the full batch
  n_probe: int = 2000  # fresh examples per probe set (half fit the probe)
  losses: Sequence[str] = ("squared", "logistic")
  rhos: Sequence[float] = (0.05, 0.1, 0.2)  # SAM's ρ (ASAM's: × 10)


@dataclasses.dataclass(frozen=True)
class DominoConfig:
  easy_classes: tuple[int, int] = (0, 1)  # scikit-learn digits
  hard_classes: tuple[int, int] = (5, 8)  # MNIST-1D
  n_train: int = 2000
  n_probe: int = 2000  # per probe set: half from the probe-fit pools, half from the test pools
  agreement: float = 0.95  # spurious: P(digit class = label) in training
  hidden: tuple[int, ...] = (128, 64)  # the representation is the last hidden layer
  epochs: int = 30
  batch_size: int = 64
  lr: float = 0.05
  momentum: float = 0.9
  m: int = 16  # m-SAM: groups of m examples of a batch
  rhos: Sequence[float] = (0.05, 0.2, 0.5)  # SAM's ρ (ASAM's: × 10)


@dataclasses.dataclass(frozen=True)
class Config:
  settings: Sequence[str] = SETTINGS
  methods: Sequence[str] = ("sgd", "sam", "asam", M_SAM)
  toy: ToyConfig = ToyConfig()
  dominoes: DominoConfig = DominoConfig()
  seeds: Sequence[int] = tuple(range(5))


QUICK = Config(settings=("toy", "dominoes"), methods=("sgd", "sam"),
               toy=ToyConfig(steps=1500, warmup=300, losses=("squared",), rhos=(0.1,)),
               dominoes=DominoConfig(n_train=1024, n_probe=1000, epochs=8, rhos=(0.2,)),
               seeds=(0,))


# --- methods -------------------------------------------------------------------


def method_rho(method: str, rho: float) -> float:
  """The method's own ρ for SAM's ``rho`` (ASAM's is relative to |w|: × 10)."""
  return rho if method == M_SAM else rho * methods_lib.rho_scale(BY_NAME[method])


def make_step(method: str, base, rho, loss, m: int):
  """``(tx, step)``: ``base`` alone (``'sgd'``), wrapped in a library method
  (``rho``: its own ρ, a float or a schedule), or m-SAM (SAM with ``m=``)."""
  if method == methods_lib.BASE:
    return base, methods_lib.train_step(base, loss)
  if method == M_SAM:
    tx = sam_optax.sam(base, rho=rho, m=m)
    return tx, methods_lib.group_step(tx, loss, m)
  tx = BY_NAME[method].wrapper(base, rho=rho)
  return tx, methods_lib.train_step(tx, loss)


def _grid(cfg_methods, rhos):
  """``(method, SAM's ρ)`` pairs: SGD once, every other method at every ρ."""
  return [(m, 0.0) for m in cfg_methods if m == methods_lib.BASE] + [
      (m, r) for m in cfg_methods if m != methods_lib.BASE for r in rhos]


# --- probes (the library's diagnostics, as a user calls them) -------------------


def probe(rep, params, probes, grouped: bool = False):
  """Held-out probe accuracy per probe set (``feature_reliance``: fitted on
  the first half, scored on the second) and, with ``grouped``, the worst
  group of the hard probe: its second half holds the 4 groups (label ×
  easy class) in 4 equal consecutive blocks, each scored by
  ``linear_probe_accuracy`` with the probe fitted on the first half
  (``'worst_group'``).

  Traceable (run under ``jax.jit``): a diverged run's non-finite
  representation gives NaN instead of the eager ``ValueError``.
  """
  out = sam_optax.diagnostics.feature_reliance(rep, params, probes, num_classes=2)
  if grouped:
    x, y = probes["hard"]
    feats, half = rep(params, x), x.shape[0] // 2
    q = half // 4
    accs = [sam_optax.diagnostics.linear_probe_accuracy(
        feats[:half], y[:half], test_features=feats[half + g * q:half + (g + 1) * q],
        test_labels=y[half + g * q:half + (g + 1) * q], num_classes=2) for g in range(4)]
    out["worst_group"] = jnp.min(jnp.stack(accs))
  return out


def _accuracy(logits, y):
  return jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))


def _worst_group(logits, y):
  """Worst of 4 equal consecutive blocks (the groups of a balanced test half)."""
  q = y.shape[0] // 4
  return jnp.min(jnp.stack([_accuracy(logits[g * q:(g + 1) * q], y[g * q:(g + 1) * q])
                            for g in range(4)]))


# --- toy: the two-unit network of E4, probed ------------------------------------


def toy_data(seed: int, cfg: ToyConfig) -> dict:
  """Training set and probe sets; labels in {0, 1}, blocks ``a (2y − 1) e_1 + σ ξ``."""
  rng = np.random.default_rng(seed)

  def blocks(y_easy, y_hard):
    sign = lambda y: (2.0 * y - 1.0)[:, None] * np.eye(cfg.d)[0]
    n = len(y_easy)
    return np.concatenate(
        [cfg.noise * rng.normal(size=(n, cfg.d)) + cfg.easy_margin * sign(y_easy),
         cfg.noise * rng.normal(size=(n, cfg.d)) + cfg.hard_margin * sign(y_hard)], 1)

  y = rng.integers(0, 2, cfg.n)
  yp, other = rng.integers(0, 2, cfg.n_probe), rng.integers(0, 2, cfg.n_probe)
  f32, i32 = lambda a: a.astype(np.float32), lambda a: a.astype(np.int32)
  return {"x": f32(blocks(y, y)), "y": i32(y),
          "x_id": f32(blocks(yp, yp)), "x_hard": f32(blocks(other, yp)),
          "x_easy": f32(blocks(yp, other)), "y_probe": i32(yp)}


def toy_representation(params, x):
  """The two hidden units ``(w_e·x_e, w_h·x_h)``."""
  d = params["w_e"].shape[-1]
  return jnp.stack([x[:, :d] @ params["w_e"], x[:, d:] @ params["w_h"]], 1)


def toy_output(params, x):
  return toy_representation(params, x) @ jnp.stack([params["v_e"], params["v_h"]])


def _sign(y, like):
  """Labels {0, 1} as targets ±1 in the dtype of ``like``."""
  return (2 * y - 1).astype(like.dtype)


TOY_LOSSES = {
    "squared": lambda f, y: 0.5 * jnp.mean((f - _sign(y, f)) ** 2),
    "logistic": lambda f, y: jnp.mean(jax.nn.softplus(-_sign(y, f) * f)),
}


def toy_init(key, cfg: ToyConfig):
  ke, kh = jax.random.split(key)
  direction = lambda k: (lambda u: u / jnp.linalg.norm(u))(jax.random.normal(k, (cfg.d,)))
  return {"w_e": cfg.init * direction(ke), "v_e": jnp.asarray(cfg.init, jnp.float32),
          "w_h": cfg.init * direction(kh), "v_h": jnp.asarray(cfg.init, jnp.float32)}


def run_toy(method: str, rho: float, loss_name: str, cfg: ToyConfig, seeds) -> dict:
  """Trains every seed at once (full batch); per-seed metrics."""
  datas = [toy_data(s, cfg) for s in seeds]
  arrays = {k: jnp.asarray(np.stack([d[k] for d in datas])) for k in datas[0]}
  base = optax.sgd(cfg.lr)
  schedule = optax.linear_schedule(0.0, method_rho(method, rho), cfg.warmup) if rho else None
  loss = lambda p, b: TOY_LOSSES[loss_name](toy_output(p, b[0]), b[1])
  tx, step = make_step(method, base, schedule, loss, cfg.m)

  def one(seed, a):
    params = toy_init(jax.random.PRNGKey(seed), cfg)
    body = lambda carry, _: (step(*carry, (a["x"], a["y"])), None)
    (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=cfg.steps)
    params = methods_lib.unperturbed(params, state)
    two = lambda f: jnp.stack([-f, f], -1)  # the output as 2-class logits
    reliance = (jnp.abs(params["v_h"]) * jnp.linalg.norm(params["w_h"])
                / (jnp.abs(params["v_e"]) * jnp.linalg.norm(params["w_e"])))
    return {"params": params, "init": toy_init(jax.random.PRNGKey(seed), cfg),
            "train_loss": loss(params, (a["x"], a["y"])),
            "id_acc": _accuracy(two(toy_output(params, a["x_id"])), a["y_probe"]),
            "ood_acc": _accuracy(two(toy_output(params, a["x_hard"])), a["y_probe"]),
            "reliance": reliance}

  out = jax.jit(jax.vmap(one))(jnp.asarray(seeds), arrays)
  return _with_probes(out, arrays, toy_representation, grouped=False)


def _with_probes(out, arrays, rep, grouped: bool) -> dict:
  """``out`` (per run, stacked) with the probes of its ``params`` and ``init``.

  The probes run one seed at a time, outside the ``vmap`` over seeds: a
  batched ``jnp.linalg.solve`` (the probe's) inside the jitted ``vmap`` hung
  on a 2-core CPU (two LAPACK LU kernels each holding one of the two XLA
  threads while waiting for work queued behind the other).
  """
  fit = jax.jit(lambda p, a: probe(rep, p, {"hard": (a["x_hard"], a["y_probe"]),
                                            "easy": (a["x_easy"], a["y_probe"])}, grouped))
  params, init = out.pop("params"), out.pop("init")
  rows = []
  for i in range(len(next(iter(out.values())))):
    one = lambda tree: jax.tree.map(lambda x: x[i], tree)
    at_end, at_init = fit(one(params), one(arrays)), fit(one(init), one(arrays))
    rows.append({**{f"{k}_probe": v for k, v in at_end.items()},
                 "hard_probe_init": at_init["hard"]})
  out = {k: np.asarray(v) for k, v in out.items()}
  out.update({k: np.array([float(r[k]) for r in rows]) for k in rows[0]})
  return out


# --- dominoes: digits | MNIST-1D ------------------------------------------------


@functools.lru_cache(maxsize=1)
def _sources():
  """Standardized digits and MNIST-1D (generated offline: 20000 sequences)."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=import-outside-toplevel
  xd, yd = load_digits(return_X_y=True)
  args = get_dataset_args()
  args.num_samples, args.seed = 20000, 0
  m = make_dataset(args)
  xm = np.concatenate([m["x"], m["x_test"]]).astype(np.float64)
  ym = np.concatenate([m["y"], m["y_test"]])
  standardize = lambda x: ((x - x.mean(0)) / (x.std(0) + 1.0)).astype(np.float32)
  return standardize(xd.astype(np.float64)), yd, standardize(xm), ym


def _pools(labels, classes, rng, fractions):
  """Per class: disjoint index pools (train, probe fit, test) of the given fractions."""
  out = []
  for c in classes:
    idx = rng.permutation(np.flatnonzero(labels == c))
    cut = np.cumsum([int(f * len(idx)) for f in fractions[:-1]])
    out.append(np.split(idx, cut))
  return [[per_class[k] for per_class in out] for k in range(len(fractions))]


def domino_data(seed: int, cfg: DominoConfig, variant: str) -> dict:
  """One run's data (labels are the hard half's class; ``variant``: 'both
  halves', 'hard half only' or 'spurious').

  The hard probe set (easy class random, label = hard class) fits on its
  first half and scores on its second, whose 4 groups (label × easy class)
  sit in equal consecutive blocks; the easy probe set swaps the roles.
  """
  xd, yd, xm, ym = _sources()
  rng = np.random.default_rng(seed)
  easy = _pools(yd, cfg.easy_classes, rng, (0.6, 0.2, 0.2))
  hard = _pools(ym, cfg.hard_classes, rng, (0.5, 0.25, 0.25))

  def compose(k, y_easy, y_hard):
    e = np.array([rng.choice(easy[k][c]) for c in y_easy])
    h = np.array([rng.choice(hard[k][c]) for c in y_hard])
    return np.concatenate([xd[e], xm[h]], 1)

  n = cfg.n_train
  y = rng.integers(0, 2, n)
  if variant == "both halves":
    y_easy = y
  elif variant == "hard half only":
    y_easy = rng.integers(0, 2, n)
  elif variant == "spurious":
    y_easy = np.where(rng.random(n) < cfg.agreement, y, 1 - y)
  else:
    raise ValueError(f"unknown variant {variant!r}")
  half = cfg.n_probe // 2
  q = half // 4
  y_fit, other_fit = rng.integers(0, 2, half), rng.integers(0, 2, half)
  y_test = np.repeat([0, 0, 1, 1], q)  # groups: (label, easy class) = 00, 01, 10, 11
  other_test = np.repeat([0, 1, 0, 1], q)
  y_probe = np.concatenate([y_fit, y_test])
  x_hard = np.concatenate([compose(1, other_fit, y_fit), compose(2, other_test, y_test)])
  x_easy = np.concatenate([compose(1, y_fit, other_fit), compose(2, y_test, other_test)])
  y_id = rng.integers(0, 2, half)
  agree = 1.0 if variant == "both halves" else cfg.agreement
  id_easy = np.where(rng.random(half) < agree, y_id, 1 - y_id)
  i32 = lambda a: a.astype(np.int32)
  return {"x": compose(0, y_easy, y), "y": i32(y), "x_id": compose(2, id_easy, y_id),
          "y_id": i32(y_id), "x_hard": x_hard, "x_easy": x_easy, "y_probe": i32(y_probe)}


def mlp_representation(params, x):
  """The last hidden layer of :func:`benchmarks.harness.models.mlp`."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x


def run_dominoes(method: str, rho: float, variant: str, cfg: DominoConfig, seeds) -> dict:
  datas = [domino_data(s, cfg, variant) for s in seeds]
  arrays = {k: jnp.asarray(np.stack([d[k] for d in datas])) for k in datas[0]}
  d_in = datas[0]["x"].shape[1]
  model = models.mlp((d_in,) + tuple(cfg.hidden) + (2,))
  loss = models.cross_entropy(model.apply)
  base = optax.sgd(cfg.lr, momentum=cfg.momentum)
  tx, step = make_step(method, base, method_rho(method, rho) if rho else None, loss, cfg.m)
  n, b = cfg.n_train, cfg.batch_size
  steps = n // b

  def one(seed, a):
    key = jax.random.PRNGKey(seed)
    params = model.init(key)
    init = params

    def epoch(carry, e):
      order = jax.random.permutation(jax.random.fold_in(key, e), n)[:steps * b]
      body = lambda c, idx: (step(*c, (a["x"][idx], a["y"][idx])), None)
      carry, _ = jax.lax.scan(body, carry, order.reshape(steps, b))
      return carry, None

    (params, state), _ = jax.lax.scan(epoch, (params, tx.init(params)), jnp.arange(cfg.epochs))
    params = methods_lib.unperturbed(params, state)
    half = a["y_probe"].shape[0] // 2
    test_logits = model.apply(params, a["x_hard"][half:])
    return {"params": params, "init": init,
            "train_loss": loss(params, (a["x"], a["y"])),
            "id_acc": _accuracy(model.apply(params, a["x_id"]), a["y_id"]),
            "ood_acc": _accuracy(test_logits, a["y_probe"][half:]),
            "worst_group_acc": _worst_group(test_logits, a["y_probe"][half:])}

  out = jax.jit(jax.vmap(one))(jnp.asarray(seeds), arrays)
  return _with_probes(out, arrays, mlp_representation, grouped=True)


# --- the experiment ---------------------------------------------------------------


COLUMNS = ("hard_probe", "easy_probe", "hard_probe_init", "id_acc", "ood_acc",
           "worst_group_acc", "worst_group_probe", "reliance", "train_loss")


def runs(cfg: Config) -> list[tuple[str, str, str, float]]:
  """Every ``(setting, variant, method, SAM's ρ)`` that :func:`run` trains."""
  out = []
  for setting in cfg.settings:
    if setting == "toy":
      out += [(setting, l, m, r) for l in cfg.toy.losses for m, r in _grid(cfg.methods, cfg.toy.rhos)]
    elif setting == "dominoes":
      out += [(setting, "both halves", m, r) for m, r in _grid(cfg.methods, cfg.dominoes.rhos)]
      if methods_lib.BASE in cfg.methods:
        out.append((setting, "hard half only", methods_lib.BASE, 0.0))
    elif setting == "spurious":
      out += [(setting, "spurious", m, r) for m, r in _grid(cfg.methods, cfg.dominoes.rhos)]
    else:
      raise ValueError(f"unknown setting {setting!r}; use some of {', '.join(SETTINGS)}")
  return out


def run(cfg: Config = Config(), progress=None) -> list[dict]:
  records = []
  for setting, variant, method, rho in runs(cfg):
    if progress is not None:
      progress.set_postfix(setting=setting, variant=variant, method=method,
                           rho=method_rho(method, rho) if rho else 0)
    if setting == "toy":
      out = run_toy(method, rho, variant, cfg.toy, cfg.seeds)
    else:
      out = run_dominoes(method, rho, variant, cfg.dominoes, cfg.seeds)
    for i, seed in enumerate(cfg.seeds):
      rec = {"setting": setting, "variant": variant, "method": method, "rho": rho,
             "method_rho": method_rho(method, rho) if rho else 0.0, "seed": seed}
      rec.update({k: float(out[k][i]) if k in out else float("nan") for k in COLUMNS})
      rec["diverged"] = not np.isfinite(rec["train_loss"])
      if rec["diverged"]:  # NaN params: no accuracy is measured (argmax of NaN is 0)
        rec.update({k: float("nan") for k in COLUMNS if k != "hard_probe_init"})
      records.append(rec)
    if progress is not None:
      progress.update(1)
  return records


# --- report -------------------------------------------------------------------------


def _select(records, **match):
  return [r for r in records if all(r[k] == v for k, v in match.items())]


def _cell(values, fmt=".3f") -> str:
  v = np.asarray(values, np.float64)
  finite = v[np.isfinite(v)]
  if not finite.size:
    return "diverged" if v.size else "–"
  text = report.mean_std(finite, fmt)
  return text + (f" ({v.size - finite.size} diverged)" if finite.size < v.size else "")


def versus_base(records, setting: str, variant: str, method: str, rho: float,
                key: str = "hard_probe"):
  """Per seed (paired), ``method`` at ``rho`` minus the base optimizer: ``(mean
  difference, seeds above, seeds)``; ``None`` without a base run."""
  base = {r["seed"]: r[key] for r in _select(records, setting=setting, variant=variant,
                                              method=methods_lib.BASE)}
  rows = [r for r in _select(records, setting=setting, variant=variant, method=method, rho=rho)
          if r["seed"] in base and np.isfinite(r[key])]
  if not base or not rows:
    return None
  diff = np.array([r[key] - base[r["seed"]] for r in rows])
  return float(diff.mean()), int(np.sum(diff > 0)), len(rows)


def _blocks(records):
  return list(dict.fromkeys((r["setting"], r["variant"]) for r in records))


def _label(method: str) -> str:
  return {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", M_SAM: "m-SAM"}.get(method, method)


TABLES = {
    "toy": (("hard_probe", "hard probe"), ("easy_probe", "easy probe"),
            ("reliance", "c_h / c_e"), ("ood_acc", "acc., easy block random"),
            ("train_loss", "train loss")),
    "dominoes": (("hard_probe", "hard probe (MNIST-1D)"), ("easy_probe", "easy probe (digit)"),
                 ("id_acc", "ID acc."), ("ood_acc", "acc., digit random"),
                 ("train_loss", "train loss")),
    "spurious": (("hard_probe", "hard probe (MNIST-1D)"),
                 ("worst_group_probe", "worst group, probe refitted"),
                 ("worst_group_acc", "worst group, model"), ("id_acc", "ID acc. (95%)"),
                 ("train_loss", "train loss")),
}


def summarize(records, cfg: Config = None) -> str:
  out = []
  for setting in dict.fromkeys(r["setting"] for r in records):
    cols = TABLES[setting]
    rows = []
    for _, variant in [b for b in _blocks(records) if b[0] == setting]:
      for method, rho in dict.fromkeys((r["method"], r["rho"]) for r in
                                       _select(records, setting=setting, variant=variant)):
        rs = _select(records, setting=setting, variant=variant, method=method, rho=rho)
        vs = versus_base(records, setting, variant, method, rho)
        name = "GD" if setting == "toy" and method == "sgd" else _label(method)
        row = [variant, name, f"{rs[0]['method_rho']:g}" if rho else "–"]
        row += [_cell([r[k] for r in rs], ".1e" if k == "train_loss" else
                      ".3g" if k == "reliance" else ".3f") for k, _ in cols[:1]]
        row.append("–" if vs is None or method == methods_lib.BASE
                   else f"{vs[0]:+.3f} ({vs[1]}/{vs[2]})")
        row += [_cell([r[k] for r in rs], ".1e" if k == "train_loss" else
                      ".3g" if k == "reliance" else ".3f") for k, _ in cols[1:]]
        rows.append(row)
    init = _cell([r["hard_probe_init"] for r in _select(records, setting=setting)])
    header = ["variant", "method", "ρ", cols[0][1], "Δ hard probe vs "
              + ("GD" if setting == "toy" else "SGD") + " (seeds above)"] + [c[1] for c in cols[1:]]
    out.append(f"**{setting}** (mean ± std over seeds; hard probe of the untrained network: "
               f"{init})\n\n" + report.markdown_table(header, rows))
  reading = findings(records)
  return "\n\n".join(out) + ("\n\n**Reading**\n\n" + reading if reading else "")


def findings(records) -> str:
  """Per setting and method: the best ρ's change of the hard probe against the base."""
  lines = []
  for setting, variant in _blocks(records):
    parts = []
    for method in dict.fromkeys(r["method"] for r in _select(records, setting=setting,
                                                              variant=variant)):
      if method == methods_lib.BASE:
        continue
      best = None
      for rho in dict.fromkeys(r["rho"] for r in _select(records, setting=setting,
                                                          variant=variant, method=method)):
        vs = versus_base(records, setting, variant, method, rho)
        if vs is not None and (best is None or vs[0] > best[1][0]):
          best = (rho, vs)
      if best is not None:
        rho, (diff, above, n) = best
        parts.append(f"{_label(method)} {diff:+.3f} at ρ = {method_rho(method, rho):g} "
                     f"({above}/{n} seeds above)")
    if parts:
      where = setting if variant == setting else f"{setting}, {variant}"
      lines.append(f"{where}: best hard-probe change over the base: "
                   + "; ".join(parts) + ".")
  return "\n".join(f"- {l}" for l in lines)


def plot(records, cfg: Config = None):
  plt = report.pyplot()
  blocks = [b for b in _blocks(records) if b[1] != "hard half only"]
  panels = blocks + ([("spurious", "worst group")] if any(b[0] == "spurious" for b in blocks)
                     else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
  for ax, (setting, variant) in zip(axes[0], panels):
    key, v = (("worst_group_probe", "spurious") if variant == "worst group"
              else ("hard_probe", variant))
    rs = _select(records, setting=setting, variant=v)
    def mean(rows, k=key):
      v = np.asarray([r[k] for r in rows], np.float64)
      return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else np.nan

    rhos = sorted({r["rho"] for r in rs if r["rho"]})
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rs)):
      if method == methods_lib.BASE:
        ax.axhline(mean(_select(rs, method=method)), color="k",
                   label="GD" if setting == "toy" else "SGD")
        if variant == "worst group":
          ax.axhline(mean(_select(rs, method=method), "worst_group_acc"), color="k", ls=":")
        continue
      ys = [mean(_select(rs, method=method, rho=r)) for r in rhos]
      ax.plot(rhos, ys, marker="o", color=f"C{i}", label=_label(method))
      if variant == "worst group":
        ax.plot(rhos, [mean(_select(rs, method=method, rho=r), "worst_group_acc") for r in rhos],
                marker="x", ls=":", color=f"C{i}")
    if variant != "worst group":
      ax.axhline(mean(rs, "hard_probe_init"), color="gray", ls=":", label="untrained")
    oracle = _select(records, setting=setting, variant="hard half only")
    if oracle and variant != "worst group":
      ax.axhline(mean(oracle), color="gray", ls="--", label="trained on hard half only")
    if rhos:
      ax.set_xscale("log")
      ax.set_xticks(rhos, [f"{r:g}" for r in rhos])
      ax.minorticks_off()
    ax.set_xlabel("SAM's ρ (ASAM: × 10)")
    ax.set_ylabel("worst-group acc. (solid: probe, dotted: model)" if variant == "worst group"
                  else "hard-feature probe acc.")
    ax.set_title(setting if variant == setting else f"{setting}: {variant}", fontsize=10)
    ax.legend(fontsize=7)
  fig.suptitle("E5: feature quality (linear probes on the frozen representation)")
  return fig


def notes(records, cfg: Config) -> str:
  t, d = cfg.toy, cfg.dominoes
  return (
      f"Setup. **toy**: n = {t.n}, blocks of d = {t.d}: x_B = a_B (2y − 1) e_1 + {t.noise} ξ, "
      f"a_e = {t.easy_margin}, a_h = {t.hard_margin}; f(x) = v_e (w_e·x_e) + v_h (w_h·x_h), "
      f"w_e, w_h of norm {t.init} in random directions, |v| = {t.init}; `optax.sgd({t.lr})`, "
      f"{t.steps} full-batch steps, ρ warmed up linearly over {t.warmup} (as in E4); m-SAM: "
      f"m = {t.m}. Representation: the two units (w_e·x_e, w_h·x_h). **dominoes**: digits "
      f"{d.easy_classes[0]} vs {d.easy_classes[1]} (64 pixels) next to MNIST-1D "
      f"{d.hard_classes[0]} vs {d.hard_classes[1]} (40 samples), each standardized; "
      f"{d.n_train} training pairs (label = MNIST-1D class; digit class = label, random for "
      f"'hard half only', equal to the label with probability {d.agreement} for **spurious**); "
      f"MLP {'-'.join(map(str, d.hidden))} (ReLU), cross-entropy, `optax.sgd({d.lr}, "
      f"momentum={d.momentum})`, batch {d.batch_size}, {d.epochs} epochs; m-SAM: m = {d.m}. "
      "Representation: the last hidden layer. Digits split 60/20/20 and MNIST-1D 50/25/25 "
      "into training, probe-fit and test pools, per seed.\n\n"
      "Measurement (the paper's): the hard probe set has the easy half random and the hard "
      "class as label, the easy probe set the other way round; a ridge probe "
      "(`linear_probe_accuracy`, via `feature_reliance`) is fitted on the representation of "
      f"{d.n_probe // 2} (toy: {t.n_probe // 2}) held-out examples and scored on as many "
      "others. Worst group: the 4 groups (label × digit class) of the test half in equal "
      "numbers; 'probe refitted' is the probe fitted on a group-balanced held-out set "
      "(last-layer retraining), 'model' the trained network's own head. 'acc., easy block / "
      "digit random': the network's own accuracy when only the hard half carries the label. "
      f"Δ: paired by seed; {len(cfg.seeds)} seeds. ρ is SAM's (ASAM: × 10, its default "
      "scale).\n\n"
      "Reading (the committed run). The claim holds in the toy with the squared loss: SAM, "
      "ASAM and m-SAM keep turning the hard unit towards the hard block's direction after "
      "the easy unit has fitted the data, so the hard probe rises on every seed (GD 0.77, "
      "SAM ρ = 0.2 0.97) and, at the larger ρ, the output moves onto the hard block (ASAM "
      "ρ = 0.5: 0.84 accuracy with the easy block random; ASAM diverges on 4/5 seeds at "
      "ρ = 1 and 5/5 at ρ = 2, perturbations as large as the weights). With the logistic loss it does not: the loss "
      "keeps falling as the weights grow, a fixed ρ becomes negligible against them, and "
      "every method ends where GD ends (Δ ≤ 0.003). On the digits | MNIST-1D dominoes no "
      "method or ρ raises the MNIST-1D probe above SGD's; training on both halves leaves "
      "it at or below the untrained network's (0.64 vs 0.66; trained on the hard half "
      "alone: 0.89), and larger ρ lowers it further. On the spurious split SAM and m-SAM at "
      "ρ = 0.05 are level with SGD, and larger ρ lowers the hard probe and both worst-group "
      "accuracies. The paper's evidence is on ResNets over CelebA, Waterbirds, CIFAR-MNIST "
      "and DomainBed; these small offline versions reproduce the mechanism in the toy, not "
      "the real-data result.")


def _flags(parser):
  parser.add_argument("--settings", default="", help="comma-separated: " + ",".join(SETTINGS))


def _configure(cfg: Config, args) -> Config:
  if args.settings:
    cfg = dataclasses.replace(cfg, settings=tuple(args.settings.split(",")))
  return cfg


def _from_records(cfg: Config, records) -> Config:
  settings = tuple(dict.fromkeys(r["setting"] for r in records))
  return dataclasses.replace(cfg, settings=settings)


class _Log:
  """One printed line per trained configuration (the progress of :func:`main`)."""

  def __init__(self):
    self.t0 = time.time()

  def set_postfix(self, **fields):
    print(f"[{time.time() - self.t0:5.0f} s] " + ", ".join(f"{k} {v}" for k, v in fields.items()),
          flush=True)

  def update(self, n):
    del n


EXPERIMENT = Experiment(
    name=NAME, title="E5: feature quality via linear probes (SGD, SAM, ASAM, m-SAM)",
    doc=__doc__, default=Config(), quick=QUICK, run=lambda cfg, progress: run(cfg, _Log()),
    summarize=summarize, notes=notes, plot=plot, flags=_flags, configure=_configure,
    from_records=_from_records)


main = experiment.entry_point(EXPERIMENT)


if __name__ == "__main__":
  main()
