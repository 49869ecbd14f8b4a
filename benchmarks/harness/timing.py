"""The one timing loop: compile, warm up, then time every case in interleaved rounds.

A benchmark's result is a ratio measured side by side in one run, never a
time: every round times every case once (the order reversed every other
round, so no case always follows the same one), and a case's ratio to a
reference is the median over rounds of the two times taken in the same round
(the same moment, so the same machine load). Nothing here asserts a time.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Hashable, Mapping, NamedTuple

import jax
import numpy as np


class Case(NamedTuple):
  """``step(*args) -> (params, state)``, already jitted (or pmapped);
  ``args = (params, state, *rest)``."""
  step: Callable
  args: tuple


def xla_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled step as one dict (``{}`` if none)."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def _run(case: Case, steps: int) -> float:
  """Seconds for ``steps`` consecutive steps from ``case.args``."""
  args = case.args
  t0 = time.perf_counter()
  for _ in range(steps):
    args = (*case.step(*args), *case.args[2:])
  jax.block_until_ready(args[:2])
  return time.perf_counter() - t0


def measure(cases: Mapping[Hashable, Case], rounds: int, steps_per_round: int = 1
            ) -> dict[Hashable, dict[str, Any]]:
  """Compiles, warms up and times every case in ``rounds`` interleaved rounds.

  Each round runs ``steps_per_round`` consecutive steps of every case from
  its ``args``. Returns per case: ``compiled`` (``jax.jit(step)`` lowered and
  compiled: its text, costs, memory), ``compile_s``, ``temp`` (XLA's compiled
  temp bytes), ``flops`` and ``bytes`` (XLA's cost analysis), ``times`` (per
  round, seconds per step), ``ms`` (median) and ``min_ms``.
  """
  rows = {}
  for key, case in cases.items():
    t0 = time.perf_counter()
    compiled = jax.jit(case.step).lower(*case.args).compile()
    compile_s = time.perf_counter() - t0
    cost = xla_cost(compiled)
    rows[key] = {"compiled": compiled, "compile_s": compile_s,
                 "temp": float(compiled.memory_analysis().temp_size_in_bytes),
                 "flops": float(cost.get("flops", float("nan"))),
                 "bytes": float(cost.get("bytes accessed", float("nan"))),
                 "times": []}
    _run(case, max(2, steps_per_round))  # compile and warm up
  keys = list(cases)
  for r in range(rounds):
    for key in (reversed(keys) if r % 2 else keys):
      rows[key]["times"].append(_run(cases[key], steps_per_round) / steps_per_round)
  for row in rows.values():
    row["ms"] = 1e3 * statistics.median(row["times"])
    row["min_ms"] = 1e3 * min(row["times"])
  return rows


def paired(row: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
  """``row`` against ``ref``, round by round: median, interquartile range and
  min-over-min of the time ratio; ratios of XLA's FLOPs, bytes and temp."""
  ratios = np.asarray(row["times"]) / np.asarray(ref["times"])
  return {"median": float(np.median(ratios)),
          "iqr": tuple(float(q) for q in np.percentile(ratios, [25, 75])),
          "min": row["min_ms"] / ref["min_ms"],
          "flops": row["flops"] / ref["flops"],
          "bytes": row["bytes"] / ref["bytes"],
          "temp": row["temp"] / max(ref["temp"], 1.0)}
