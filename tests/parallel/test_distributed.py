"""Multi-host start-up: environment detection (pure), the watchdog, and real 2-process runs
on CPU (2 devices each, gloo collectives) including a peer that dies or hangs."""
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from kimi_vl_jax.metrics.writer import read_jsonl
from kimi_vl_jax.parallel import distributed
from kimi_vl_jax.parallel.distributed import DistributedSpec, Watchdog, detect

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- detect(): pure --------------------------------------------------------------------------

def test_detect_explicit():
  env = dict(KVJ_COORDINATOR='10.0.0.1:1234', KVJ_NUM_PROCESSES='4', KVJ_PROCESS_ID='3',
             KVJ_CPU_COLLECTIVES='gloo', SLURM_NTASKS='8')
  assert detect(env) == DistributedSpec('explicit', '10.0.0.1:1234', 4, 3, 'gloo')


@pytest.mark.parametrize('env,match', [
    (dict(KVJ_COORDINATOR='h:1', KVJ_NUM_PROCESSES='2'), 'KVJ_PROCESS_ID is missing'),
    (dict(KVJ_COORDINATOR='h:1', KVJ_NUM_PROCESSES='two', KVJ_PROCESS_ID='0'), 'must be integers'),
    (dict(KVJ_COORDINATOR='h:1', KVJ_NUM_PROCESSES='2', KVJ_PROCESS_ID='2'), r'outside \[0'),
])
def test_detect_explicit_mistakes(env, match):
  with pytest.raises(ValueError, match=match):
    detect(env)


def test_detect_slurm_tpu_single():
  assert detect(dict(SLURM_NTASKS='16', SLURM_PROCID='3')).kind == 'slurm'
  assert detect(dict(SLURM_NTASKS='1')).kind == 'single'
  assert detect(dict(KVJ_AUTO_DISTRIBUTED='1')).kind == 'tpu'
  assert detect(dict(TPU_WORKER_HOSTNAMES='t1,t2,t3,t4')).kind == 'tpu'
  assert detect(dict(TPU_WORKER_HOSTNAMES='t1')).kind == 'single'
  assert detect({}) == DistributedSpec('single')


def test_detect_slurm_one_process_per_node_sees_every_gpu():
  env = dict(SLURM_NTASKS='4', KVJ_SLURM_MODE='node', SLURM_GPUS_ON_NODE='8')
  assert detect(env).local_device_ids == tuple(range(8))
  assert detect(dict(SLURM_NTASKS='4', KVJ_SLURM_MODE='gpu')).local_device_ids is None
  with pytest.raises(ValueError, match='SLURM_GPUS_ON_NODE'):
    detect(dict(SLURM_NTASKS='4', KVJ_SLURM_MODE='node'))
  with pytest.raises(ValueError, match='KVJ_SLURM_MODE must be gpu or node'):
    detect(dict(SLURM_NTASKS='4', KVJ_SLURM_MODE='core'))


def test_initialize_single_process_is_a_no_op():
  spec = distributed.initialize(env={})
  assert spec.kind == 'single'
  import jax
  assert not jax.distributed.is_initialized()


def test_bad_timeout_env_names_the_variable():
  env = dict(KVJ_COORDINATOR='127.0.0.1:1', KVJ_NUM_PROCESSES='2', KVJ_PROCESS_ID='1',
             KVJ_HEARTBEAT_TIMEOUT_S='soon')
  with pytest.raises(ValueError, match='KVJ_HEARTBEAT_TIMEOUT_S'):
    distributed.initialize(env=env)


# --- Watchdog (in process, with a fake exit) -------------------------------------------------

def test_watchdog_fires_only_on_overrun():
  codes, stream = [], io.StringIO()
  dog = Watchdog(0.3, stream=stream, on_timeout=codes.append)
  for i in range(3):
    with dog.arm(f'fast step {i}'):
      time.sleep(0.05)
  time.sleep(0.5)  # disarmed regions never fire later
  assert codes == [] and stream.getvalue() == ''
  with dog.arm('step 7'):
    time.sleep(0.7)
  assert codes == [distributed.EXIT_HUNG]
  line = stream.getvalue().strip()
  assert line.startswith('error: step 7 did not finish within 0.3 s on process 0 of 1'), line
  with pytest.raises(ValueError):
    Watchdog(0)


# --- 2 real processes ------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(scenario: str, extra_env=None, n: int = 2):
  port = _free_port()
  procs = []
  for pid in range(n):
    env = dict(os.environ)
    env.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
               KVJ_COORDINATOR=f'127.0.0.1:{port}', KVJ_NUM_PROCESSES=str(n),
               KVJ_PROCESS_ID=str(pid), KVJ_CPU_COLLECTIVES='gloo', **(extra_env or {}))
    procs.append(subprocess.Popen([sys.executable, '-u', WORKER, scenario], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(proc, timeout):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f'process did not exit within {timeout} s (it hung):\n{out[-3000:]}')
  return proc.returncode, out


def _kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.communicate()


def _results(procs, timeout) -> list:
  """Each worker's ``RESULT {json}`` line, once all exited 0 (else fails with its output)."""
  try:
    results = []
    for p in procs:
      rc, out = _wait(p, timeout=timeout)
      assert rc == 0, out[-3000:]
      line = [l for l in out.splitlines() if l.startswith('RESULT ')]
      assert line, out[-3000:]
      results.append(json.loads(line[0][len('RESULT '):]))
  finally:
    _kill_all(procs)
  return results


@pytest.mark.slow
def test_two_processes_build_a_4_device_mesh_and_agree(tmp_path):
  results = _results(_launch('compute', dict(KVJ_TEST_WORKDIR=str(tmp_path))), timeout=120)
  for pid, r in enumerate(results):
    assert (r['kind'], r['process_index'], r['process_count']) == ('explicit', pid, 2)
    assert (r['device_count'], r['local_device_count']) == (4, 2)
    assert r['mesh_shape'] == dict(data=4, fsdp=1, expert=1, tensor=1)
    assert r['global_shape'] == [8, 3]
    assert r['global_sum'] == r['expected_sum']
    # data=2 x fsdp=2: each data row lives on one process (process-major order).
    assert r['mesh2_process_of_data_row'] == [[0], [1]]
    assert r['x2_spec'] == "P(('data', 'fsdp', 'expert'), None)"
    assert r['w2_spec'] == "P(None, 'fsdp')"
    assert r['x2_local_shard_shapes'] == [[2, 3], [2, 3]]
    assert r['matmul_local_shards_ok'] and r['matmul_num_local_shards'] == 2
    assert r['matmul_col_sum'] == pytest.approx(r['expected_col_sum'], rel=1e-5)
    assert r['metrics_writer_enabled'] == (pid == 0)
  records = read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert len(records) == 1 and records[0]['process'] == 0  # one log per job, not per host


@pytest.mark.slow
def test_sigterm_on_one_process_saves_the_same_step_everywhere(tmp_path):
  """A preemption notice that reaches one process only (or the processes at different steps):
  every process stops after the same step, saves it, and exits 0. Acting on the notice where it
  lands would leave that process in the checkpoint's barrier and the other in the next step's
  collectives, for good."""
  results = _results(_launch('preempt', dict(KVJ_TEST_WORKDIR=str(tmp_path))), timeout=180)
  assert [r['rc'] for r in results] == [0, 0]
  assert results[0]['step'] == results[1]['step']
  r = results[0]   # stopped early (the stage has r['steps'] steps), in a saved checkpoint
  assert 0 < r['step'] < r['steps'] and not r['complete'], r


HEARTBEAT_S = 10


@pytest.mark.slow
@pytest.mark.parametrize('dead', [1, 0], ids=['worker_dies', 'coordinator_dies'])
def test_survivor_exits_with_clear_error_when_a_peer_dies(dead):
  procs = _launch('die', dict(KVJ_TEST_DIE_PID=str(dead), KVJ_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S)))
  survivor = procs[1 - dead]
  try:
    rc_dead, out_dead = _wait(procs[dead], timeout=120)
    assert rc_dead == 3, out_dead[-3000:]
    t_death = time.monotonic()
    rc, out = _wait(survivor, timeout=HEARTBEAT_S + 45)
    waited = time.monotonic() - t_death
  finally:
    _kill_all(procs)
  if dead == 1:
    # The worker's death is noticed by missed heartbeats, while process 0 is blocked in a
    # collective; the coordinator's death closes the socket and ends process 1 at once.
    assert 'process 0 entering a collective' in out, out[-3000:]
  assert 'UNEXPECTED' not in out
  assert rc != 0
  assert 'another task died' in out, out[-3000:]
  assert waited < HEARTBEAT_S + 30, waited


@pytest.mark.slow
def test_watchdog_ends_a_collective_stuck_on_a_live_peer():
  procs = _launch('stuck', dict(KVJ_TEST_WATCHDOG_S='5'))
  try:
    rc, out = _wait(procs[0], timeout=90)
  finally:
    _kill_all(procs)
  assert 'UNEXPECTED' not in out
  assert rc == distributed.EXIT_HUNG, out[-3000:]
  assert ('error: the global sum of step 1 did not finish within 5 s on process 0 of 2'
          in out), out[-3000:]
