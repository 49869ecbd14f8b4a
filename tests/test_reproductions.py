"""The reproductions of the papers' claims, at small size: the direction of each effect.

Each test runs the small version of one experiment of ``benchmarks/experiments``
with a fixed seed and asserts the direction of the effect, with a margin, where
the calibration is solid. The full runs (several seeds, tables and plots) are
``python -m benchmarks.experiments``.
"""

import dataclasses

import numpy as np

from benchmarks.experiments import e1_msharpness as e1
from benchmarks.experiments import e2_label_noise as e2
from benchmarks.experiments import e3_hessian as e3
from benchmarks.experiments import e4_balance as e4
from benchmarks.experiments import e5_feature_quality as e5


def test_e1_smaller_m_lower_test_error():
  """m-sharpness on a sparse diagonal linear net: m=1 < m=4 < m=n."""
  cfg = dataclasses.replace(e1.QUICK, steps=3000, ms=(20, 4, 1), seeds=(0,))
  records = e1.run(cfg)
  err = {r["m"]: r["test_error"] for r in records}
  assert err[1] * 1.3 < err[4], err
  assert err[4] * 1.3 < err[20], err
  assert e1.ordering(records, 20) == {"ordered": 1, "seeds": 1}


def test_e1_gd_matches_sam_at_rho_zero():
  """GD and SAM with ρ = 0 (any m) are the same optimizer."""
  cfg = dataclasses.replace(e1.QUICK, steps=200, rho=0.0, ms=(None, 4), seeds=(0,))
  err = [r["test_error"] for r in e1.run(cfg)]
  np.testing.assert_allclose(err[0], err[1], rtol=1e-4)


def test_e2_sam_ahead_of_sgd_at_60_percent_noise():
  """Digits with 60% random labels: SAM's best clean test accuracy ≥ SGD's + 2 points."""
  ds = dataclasses.replace(e2.DATASETS["digits"], hidden=64, epochs=20)
  cfg = e2.Config(datasets=(ds,), noises=(0.6,), methods=("sgd", "sam"), seeds=(0,))
  records = e2.run(cfg)
  assert e2.lead(records, "digits", 0.6) >= 0.02, records
  for r in records:
    assert 0.1 < r["best_test_acc"] <= 1.0


def test_e3_sam_flatter_at_equal_training_loss():
  """λ_max of SAM's solution is below SGD's at the same training loss."""
  cfg = dataclasses.replace(e3.QUICK, hidden=32, rho=0.1, batch_size=128, lr=0.02,
                            losses=(0.05,), max_epochs=30, num_iters=15, seeds=(0,))
  records = e3.run(cfg)
  assert all(r["reached"] for r in records), records
  losses = [r["train_loss"] for r in records]
  assert max(losses) <= 0.05 and min(losses) > 0.02, losses  # comparable losses
  assert e3.ratio(records, 0.05) < 0.9, records


def test_e4_sam_relies_more_on_the_hard_feature():
  """Two features: GD ignores the small-margin one, SAM uses it."""
  records = e4.run(e4.QUICK)
  gd = next(r for r in records if r["method"] == "gd")
  sam = next(r for r in records if r["method"] == "sam")
  assert gd["ratio"] < 0.2, gd
  assert sam["ratio"] > 5 * gd["ratio"] and sam["ratio"] > 0.5, (gd, sam)
  # Out of distribution (easy block shuffled), only the hard feature helps.
  assert sam["shuffled_easy_acc"] > gd["shuffled_easy_acc"] + 0.2, (gd, sam)


def test_e4_reliance_reads_the_block_weights():
  params = {"w_e": np.array([3.0, 4.0]), "v_e": np.array(2.0),
            "w_h": np.array([0.6, 0.8]), "v_h": np.array(-0.5)}
  np.testing.assert_allclose(e4.reliance(params), (0.5 * 1.0) / (2.0 * 5.0), rtol=1e-6)


def test_e4_main_writes_table_csv_and_plot(tmp_path):
  e4.main(["--quick", "--out", str(tmp_path)])
  md = (tmp_path / "e4_balance.md").read_text()
  assert "| linear | GD |" in md and "| linear | SAM ρ=0.2 |" in md
  assert "jax " in md and "CPU cores" in md  # versions and machine
  assert (tmp_path / "e4_balance.csv").read_text().startswith("activation,method,rho,seed,ratio")
  assert (tmp_path / "e4_balance.png").stat().st_size > 0


def test_e5_sam_raises_the_hard_probe_in_the_squared_loss_toy():
  """The paper's measurement (a linear probe on the frozen hidden units): with
  the squared loss SAM turns the hard unit towards the hard block, GD does not."""
  records = e5.run(dataclasses.replace(e5.QUICK, settings=("toy",)))
  gd = next(r for r in records if r["method"] == "sgd")
  sam = next(r for r in records if r["method"] == "sam")
  assert gd["hard_probe"] < 0.8 and sam["hard_probe"] > gd["hard_probe"] + 0.15, (gd, sam)
  assert min(gd["easy_probe"], sam["easy_probe"]) > 0.99, (gd, sam)
  assert sam["reliance"] > 3 * gd["reliance"], (gd, sam)


def test_e5_logistic_loss_toy_leaves_the_hard_probe_where_gd_leaves_it():
  """The condition where the claim fails: with the logistic loss the weights
  grow, a fixed ρ becomes negligible, and SAM's probe is GD's."""
  toy = dataclasses.replace(e5.QUICK.toy, losses=("logistic",), rhos=(0.2,))
  records = e5.run(dataclasses.replace(e5.QUICK, settings=("toy",), toy=toy))
  gd = next(r for r in records if r["method"] == "sgd")
  sam = next(r for r in records if r["method"] == "sam")
  assert abs(sam["hard_probe"] - gd["hard_probe"]) < 0.02, (gd, sam)
  assert sam["reliance"] < 0.01 and gd["reliance"] < 0.01, (gd, sam)


def test_e5_dominoes_data_are_what_the_probes_assume():
  """Training labels, the 95% spurious agreement, and the balanced groups of
  the probe sets' scored half (4 equal blocks: label × digit class)."""
  cfg = dataclasses.replace(e5.DominoConfig(), n_train=4000, n_probe=800)
  xd, yd, xm, ym = e5._sources()  # pylint: disable=protected-access
  easy_of = {tuple(np.round(x, 5)): c for x, c in zip(xd, yd)}
  hard_of = {tuple(np.round(x, 5)): c for x, c in zip(xm, ym)}
  d = e5.domino_data(0, cfg, "spurious")
  easy = np.array([easy_of[tuple(np.round(x[:64], 5))] for x in d["x"]])
  hard = np.array([hard_of[tuple(np.round(x[64:], 5))] for x in d["x"]])
  np.testing.assert_array_equal(hard, np.array(cfg.hard_classes)[d["y"]])
  agree = np.mean(easy == np.array(cfg.easy_classes)[d["y"]])
  assert 0.94 < agree < 0.96, agree
  half = cfg.n_probe // 2
  y_test = d["y_probe"][half:]
  digit = np.array([easy_of[tuple(np.round(x[:64], 5))] for x in d["x_hard"][half:]])
  groups = 2 * y_test + (digit == cfg.easy_classes[1])
  np.testing.assert_array_equal(groups, np.repeat(np.arange(4), half // 4))
  both = e5.domino_data(0, cfg, "both halves")
  easy = np.array([easy_of[tuple(np.round(x[:64], 5))] for x in both["x"]])
  np.testing.assert_array_equal(easy, np.array(cfg.easy_classes)[both["y"]])


def test_e5_worst_group_reads_four_equal_blocks():
  logits = np.array([[1.0, 0.0]] * 8, np.float32)  # always predicts class 0
  y = np.array([0, 0, 0, 1, 1, 1, 1, 0], np.int32)  # groups: [0 0] [0 1] [1 1] [1 0]
  np.testing.assert_allclose(e5._worst_group(logits, y), 0.0)  # pylint: disable=protected-access
  np.testing.assert_allclose(e5._accuracy(logits, y), 0.5)  # pylint: disable=protected-access


def test_e5_main_writes_table_csv_and_plot(tmp_path):
  e5.main(["--quick", "--out", str(tmp_path)])
  md = (tmp_path / "e5_feature_quality.md").read_text()
  assert "| squared | GD |" in md and "| both halves | SAM | 0.2 |" in md
  assert "| hard half only | SGD |" in md
  assert "jax " in md and "CPU cores" in md  # versions and machine
  csv = (tmp_path / "e5_feature_quality.csv").read_text()
  assert csv.startswith("setting,variant,method,rho,method_rho,seed,hard_probe,easy_probe")
  assert (tmp_path / "e5_feature_quality.png").stat().st_size > 0
  e5.main(["--quick", "--replot", "--out", str(tmp_path)])  # table again from the CSV
  assert (tmp_path / "e5_feature_quality.md").read_text().split("\n")[:12] == md.split("\n")[:12]
