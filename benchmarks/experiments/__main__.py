"""Runs every reproduction: ``python -m benchmarks.experiments [--quick] [--out DIR] [--only …]``."""

from benchmarks.experiments import EXPERIMENTS
from benchmarks.harness import experiment

if __name__ == "__main__":
  experiment.run_all("benchmarks.experiments", EXPERIMENTS)
