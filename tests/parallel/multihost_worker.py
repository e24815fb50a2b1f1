"""One process of the 2-process CPU test (run by test_distributed.py with ``python``).

Environment (set by the test, as a launcher would): KVJ_COORDINATOR, KVJ_NUM_PROCESSES,
KVJ_PROCESS_ID, KVJ_CPU_COLLECTIVES=gloo, XLA_FLAGS with 2 host devices.

argv[1] is the scenario:
- ``compute``: 4-device meshes across both processes; process-local rows become one global
  batch; a jitted global sum and a matmul sharded over (data, fsdp) are checked against numpy.
  Prints ``RESULT {json}``.
- ``die``: process ``KVJ_TEST_DIE_PID`` (default 1) exits right after a first collective;
  the other enters another collective, which can never finish. The coordination service
  must end the survivor.
- ``stuck``: process 1 stays alive but never joins the next collective; process 0 runs
  it under a ``Watchdog`` that must end it with ``EXIT_HUNG``.
- ``preempt``: a tiny LM stage of ``PREEMPT_STEPS`` steps in ``KVJ_TEST_WORKDIR``; process 1
  alone gets SIGTERM while it fetches its ``PREEMPT_AT``-th batch (0-based). Both must save
  the same step and return 0. Prints ``RESULT {json}``.
"""
import json
import os
import sys
import time

import numpy as np

from kimi_vl_jax.parallel import distributed

ROWS_PER_PROCESS = 4
FEATURES = 3
PREEMPT_STEPS, PREEMPT_AT = 30, 2


def _preempt_run(pid: int) -> dict:
  """The ``preempt`` scenario (module doc): run_experiment's return code and the stage's
  latest checkpoint as every process sees it."""
  import signal
  from kimi_vl_jax.config import base_config
  from kimi_vl_jax.train import checkpoint as ckpt_lib, data as data_lib, loop
  c = base_config('tiny')
  c.mesh.data = -1
  c.train.global_batch, c.train.seq_len = 8, 32
  c.data.sources = 'text=generated:text@1'
  c.data.max_patches_per_row = 0
  for name in c.stages:
    c.stages[name].enabled = name == 'joint_pretrain'
  c.stages.joint_pretrain.task, c.stages.joint_pretrain.steps = 'lm', PREEMPT_STEPS
  c.stages.joint_pretrain.eval = ()
  workdir = os.environ['KVJ_TEST_WORKDIR']

  def source_factory(config, stage, mesh):
    source = data_lib.make_source(config, stage, mesh)
    real_next, calls = source.next, [0]

    def next_batch():
      if pid == 1 and calls[0] == PREEMPT_AT:
        os.kill(os.getpid(), signal.SIGTERM)   # the notice reaches one process only
      calls[0] += 1
      return real_next()
    source.next = next_batch
    return source

  rc = loop.run_experiment(c, workdir, source_factory=source_factory)
  ck = ckpt_lib.StageCheckpoints(workdir, 'joint_pretrain')
  try:
    meta = ck.read_meta()
  finally:
    ck.close()
  return dict(rc=rc, step=meta['step'], complete=bool(meta.get('complete')),
              steps=PREEMPT_STEPS)


def main(scenario: str) -> int:
  spec = distributed.initialize()
  assert distributed.initialize() == spec  # idempotent
  import jax
  import jax.numpy as jnp
  import ml_collections

  from kimi_vl_jax.parallel.mesh import build_mesh
  from kimi_vl_jax.parallel.sharding import logical_sharding, make_global_batch

  pid, n = jax.process_index(), jax.process_count()
  # The whole batch is a known array; each process holds only its own rows.
  global_x = np.arange(n * ROWS_PER_PROCESS * FEATURES, dtype=np.float32).reshape(-1, FEATURES)
  local_x = global_x[pid * ROWS_PER_PROCESS:(pid + 1) * ROWS_PER_PROCESS]
  result = dict(kind=spec.kind, process_index=pid, process_count=n,
                device_count=jax.device_count(), local_device_count=jax.local_device_count())

  mesh = build_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1)))
  x = make_global_batch({'x': local_x}, mesh)['x']
  total = float(jax.jit(jnp.sum)(x))
  result.update(mesh_shape=dict(mesh.shape), global_shape=list(x.shape),
                global_sum=total, expected_sum=float(global_x.sum()))

  if scenario == 'die':
    if pid == int(os.environ.get('KVJ_TEST_DIE_PID', 1)):
      print(f'process {pid} exiting on purpose', flush=True)
      os._exit(3)
    time.sleep(0.5)
    print(f'process {pid} entering a collective', flush=True)
    float(jax.jit(lambda v: (v * v).sum())(x))
    print('UNEXPECTED: the collective finished without the dead peer', flush=True)
    return 0

  if scenario == 'preempt':
    result.update(_preempt_run(pid))
    print('RESULT ' + json.dumps(result), flush=True)
    return 0

  if scenario == 'stuck':
    if pid == 1:
      time.sleep(300)  # alive (heartbeats keep going) but never joins; the test kills it
      return 0
    watchdog = distributed.Watchdog(timeout_s=float(os.environ.get('KVJ_TEST_WATCHDOG_S', 8)))
    with watchdog.arm('the global sum of step 1'):
      float(jax.jit(lambda v: (v * v).sum())(x))
    print('UNEXPECTED: the collective finished without the stuck peer', flush=True)
    return 0

  # A second mesh, data=2 x fsdp=2: the batch splits 4 ways across both processes and a
  # weight [FEATURES, 4] is split over its columns by the rules ('mlp' -> tensor is 1 here,
  # so use fsdp via 'embed' on the output axis).
  mesh2 = build_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, expert=1, tensor=1)))
  x2 = make_global_batch({'x': local_x}, mesh2)['x']
  w = np.arange(FEATURES * 4, dtype=np.float32).reshape(FEATURES, 4) / 10
  w_sharding = logical_sharding(mesh2, (None, 'embed'))
  w2 = jax.make_array_from_callback(w.shape, w_sharding, lambda idx: w[idx])
  y = jax.jit(lambda a, b: a @ b, out_shardings=logical_sharding(mesh2, ('batch', None)))(x2, w2)
  expected_y = global_x @ w
  local_ok = all(np.allclose(np.asarray(s.data), expected_y[s.index]) for s in y.addressable_shards)
  col_sum = np.asarray(jax.jit(lambda v: v.sum(0), out_shardings=logical_sharding(mesh2, (None,)))(y))
  result.update(
      mesh2_shape=dict(mesh2.shape),
      mesh2_process_of_data_row=[sorted({d.process_index for d in row.flat})
                                 for row in mesh2.devices[:, :, 0, 0]],
      x2_spec=str(x2.sharding.spec), w2_spec=str(w2.sharding.spec),
      x2_local_shard_shapes=[list(s.data.shape) for s in x2.addressable_shards],
      matmul_local_shards_ok=bool(local_ok), matmul_num_local_shards=len(y.addressable_shards),
      matmul_col_sum=col_sum.tolist(), expected_col_sum=expected_y.sum(0).tolist())
  # One metrics interface on every process; only process 0 writes (KVJ_TEST_WORKDIR is shared).
  from kimi_vl_jax.metrics.writer import MetricsWriter
  with MetricsWriter(os.environ['KVJ_TEST_WORKDIR'], tensorboard=False, progress=False) as w:
    result['metrics_writer_enabled'] = w.enabled
    w.write(1, {'global_sum': total, 'process': pid})
  print('RESULT ' + json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
