"""A TPU pod in miniature: 2 processes × 2 CPU devices, gloo collectives.

The test launches two fresh Python processes (their own JAX configuration, not
this process's 8 devices) that join one JAX cluster on localhost and run SAM
with ``axis_name`` under ``shard_map`` on the 4-device mesh spanning both, then
global SAM under ``jit`` with tensor-parallel params on a 2-D mesh ('data'
across the processes, 'model' within each; each process loads only its rows
of the batch). Their trajectories must equal the same runs in this single
process on 4 of its devices, and the 2-D run a float64 numpy reference.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from tests import _multiprocess_worker as worker
from tests import helpers

TIMEOUT_S = 50
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env():
  env = dict(os.environ)
  # The children configure their own devices; nothing from this process.
  for k in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    env.pop(k, None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_two_processes_match_single_process(tmp_path):
  port = _free_port()
  outs = [tmp_path / f"out{i}.npz" for i in range(2)]
  logs = [open(tmp_path / f"log{i}.txt", "w+b") for i in range(2)]
  procs = []
  try:
    for i in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(ROOT, "tests", "_multiprocess_worker.py"),
           "--process-id", str(i), "--port", str(port), "--out", str(outs[i])],
          env=_child_env(), cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT))
    # Meanwhile, the reference: one process, 4 of its devices.
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    want = {f"shard_map/{k}": v for k, v in worker.run_sam(jax, mesh).items()}
    want.update({f"jit_2d/{k}": v for k, v in
                 worker.run_sam_2d(jax, worker.mesh_2d(jax, jax.devices()[:4])).items()})
    # Wait for both; stop early if one fails (the other would hang in a
    # collective), and give up after TIMEOUT_S.
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      assert time.monotonic() < deadline, (
          f"the 2 processes did not finish in {TIMEOUT_S} s")
      time.sleep(0.1)
  finally:
    killed = []
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
        killed.append(p)
  texts = []
  for f in logs:
    f.seek(0)
    texts.append(f.read().decode(errors="replace")[-3000:])
    f.close()
  # Report a process that failed by itself before one that was stopped.
  for i, p in sorted(enumerate(procs), key=lambda ip: ip[1] in killed):
    assert p.returncode == 0, (
        f"process {i} {'was stopped' if p in killed else 'failed'} "
        f"(exit code {p.returncode}):\n{texts[i]}")
  for out in outs:
    got = dict(np.load(out))
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)
  # The runs trained: the loss went down over the 20 steps.
  for run in ("shard_map", "jit_2d"):
    assert want[f"{run}/losses"][-1] < want[f"{run}/losses"][0]
  # The 2-D run is global SAM (one ε for the whole batch), as in float64 numpy.
  x, y = helpers.mlp_batch(n=worker.BATCH)
  ref = helpers.np_sam_sgd_trajectory(helpers.mlp_params(), x, y, rho=0.05, lr=0.1,
                                      momentum=0.9, steps=worker.STEPS)[-1]
  for i, leaf in enumerate(jax.tree.leaves(ref)):
    np.testing.assert_allclose(want[f"jit_2d/leaf{i}"], leaf, atol=2e-6, rtol=0,
                               err_msg=f"leaf{i}")
