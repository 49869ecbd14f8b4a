"""One process of the multi-process tests (see test_multiprocess.py).

Run as a script, it joins a 2-process JAX cluster on localhost (2 CPU devices
per process, gloo collectives), runs ``run_sam`` on the 4-device mesh that spans
both processes and ``run_sam_2d`` on a 2-D mesh (data across the processes,
model within each), and saves the final params. Imported, it only provides
those functions, which the test also runs in a single process on 4 devices.
"""

import argparse
import os
import sys

import numpy as np

STEPS = 20
BATCH = 32


def run_sam(jax, mesh, steps=STEPS):
  """SAM (m = per-device batch) under shard_map on ``mesh``; returns numpy params.

  The data is synthetic and the same in every process; each process only
  materializes the shards of its own devices.
  """
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import sam_optax  # pylint: disable=import-outside-toplevel
  from tests import helpers  # pylint: disable=import-outside-toplevel

  params = jax.tree.map(np.asarray, helpers.mlp_params())
  x, y = (np.asarray(a) for a in helpers.mlp_batch(n=BATCH))

  def put(a, spec):
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec),
                                        lambda idx: a[idx])

  params = jax.tree.map(lambda a: put(a, P()), params)
  batch = (put(x, P("d")), put(y, P("d")))
  tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05, axis_name="d")

  def step(params, state, batch):
    loss_fn = lambda p: helpers.mlp_loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(sam_optax.per_device(params, "d"))
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("d")),
                               out_specs=(P(), P())))
  state = jax.jit(tx.init, out_shardings=NamedSharding(mesh, P()))(params)
  losses = []
  for _ in range(steps):
    params, state = step(params, state, batch)
    losses.append(sam_optax.get_info(state).loss)
  fetch = lambda a: np.asarray(a.addressable_data(0))
  out = {"leaf%d" % i: fetch(a) for i, a in enumerate(jax.tree.leaves(params))}
  out["losses"] = np.asarray([fetch(v) for v in losses])
  return out


def mesh_2d(jax, devices):
  """A 2 × 2 ('data', 'model') mesh of 4 devices, grouped by process: with 2
  processes, 'data' runs across them and 'model' within each."""
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "model"))


# Tensor parallel: column-, then row-parallel kernels within 'model'.
TP_SPECS = {"layer0": {"w": (None, "model"), "b": ("model",)},
            "layer1": {"w": ("model",), "b": ()}}


def run_sam_2d(jax, mesh, steps=STEPS):
  """Global SAM under plain ``jit`` (GSPMD) with tensor-parallel params on a
  ('data', 'model') mesh; each process loads only its rows of the batch
  (``jax.make_array_from_process_local_data``). Returns numpy params and the
  loss per step."""
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import sam_optax  # pylint: disable=import-outside-toplevel
  from tests import helpers  # pylint: disable=import-outside-toplevel

  shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(*s)), TP_SPECS,
                           is_leaf=lambda s: isinstance(s, tuple))
  params = jax.device_put(helpers.mlp_params(), shardings)
  x, y = (np.asarray(a) for a in helpers.mlp_batch(n=BATCH))
  rows = BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  batch = tuple(jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), a[mine])
                for a in (x, y))
  tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
  state_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()))
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  @jax.jit
  def step(params, state, batch):
    loss_fn = lambda p: helpers.mlp_loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, value=value)
    return optax.apply_updates(params, updates), state

  losses = []
  for _ in range(steps):
    params, state = step(params, state, batch)
    losses.append(sam_optax.get_info(state).loss)
  for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
  out = {"leaf%d" % i: _local_copy(a) for i, a in enumerate(jax.tree.leaves(params))}
  out["losses"] = np.asarray([_local_copy(v) for v in losses])
  return out


def _local_copy(a):
  """The whole of an array replicated across processes, from this process's
  shards (each process holds every 'model' shard)."""
  out = np.full(a.shape, np.nan, np.float32)
  for shard in a.addressable_shards:
    out[shard.index] = np.asarray(shard.data)
  assert not np.isnan(out).any(), "this process does not hold the whole array"
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=2,
                             process_id=args.process_id,
                             initialization_timeout=40)
  assert jax.process_count() == 2 and jax.device_count() == 4, (
      jax.process_count(), jax.device_count())
  mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  out = {f"shard_map/{k}": v for k, v in run_sam(jax, mesh).items()}
  mesh = mesh_2d(jax, jax.devices())
  # 'data' across the processes, 'model' within each.
  assert [{d.process_index for d in row} for row in mesh.devices] == [{0}, {1}], mesh.devices
  out.update({f"jit_2d/{k}": v for k, v in run_sam_2d(jax, mesh).items()})
  np.savez(args.out, **out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
