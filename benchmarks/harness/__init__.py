"""The pieces every benchmark is built from, each defined once.

* :mod:`.methods`: what is compared: the library's list of methods
  (``sam_optax._src.registry.METHODS``), the peers that are not sam_optax
  methods (SGD, a hand-written SAM step, ``optax.contrib.sam``) and the one
  training step every benchmark times or runs.
* :mod:`.models`: the MLP, CNN and transformer block.
* :mod:`.data`: offline data sets with label noise, and timing batches.
* :mod:`.training`: many runs of one method trained at once (``vmap``).
* :mod:`.timing`: the one timing loop: compile, warm up, interleaved rounds,
  ratios paired round by round (a ratio is the result, never a time).
* :mod:`.environment`: versions and machine, in one line.
* :mod:`.report`: markdown table, CSV and plot under ``benchmarks/results``.
* :mod:`.experiment`: an experiment declares its config, run and summary;
  :func:`.experiment.main` drives one, :func:`.experiment.run_all` all.
"""
