"""Smoke tests of the benchmark harness and the main job, at tiny sizes.

No timing is asserted: only that the harness runs, what it writes, and the
compiled memory of a SAM step (a property of the compiled program, not of
the machine's load).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from benchmarks import common
from benchmarks import reproduce
from benchmarks import step_time


def test_step_time_quick_writes_table_csv_and_plot(tmp_path):
  out = tmp_path / "st.md"
  results = step_time.main(["--quick", "--methods", "sgd,hand_sam,sam_optax", "--out", str(out)])
  stats = results[("mlp", 8, "float32")]
  assert list(stats) == ["sgd", "hand_sam", "sam_optax"]
  for st in stats.values():
    assert st["ms"] > 0 and st["compile_s"] > 0 and len(st["times"]) == 2
  text = out.read_text()
  assert "| mlp | 8 | float32 | sam_optax |" in text and "goal ≤ 1.01" in text
  csv = (tmp_path / "st.csv").read_text().splitlines()
  assert csv[0].startswith("model,batch,dtype,method,ms_per_step,x_sgd,x_hand_sam")
  assert len(csv) == 4
  assert (tmp_path / "st.png").stat().st_size > 0
  step_time.main(["--replot", "--out", str(out)])  # rewrites from the CSV
  assert out.read_text().splitlines()[0] == text.splitlines()[0]


def test_step_time_variants_run():
  stats = step_time.benchmark("mlp", 8, jnp.float32, rounds=1, steps_per_round=1,
                              methods=("sam_optax_m", "looksam", "msam"), small=True)
  for name in ("looksam", "msam"):
    assert (name in stats) == hasattr(sam_optax, name)
  assert "sam_optax_m" in stats


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_step_time_models_run(model):
  params, apply, shape = step_time.MODELS[model](
      jax.random.PRNGKey(0), jnp.float32, **step_time.SMALL[model])
  logits = jax.jit(apply)(params, jnp.ones((2,) + shape))
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_step_time_rejects_unknown_method():
  with pytest.raises(SystemExit):
    step_time.main(["--quick", "--methods", "sam_optax,nope"])


def test_sam_optax_temp_memory_matches_hand_written_sam():
  """Compiled temp memory of a `sam_optax.sam` step ≤ 1.05 × a hand-written SAM step."""
  params, apply, shape = step_time.make_mlp(jax.random.PRNGKey(0), jnp.float32)
  x = jnp.zeros((128,) + shape)
  y = jnp.zeros((128,), jnp.int32)
  steps = step_time.make_steps(apply, optax.sgd(0.01, momentum=0.9), 128)
  temp = {}
  for name in ("hand_sam", "sam_optax"):
    init, step = steps[name]
    exe = jax.jit(step).lower(params, init(params), x, y).compile()
    temp[name] = exe.memory_analysis().temp_size_in_bytes
  assert temp["sam_optax"] <= 1.05 * temp["hand_sam"], temp


def test_method_table_builds_every_available_method():
  names = common.available_methods()
  assert names[:2] == ["sgd", "sam"]
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  loss_fn = lambda p: jnp.sum((p["w"] - 2.0) ** 2) + p["b"] ** 2
  for name, make in common.methods().items():
    tx = make(optax.sgd(0.1, momentum=0.9), 0.05)
    state = tx.init(params)
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
    new = optax.apply_updates(params, updates)
    assert float(loss_fn(common.unperturbed(new, state))) < float(value), name
    assert common.describe(name, 0.3)


def test_train_runs_vectorizes_seeds_and_stops_at_loss():
  data = common.stack([common.noisy_digits(0.0, s) for s in (0, 1)])
  out = common.train_runs(optax.sgd(0.05, momentum=0.9), data, [0, 1], sizes=(64, 16, 10),
                          epochs=12, batch_size=128, stop_at_loss=0.5,
                          snapshot_losses=(1.0, 0.5))
  assert out["curve"].shape[0] == 2 and out["curve"].shape[1] <= 12
  assert np.all(out["snapshot_epoch"] > 0)
  assert np.all(out["snapshot_epoch"][0] <= out["snapshot_epoch"][1])
  assert np.all(out["stop_epoch"] == out["snapshot_epoch"][1])
  for run in range(2):  # frozen at the stop epoch
    stop = out["stop_epoch"][run]
    assert out["train_loss"][run, stop - 1] <= 0.5
    np.testing.assert_allclose(out["train_loss"][run, stop - 1:], out["train_loss"][run, stop - 1])
  assert not np.allclose(out["params"][0]["w"][0], out["params"][0]["w"][1])  # seeds differ


def test_noisy_data_sets_are_offline_and_noisy():
  d = common.noisy_digits(0.5, 0)
  wrong = np.mean(d.y_train != d.y_train_clean)
  assert 0.35 < wrong < 0.55  # 0.9 × noise
  m = common.noisy_mnist1d(0.0, 0, n_train=100)
  assert m.x_train.shape == (100, 40) and m.x_test.shape == (1000, 40)
  np.testing.assert_array_equal(m.y_train, m.y_train_clean)


def test_main_job_rejects_unavailable_method(capsys):
  with pytest.raises(SystemExit):
    reproduce.main(["--quick", "--methods", "sgd,nope"])
  assert "not available" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_in_device_m_is_two_passes_with_every_straight_line_loop(model):
  """XLA FLOPs of the in-device m step are two passes' worth (vmap and
  unroll), and every group loop takes the same step. Machine-independent: no
  timing. On these tiny models the step's elementwise work (norms, ε, means)
  is a visible share of the FLOPs, so the bound is 2.5 × SGD, below the 3 ×
  of a third pass (the full-size models measure 2.00–2.05 ×)."""
  from benchmarks import distributed  # pylint: disable=import-outside-toplevel
  kwargs, batch, (m,) = distributed.QUICK_MODELS[model]
  params, fn, data = distributed._model(model, kwargs, batch)  # pylint: disable=protected-access
  steps = distributed.in_device_steps(fn, [m], ["vmap", "unroll", "scan"])

  def flops(key):
    tx, step = steps[key]
    return distributed.xla_cost(step.lower(params, tx.init(params), data).compile())["flops"]

  sgd = flops(("sgd", None, None))
  for loop in ("vmap", "unroll"):
    assert flops(("sam", m, loop)) <= 2.5 * sgd, (loop, flops(("sam", m, loop)) / sgd)
  after = {}
  for loop in ("vmap", "unroll", "scan"):
    tx, step = steps[("sam", m, loop)]
    after[loop], _ = step(params, tx.init(params), data)
  for loop in ("unroll", "scan"):
    for a, b in zip(jax.tree.leaves(after["vmap"]), jax.tree.leaves(after[loop])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_variants_cost_writes_table_csv_and_plot(tmp_path):
  from benchmarks import variants_cost  # pylint: disable=import-outside-toplevel
  out = tmp_path / "vc.md"
  ratio = variants_cost.main(["--rounds", "2", "--hidden", "16", "--batch", "32",
                              "--out", str(out)])
  assert ratio["SGD (base)"] == 1.0 and set(ratio) >= {"SAM", "MSAM", "LookSAM (k=5)"}
  text = out.read_text()
  assert "| SAM | 1.0 |" in text and "Plot: `vc.png`" in text
  rows = (tmp_path / "vc.csv").read_text().splitlines()
  assert rows[0].startswith("method,second_passes_per_step") and len(rows) == 1 + len(ratio)
  assert (tmp_path / "vc.png").stat().st_size > 0


def test_distributed_quick_writes_table_csvs_and_plot(tmp_path):
  from benchmarks import distributed  # pylint: disable=import-outside-toplevel
  distributed.main(["--quick", "--models", "mlp", "--loops", "vmap", "scan",
                    "--out-dir", str(tmp_path)])
  text = (tmp_path / "distributed.md").read_text()
  assert "| shard_map: sam × m=8 | 1 |" in text and "| pmap: sam | 1 |" in text
  assert "| mlp | 32 | 8 | scan | n/a |" in text
  rows = (tmp_path / "distributed_in_device.csv").read_text().splitlines()
  assert rows[0].startswith("model,batch,params,step,m,group_loop")
  assert len(rows) == 1 + 2 + 2 * 2  # sgd, sam; (sam, sgd-groups) × 2 loops
  assert (tmp_path / "distributed.png").stat().st_size > 0
