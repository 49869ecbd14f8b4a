"""Reproductions of the claims of the SAM papers, small enough for a CPU.

Each module declares one experiment (``EXPERIMENT``: its config, quick
config, run, summary, notes and plot; :mod:`benchmarks.harness.experiment`)
run with the library's own transforms over several seeds; the harness writes
a markdown table (mean ± std), a per-run CSV and a plot to
``benchmarks/results/``:

* :mod:`~benchmarks.experiments.e1_msharpness`: m-sharpness on a sparse
  diagonal linear network (smaller m, lower test error).
* :mod:`~benchmarks.experiments.e2_label_noise`: label noise on digits and
  MNIST-1D (SAM's lead over SGD grows with the noise).
* :mod:`~benchmarks.experiments.e3_hessian`: top Hessian eigenvalue of SGD
  and SAM solutions at the same training loss.
* :mod:`~benchmarks.experiments.e4_balance`: balanced feature learning (SAM
  relies more on a hard feature than plain gradient descent does).
* :mod:`~benchmarks.experiments.e5_feature_quality`: feature quality measured
  the paper's way, linear probes on the frozen representation (a toy,
  digits | MNIST-1D dominoes, a 95% spurious split; SGD, SAM, ASAM, m-SAM).

``python -m benchmarks.experiments`` runs all five (``--quick`` shrinks them,
``--only`` picks some); ``python -m benchmarks.experiments.<name>`` runs one.
"""

EXPERIMENTS = ("e1_msharpness", "e2_label_noise", "e3_hessian", "e4_balance",
               "e5_feature_quality")
