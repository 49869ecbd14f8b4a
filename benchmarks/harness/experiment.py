"""An experiment declares its config, run and summary; :func:`main` drives it.

Every experiment takes ``--quick`` (its small config), ``--seeds N``,
``--out DIR`` and ``--replot`` (table and plot again from the CSV of an
earlier run); one whose config has ``methods`` takes ``--methods`` (any of
the library's list, :func:`.methods.names`); plus its own flags. :func:`run_all` drives every experiment of
``benchmarks.experiments`` (``python -m benchmarks.experiments``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import time
from typing import Any, Callable, Optional, Sequence

from benchmarks.harness import methods
from benchmarks.harness import report


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What one experiment declares.

  Attributes:
    name: file stem of its results (``benchmarks/results/{name}.md``).
    title: the report's title.
    doc: its module docstring (first paragraph: the ``--help`` line).
    default, quick: its full and small configs (dataclasses with ``seeds``).
    run: ``(cfg, progress) -> records`` (one dict per run; ``progress`` a
      tqdm bar or ``None``).
    summarize: ``(records, cfg) -> markdown`` (the table).
    notes: ``(records, cfg) -> markdown``: setup, then findings (the last
      paragraph is printed after the table).
    plot: ``(records, cfg) -> matplotlib figure``.
    epochs: ``cfg -> int``, the progress bar's length (``None``: no bar).
    flags: adds its own flags to the parser.
    configure: ``(cfg, args) -> cfg`` from its own flags.
    from_records: ``(cfg, records) -> cfg`` for ``--replot``, beyond the
      seeds and methods of the records.
  """

  name: str
  title: str
  doc: str
  default: Any
  quick: Any
  run: Callable[..., list]
  summarize: Callable[[list, Any], str]
  notes: Callable[[list, Any], str]
  plot: Callable[[list, Any], Any]
  epochs: Optional[Callable[[Any], int]] = None
  flags: Callable[[argparse.ArgumentParser], None] = lambda parser: None
  configure: Callable[[Any, argparse.Namespace], Any] = lambda cfg, args: cfg
  from_records: Callable[[Any, list], Any] = lambda cfg, records: cfg


def _has_methods(cfg) -> bool:
  return "methods" in {f.name for f in dataclasses.fields(cfg)}


def from_records(exp: Experiment, cfg, records: list):
  """The config of an earlier run's records (seeds, methods, the experiment's own)."""
  seen = lambda key: tuple(dict.fromkeys(r[key] for r in records))
  cfg = dataclasses.replace(cfg, seeds=seen("seed"),
                            **({"methods": seen("method")} if _has_methods(cfg) else {}))
  return exp.from_records(cfg, records)


def parser(exp: Experiment) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=exp.doc.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
  p.add_argument("--seeds", type=int, default=None, help="number of seeds")
  p.add_argument("--out", default=report.RESULTS_DIR)
  p.add_argument("--replot", action="store_true",
                 help="rewrite the table and plot from the CSV of an earlier run")
  if _has_methods(exp.default):
    p.add_argument("--methods", default="", help="comma-separated, or 'all' (default "
                   f"{','.join(exp.default.methods)}); available: {','.join(methods.names())}")
  exp.flags(p)
  return p


def config(exp: Experiment, args: argparse.Namespace, error: Callable[[str], Any]):
  """The quick or default config, with ``--seeds N``, ``--methods`` and the
  experiment's flags."""
  cfg = exp.quick if args.quick else exp.default
  if args.seeds:
    cfg = dataclasses.replace(cfg, seeds=tuple(range(args.seeds)))
  if vars(args).get("methods"):
    cfg = dataclasses.replace(cfg, methods=tuple(
        methods.parse(args.methods, methods.names(), "--methods", error)))
  return exp.configure(cfg, args)


def run(exp: Experiment, cfg) -> list:
  """``exp.run(cfg)``, with a progress bar where the experiment counts epochs."""
  if exp.epochs is None:
    return exp.run(cfg, None)
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  with tqdm(total=exp.epochs(cfg), desc=exp.name, unit="epoch") as bar:
    return exp.run(cfg, bar)


def main(exp: Experiment, argv: Optional[Sequence[str]] = None) -> list:
  """Runs (or replots) one experiment and writes its report."""
  p = parser(exp)
  args = p.parse_args(argv)
  cfg = config(exp, args, p.error)
  md = os.path.join(args.out, f"{exp.name}.md")
  env = None
  if args.replot:
    records = report.read_csv(os.path.join(args.out, f"{exp.name}.csv"))
    cfg, env = from_records(exp, cfg, records), report.recorded_environment(md)
  else:
    t0 = time.time()
    records = run(exp, cfg)
    elapsed = time.time() - t0
  table, notes = exp.summarize(records, cfg), exp.notes(records, cfg)
  report.write_results(exp.name, title=exp.title, table=table, records=records,
                       figure=exp.plot(records, cfg), notes=notes,
                       elapsed_s=None if args.replot else elapsed, out_dir=args.out,
                       summary=table + "\n\n" + notes.strip().split("\n\n")[-1],
                       environment_line=env)
  return records


def entry_point(exp: Experiment) -> Callable[..., list]:
  """``main(argv=None)`` of one experiment's module."""
  return lambda argv=None: main(exp, argv)


def run_all(package: str, names: Sequence[str], argv: Optional[Sequence[str]] = None):
  """``python -m <package> [--quick] [--out DIR] [--only a,b]``: every experiment."""
  p = argparse.ArgumentParser(description=f"Runs every experiment of {package}.")
  p.add_argument("--quick", action="store_true", help="smoke-size versions")
  p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
  p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(names))
  args = p.parse_args(argv)
  chosen = [n for n in args.only.split(",") if n] or list(names)
  unknown = sorted(set(chosen) - set(names))
  if unknown:
    p.error(f"--only: unknown {unknown}; choose from {','.join(names)}")
  for name in chosen:
    t0 = time.time()
    module = importlib.import_module(f"{package}.{name}")
    main(module.EXPERIMENT, (["--quick"] if args.quick else [])
         + (["--out", args.out] if args.out else []))
    print(f"[{name}] {time.time() - t0:.0f} s\n")
