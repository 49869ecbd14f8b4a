"""The README's code is run, so it cannot drift from the library."""

import pathlib
import re
import subprocess
import sys

import jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


# Sections whose code needs a model defined elsewhere; tests/test_flax.py runs them.
SKIP_SECTIONS = ("## Using with Flax",)


def _blocks(lang="python"):
  sections = re.split(r"\n(?=## )", README.read_text())
  kept = "\n".join(s for s in sections if not s.startswith(SKIP_SECTIONS))
  return re.findall(rf"```{lang}\n(.*?)```", kept, flags=re.S)


def test_python_blocks_run():
  blocks = _blocks()
  assert len(blocks) >= 2
  namespace = {}
  # The README's optax schedules (via rho_from_learning_rate) multiply a
  # float by the int step count: optax needs standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    for code in blocks:  # later blocks may use names defined by earlier ones
      exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used


def test_ci_runs_the_readme_test_command():
  ci = (README.parent / ".ci" / "run").read_text()
  assert "<!-- test-command -->" in README.read_text()
  assert "test-command" in ci


def test_main_command_runs_quick(tmp_path):
  """The main job's entry point, at smoke size."""
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.reproduce", "--quick", "--out", str(tmp_path)],
      cwd=README.parent, capture_output=True, text=True, timeout=300, check=True)
  assert "| sam |" in out.stdout and "| sgd |" in out.stdout
  assert (tmp_path / "accuracy.png").exists() and (tmp_path / "table.md").exists()
