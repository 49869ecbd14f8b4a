"""Shared pieces of the benchmarks: methods, data, a vectorized trainer, outputs.

* :func:`methods`: the optimizers to compare, built from what ``sam_optax``
  exports when the benchmark runs (SGD and SAM always; ASAM, GSAM, LookSAM, ...
  when the library has them).
* :func:`noisy_digits`, :func:`noisy_mnist1d`: offline data with label noise.
* :func:`train_runs`: trains several independent runs (seeds, noise rates) of
  one method at once, ``jax.vmap`` over runs and ``lax.scan`` over the steps of
  an epoch, so a method compiles once and every run shares the work.
* :func:`write_results`: the markdown table (mean ± std over seeds, versions
  and machine), the per-run CSV and the plot of one experiment.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import os
import platform
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def experiment_parser(doc: str) -> argparse.ArgumentParser:
  """The flags every experiment takes: ``--quick``, ``--seeds N``, ``--out DIR``."""
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
  parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
  parser.add_argument("--out", default=RESULTS_DIR)
  return parser


def experiment_config(args: argparse.Namespace, default, quick):
  """``quick`` or ``default`` per ``--quick``, with ``--seeds N`` applied."""
  cfg = quick if args.quick else default
  if args.seeds:
    cfg = dataclasses.replace(cfg, seeds=tuple(range(args.seeds)))
  return cfg

# --- Methods -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """How a benchmark builds one method from a base optimizer and SAM's ρ.

  Attributes:
    attr: the ``sam_optax`` factory (``None``: the base optimizer alone).
    rho_scale: the method's radius relative to SAM's ρ. ``None`` (default):
      the ratio of the factory's default ρ to :func:`sam_optax.sam`'s (ASAM's
      radius is relative to ``|w|``, so its default is 10 times SAM's).
    kwargs: further keyword arguments, passed only if the factory accepts them.
  """

  attr: Optional[str]
  rho_scale: Optional[float] = None
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# In order of appearance in tables. Entries whose factory `sam_optax` does not
# export are left out at run time.
METHOD_SPECS: dict[str, MethodSpec] = {
    "sgd": MethodSpec(None),
    "sam": MethodSpec("sam"),
    "asam": MethodSpec("asam"),
    "gsam": MethodSpec("gsam"),
    "looksam": MethodSpec("looksam"),
    "interval_sam": MethodSpec("interval_sam"),
    "msam": MethodSpec("msam"),
    "vasso": MethodSpec("vasso"),
    "fisher_sam": MethodSpec("fisher_sam"),
    "friendly_sam": MethodSpec("friendly_sam"),
    "gnp": MethodSpec("gnp"),
}


def _default(factory, arg):
  p = inspect.signature(factory).parameters.get(arg)
  return None if p is None or p.default is inspect.Parameter.empty else p.default


def rho_scale(name: str) -> float:
  spec = METHOD_SPECS[name]
  if spec.rho_scale is not None or spec.attr is None:
    return 1.0 if spec.rho_scale is None else spec.rho_scale
  ours, sams = _default(getattr(sam_optax, spec.attr), "rho"), _default(sam_optax.sam, "rho")
  if isinstance(ours, (int, float)) and isinstance(sams, (int, float)) and sams > 0:
    return round(float(ours) / float(sams), 6)
  return 1.0


def describe(name: str, rho: Optional[float] = None) -> str:
  """The method's settings, e.g. ``'ρ = 3, eta = 0.01'`` (factory defaults shown)."""
  spec = METHOD_SPECS[name]
  if spec.attr is None:
    return "base optimizer alone"
  factory = getattr(sam_optax, spec.attr)
  parts = []
  scale = rho_scale(name)
  if rho is not None:
    parts.append(f"ρ = {rho * scale:g}")
  elif scale != 1:
    parts.append(f"ρ × {scale:g}")
  for arg, p in inspect.signature(factory).parameters.items():
    if arg in ("base_optimizer", "rho") or p.kind is not p.POSITIONAL_OR_KEYWORD:
      continue
    value = spec.kwargs.get(arg, p.default)
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
      parts.append(f"{arg} = {value:g}" if isinstance(value, float) else f"{arg} = {value}")
  parts += [f"{k} = {v}" for k, v in spec.kwargs.items()
            if k in inspect.signature(factory).parameters
            and inspect.signature(factory).parameters[k].kind is inspect.Parameter.KEYWORD_ONLY]
  return ", ".join(parts)


def _build(name: str, base: optax.GradientTransformation, rho: float):
  spec = METHOD_SPECS[name]
  if spec.attr is None:
    return base
  factory = getattr(sam_optax, spec.attr)
  params = inspect.signature(factory).parameters
  kwargs = {k: v for k, v in spec.kwargs.items() if k in params}
  return factory(base, rho=rho * rho_scale(name), **kwargs)


def available_methods() -> list[str]:
  """Names of :data:`METHOD_SPECS` that this ``sam_optax`` provides."""
  return [name for name, spec in METHOD_SPECS.items()
          if spec.attr is None or hasattr(sam_optax, spec.attr)]


def methods(names: Optional[Iterable[str]] = None
            ) -> dict[str, Callable[[optax.GradientTransformation, float], Any]]:
  """``{name: (base, rho) -> transformation}`` for the available methods.

  SAM gets ``rho``; a variant gets ``rho`` times :func:`rho_scale`.
  """
  names = available_methods() if names is None else list(names)
  return {name: (lambda base, rho, name=name: _build(name, base, rho)) for name in names}


def unperturbed(params, opt_state):
  """The params to evaluate: MSAM hands back perturbed params, the rest do not."""
  remove = getattr(sam_optax, "remove_perturbation", None)
  if remove is None:
    return params
  try:
    return remove(params, opt_state)
  except ValueError:
    return params


# --- Data --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
  x_train: np.ndarray
  y_train: np.ndarray  # noisy labels
  y_train_clean: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def _add_noise(x_train, y_train, x_test, y_test, noise, rng, classes=10) -> Data:
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  x_train = ((x_train - mean) / std).astype(np.float32)
  x_test = ((x_test - mean) / std).astype(np.float32)
  noisy = y_train.copy()
  flip = rng.random(len(noisy)) < noise
  noisy[flip] = rng.integers(0, classes, size=int(flip.sum()))
  return Data(x_train, noisy.astype(np.int32), y_train.astype(np.int32), x_test,
              y_test.astype(np.int32))


def noisy_digits(noise: float, seed: int, test_fraction: float = 0.3) -> Data:
  """Digits, standardized; a fraction ``noise`` of training labels made random.

  A random label may equal the true one, so the fraction of wrong labels is
  ``0.9 · noise`` (the convention of the label-noise literature).
  """
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  x, y = load_digits(return_X_y=True)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))
  x, y = x[order].astype(np.float32), y[order]
  n_test = int(len(x) * test_fraction)
  return _add_noise(x[n_test:], y[n_test:], x[:n_test], y[:n_test], noise, rng)


_MNIST1D = None


def noisy_mnist1d(noise: float, seed: int, n_train: Optional[int] = None) -> Data:
  """MNIST-1D (generated offline from its default arguments), with label noise.

  The data set itself is the package's fixed default (4000 train / 1000 test
  sequences of length 40); ``seed`` only draws the noisy labels (and the
  subset, with ``n_train``).
  """
  global _MNIST1D
  if _MNIST1D is None:
    from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=import-outside-toplevel
    _MNIST1D = make_dataset(get_dataset_args())
  d = _MNIST1D
  rng = np.random.default_rng(seed)
  x, y = np.asarray(d["x"], np.float32), np.asarray(d["y"])
  if n_train is not None:
    keep = rng.permutation(len(x))[:n_train]
    x, y = x[keep], y[keep]
  return _add_noise(x, y, np.asarray(d["x_test"], np.float32),
                    np.asarray(d["y_test"]), noise, rng)


def stack(datas: Sequence[Data]) -> Data:
  """Stacks runs' data sets (same shapes) along a new leading axis."""
  return Data(*(np.stack([getattr(d, f.name) for d in datas])
                for f in dataclasses.fields(Data)))


# --- Model -------------------------------------------------------------------


def init_mlp(key, sizes: Sequence[int]):
  params = []
  for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a),
                   "b": jnp.zeros((b,))})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


@dataclasses.dataclass(frozen=True)
class Model:
  """``init(key) -> params`` and ``apply(params, x) -> logits``."""
  init: Callable
  apply: Callable


def mlp_model(sizes: Sequence[int]) -> Model:
  return Model(lambda key: init_mlp(key, sizes), mlp)


def cross_entropy(params, x, y, apply=mlp):
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def accuracy(params, x, y, apply=mlp):
  return jnp.mean((jnp.argmax(apply(params, x), -1) == y).astype(jnp.float32))


# --- Trainer -----------------------------------------------------------------


def train_runs(tx: optax.GradientTransformation, data: Data, seeds: Sequence[int], *,
               epochs: int, batch_size: int, sizes: Optional[Sequence[int]] = None,
               model: Optional[Model] = None,
               stop_at_loss: Optional[float] = None, snapshot_losses: Sequence[float] = (),
               progress=None) -> dict:
  """Trains ``len(seeds)`` models with ``tx`` at once (one compilation).

  The model is ``model``, or an MLP with layer ``sizes``.

  ``data`` holds one data set per run, stacked (:func:`stack`). Every step
  calls ``tx.update(grads, state, params, loss_fn=..., value=...)`` on a
  mini-batch, so any ``sam_optax`` transform fits; for the base optimizer the
  extra arguments are ignored. With ``stop_at_loss``, a run's params are
  frozen after the first epoch that ends with a full-batch training loss
  (on its noisy labels) at or below that value. With ``snapshot_losses``, a
  run's params are also saved after the first epoch that ends at or below
  each of these losses.

  Returns:
    A dict of numpy arrays with a leading run axis: ``curve`` (clean test
    accuracy after every epoch, ``[runs, epochs]``), ``train_loss`` (after
    every epoch), ``train_acc_noisy``, ``train_acc_clean``, ``stop_epoch``
    (``epochs`` if never stopped) and ``params`` (the final params, with
    MSAM's perturbation removed); with ``snapshot_losses``, ``snapshots``
    (one stacked params per loss; a run that never got there holds its final
    params) and ``snapshot_epoch`` (``[losses, runs]``, 0 if never reached).
    When every run has stopped, training ends early (``curve`` is shorter).
  """
  if model is None:
    model = mlp_model(sizes)
  xent = lambda p, x, y: cross_entropy(p, x, y, model.apply)
  acc = lambda p, x, y: accuracy(p, x, y, model.apply)
  runs = len(seeds)
  n = data.x_train.shape[1]
  steps = n // batch_size

  @jax.jit
  def init(seeds):
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    params = jax.vmap(model.init)(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
    return params, jax.vmap(tx.init)(params), keys

  params, state, keys = init(jnp.asarray(seeds))

  def one_epoch(params, state, key, x, y, xt, yt, x_clean_y):
    order = jax.random.permutation(key, n)[:steps * batch_size].reshape(steps, batch_size)

    def step(carry, idx):
      params, state = carry
      xb, yb = x[idx], y[idx]
      loss_fn = lambda p: xent(p, xb, yb)
      value, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), order)
    w = unperturbed(params, state)
    return (params, state, w, acc(w, xt, yt), xent(w, x, y), acc(w, x, y), acc(w, x, x_clean_y))

  def epoch(params, state, key, e, frozen, x, y, xt, yt, yc):
    key = jax.random.fold_in(key, e + 1)
    new = one_epoch(params, state, key, x, y, xt, yt, yc)
    if stop_at_loss is None:
      return new
    keep = lambda a, b: jax.tree.map(lambda u, v: jnp.where(frozen, u, v), a, b)
    w = unperturbed(params, state)
    old = (params, state, w, acc(w, xt, yt), xent(w, x, y), acc(w, x, y), acc(w, x, yc))
    return keep(old, new)

  epoch = jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, None, 0, 0, 0, 0, 0, 0)))
  arrays = [jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test,
                                     data.y_train_clean)]
  frozen = np.zeros((runs,), bool)
  stop_epoch = np.full((runs,), epochs)
  curve, train_loss = [], []
  snapshots = [None] * len(snapshot_losses)
  snapshot_epoch = np.zeros((len(snapshot_losses), runs), int)
  w = params
  for e in range(epochs):
    params, state, w, test_acc, loss, acc_noisy, acc_clean = epoch(
        params, state, keys, e, frozen, *arrays)
    loss = np.asarray(loss)
    curve.append(np.asarray(test_acc))
    train_loss.append(loss)
    for i, target in enumerate(snapshot_losses):
      new = (loss <= target) & (snapshot_epoch[i] == 0)
      if new.any():
        snapshots[i] = _select_runs(new, w, snapshots[i])
        snapshot_epoch[i][new] = e + 1
    if stop_at_loss is not None:
      reached = (loss <= stop_at_loss) & ~frozen
      stop_epoch[reached] = e + 1
      frozen = frozen | reached
    if progress is not None:
      progress.update(1)
    if stop_at_loss is not None and bool(np.all(frozen)):
      if progress is not None:
        progress.update(epochs - e - 1)
      break
  final = w
  for i, snap in enumerate(snapshots):
    snapshots[i] = _select_runs(snapshot_epoch[i] == 0, final, snap)
  return {
      "curve": np.stack(curve, 1),
      "snapshots": snapshots,
      "snapshot_epoch": snapshot_epoch,
      "train_loss": np.stack(train_loss, 1),
      "train_acc_noisy": np.asarray(acc_noisy),
      "train_acc_clean": np.asarray(acc_clean),
      "stop_epoch": stop_epoch,
      "params": final,
  }


def _select_runs(which: np.ndarray, new, old):
  """Stacked params: ``new`` for the runs in ``which``, ``old`` (if any) for the others."""
  new = jax.tree.map(np.asarray, new)
  if old is None:
    return new
  return jax.tree.map(
      lambda a, b: np.where(which.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


# --- Outputs -----------------------------------------------------------------


def environment() -> dict:
  dev = jax.devices()[0]
  return {
      "jax": jax.__version__,
      "optax": optax.__version__,
      "sam_optax": sam_optax.__version__,
      "python": platform.python_version(),
      "machine": (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                  f"device {dev.platform}:{dev.device_kind}"),
  }


def environment_line(elapsed_s: Optional[float] = None) -> str:
  env = "; ".join(f"{k} {v}" for k, v in environment().items())
  return (f"Run time {elapsed_s:.0f} s; " if elapsed_s is not None else "") + env


def mean_std(values, fmt: str = ".3f") -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():{fmt}} ± {v.std():{fmt}}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(name: str, *, title: str, table: str, records: Sequence[Mapping[str, Any]],
                  figure=None, notes: str = "", elapsed_s: Optional[float] = None,
                  out_dir: str = RESULTS_DIR, summary: Optional[str] = None
                  ) -> dict[str, str]:
  """Writes ``{name}.md`` (title, table, notes, environment), ``{name}.csv``
  (one row per run) and ``{name}.png``; prints ``summary`` (default: the
  table) and the paths written, and returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"md": os.path.join(out_dir, f"{name}.md"),
           "csv": os.path.join(out_dir, f"{name}.csv")}
  parts = [f"# {title}", "", table, ""]
  if notes:
    parts += [notes.strip(), ""]
  parts += [f"Per-run values: `{name}.csv`. Plot: `{name}.png`.", "",
            environment_line(elapsed_s), ""]
  with open(paths["md"], "w") as f:
    f.write("\n".join(parts))
  if records:
    fields = list(records[0].keys())
    with open(paths["csv"], "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=fields)
      w.writeheader()
      for r in records:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v)
                    for k, v in r.items()})
  if figure is not None:
    paths["png"] = os.path.join(out_dir, f"{name}.png")
    figure.savefig(paths["png"], dpi=120)
  print(table if summary is None else summary)
  print("wrote", ", ".join(paths.values()))
  return paths


def read_records(name: str, out_dir: str = RESULTS_DIR) -> list[dict]:
  """The per-run records of ``{name}.csv``, numbers parsed."""
  def parse(v):
    for cast in (int, float):
      try:
        return cast(v)
      except ValueError:
        pass
    return {"True": True, "False": False}.get(v, v)
  with open(os.path.join(out_dir, f"{name}.csv")) as f:
    return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def recorded_run_time(name: str, out_dir: str = RESULTS_DIR) -> Optional[float]:
  """The run time written in ``{name}.md`` by an earlier run, if any."""
  import re  # pylint: disable=import-outside-toplevel
  try:
    with open(os.path.join(out_dir, f"{name}.md")) as f:
      m = re.search(r"Run time (\d+) s", f.read())
  except OSError:
    return None
  return float(m.group(1)) if m else None


def pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt
