"""The one report writer: a markdown file, its CSV(s) and its plot, side by side.

Every report ends with where its per-row values and plot are and with the
environment line (:mod:`.environment`).
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from benchmarks.harness import environment

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "results")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def mean_std(values, fmt: str = ".3f") -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():{fmt}} ± {v.std():{fmt}}"


def pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def write_csv(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """One row per record (floats to 6 significant digits)."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(records[0].keys()))
    w.writeheader()
    for r in records:
      w.writerow({k: (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v)
                  for k, v in r.items()})


def read_csv(path: str) -> list[dict]:
  """The records of a CSV written by :func:`write_csv`, numbers parsed."""
  def parse(v):
    for cast in (int, float):
      try:
        return cast(v)
      except ValueError:
        pass
    return {"True": True, "False": False}.get(v, v)
  with open(path) as f:
    return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write(md_path: str, text: str, *, records: Sequence[Mapping[str, Any]] = (),
          figure=None, tables: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None,
          environment_line: Optional[str] = None) -> dict[str, str]:
  """Writes ``text`` to ``md_path`` and, beside it, ``<stem>.csv`` (``records``),
  ``<stem>_<suffix>.csv`` (each of ``tables``) and ``<stem>.png``
  (``figure``), then the line naming them and the environment line
  (default: this machine now). Returns the paths."""
  stem = os.path.splitext(md_path)[0]
  os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
  csvs = {"csv": records, **{f"_{s}.csv": t for s, t in (tables or {}).items()}}
  paths = {"md": md_path}
  for key, rows in csvs.items():
    if rows:
      paths[key] = stem + (".csv" if key == "csv" else key)
      write_csv(paths[key], rows)
  if figure is not None:
    paths["png"] = stem + ".png"
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    pyplot().close(figure)
  named = [f"`{os.path.basename(p)}`" for k, p in paths.items() if k not in ("md", "png")]
  tail = ("Per-row values: " + ", ".join(named) + "." if named else "")
  if "png" in paths:
    tail += f" Plot: `{os.path.basename(paths['png'])}`."
  env = environment.line() if environment_line is None else environment_line
  with open(md_path, "w") as f:
    f.write("\n\n".join(p for p in (text.rstrip("\n"), tail.strip(), env) if p) + "\n")
  return paths


def recorded_environment(md_path: str) -> str:
  """The environment line of an earlier report (``''`` if none)."""
  try:
    with open(md_path) as f:
      lines = f.read().splitlines()
  except OSError:
    return ""
  return next((l for l in reversed(lines) if re.match(r"(Run time \d+ s; )?jax \d", l)), "")


def recorded_run_time(md_path: str) -> Optional[float]:
  """The run time written in an earlier report, if any."""
  m = re.match(r"Run time (\d+) s", recorded_environment(md_path))
  return float(m.group(1)) if m else None


def write_results(name: str, *, title: str, table: str, records: Sequence[Mapping[str, Any]],
                  figure=None, notes: str = "", elapsed_s: Optional[float] = None,
                  out_dir: str = RESULTS_DIR, summary: Optional[str] = None,
                  environment_line: Optional[str] = None) -> dict[str, str]:
  """An experiment's report: ``{name}.md`` (title, table, notes, environment),
  ``{name}.csv`` (one row per run) and ``{name}.png``; prints ``summary``
  (default: the table) and the paths written."""
  text = "\n\n".join([f"# {title}", table] + ([notes.strip()] if notes else []))
  env = environment.line(elapsed_s) if environment_line is None else environment_line
  paths = write(os.path.join(out_dir, f"{name}.md"), text, records=records, figure=figure,
                environment_line=env)
  print(table if summary is None else summary)
  print("wrote", ", ".join(paths.values()))
  return paths
