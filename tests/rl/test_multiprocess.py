"""The RL stage in a real 2-process job (4 CPU devices each, gloo collectives): both processes
draw, sample and score the same rollouts, process 0 writes the metrics, and the stage ends in
a complete checkpoint; the problems and first samples match a one-process run on 8 devices.
The same job also hands a checkpoint over from one stage to the next on an FSDP mesh."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from kimi_vl_jax.metrics.writer import read_jsonl
from kimi_vl_jax.train import checkpoint as ckpt_lib

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_multiprocess_worker.py')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERATIONS, UPDATES, ROWS = 2, 2, 8        # test_loop._rl_config(iterations=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(workdir, out, devices, coordinator=None, pid=0, n=1):
  """Starts one worker writing ``out`` (JSON) and ``out``.log (its output: a file, not a pipe
  that a worker could fill while the test waits on another)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('KVJ_')}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
  if coordinator:
    env.update(KVJ_COORDINATOR=coordinator, KVJ_NUM_PROCESSES=str(n), KVJ_PROCESS_ID=str(pid),
               KVJ_CPU_COLLECTIVES='gloo')
  with open(f'{out}.log', 'w') as log:
    proc = subprocess.Popen([sys.executable, '-u', WORKER, str(workdir), str(out)], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log = f'{out}.log'
  return proc


def _finish(procs, timeout=480):
  """Waits for every worker; fails with a worker's output if one hangs or exits non-zero."""
  tail = lambda p: open(p.log).read()[-3000:]
  try:
    for p in procs:
      try:
        p.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        pytest.fail(f'a worker did not exit within {timeout} s (hung):\n{tail(p)}')
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p in procs:
    assert p.returncode == 0, tail(p)


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """The tiny RL stage run by 2 processes: (workdir, [each process's JSON record])."""
  tmp = tmp_path_factory.mktemp('rl_two_processes')
  port = _free_port()
  procs = [_spawn(tmp / 'run', tmp / f'out{pid}.json', 4, f'127.0.0.1:{port}', pid, 2)
           for pid in range(2)]
  _finish(procs)
  return tmp / 'run', [json.load(open(tmp / f'out{pid}.json')) for pid in range(2)]


@pytest.mark.slow
def test_rl_stage_in_two_processes(two_process_run):
  run, res = two_process_run
  for pid, r in enumerate(res):
    assert (r['rc'], r['process'], r['count'], r['devices']) == (0, pid, 2, 8)
    assert len(r['rollouts']) == ITERATIONS
    for roll in r['rollouts']:
      assert len(roll['prompt_ids']) == ROWS and np.asarray(roll['tokens']).shape == (ROWS, 6)
  # Same host data on both processes (problems, prompts, scored samples), and the same values
  # gathered from the devices (sampled tokens, reference log-probs, metrics).
  assert res[0]['rollouts'] == res[1]['rollouts']
  assert res[0]['gathered'] == res[1]['gathered']
  assert len(_ref_logps(res[0])) == ITERATIONS and np.all(np.isfinite(_ref_logps(res[0])))

  # Process 0 alone wrote the metrics: one record per iteration.
  rows = [r for r in read_jsonl(str(run / 'rl' / 'metrics.jsonl')) if 'reward' in r]
  assert [r['step'] for r in rows] == [1, 2]
  for r, roll in zip(rows, res[0]['rollouts']):
    assert all(np.isfinite(r[key]) for key in ('loss', 'reward', 'accuracy', 'grad_norm'))
    assert r['accuracy'] == pytest.approx(np.mean(roll['correct']))
    assert r['response_tokens'] == pytest.approx(np.mean(roll['lengths']))
  assert os.path.exists(run / 'rl' / 'report.md') and os.path.exists(run / 'report.json')
  # The final evals ran across both processes (greedy decoding gathers the sampled tokens).
  evals = [r for r in read_jsonl(str(run / 'rl' / 'metrics.jsonl')) if 'eval/caption_ppl' in r]
  assert len(evals) == 1 and np.isfinite(evals[0]['eval/caption_ppl'])
  assert 0.0 <= evals[0]['eval/exact_match/needle'] <= 1.0

  # The final checkpoint: complete, with the sampler's record of every attempt; its state
  # (read back by the workers) took every update and ends with a fresh optimizer state.
  import orbax.checkpoint as ocp
  ck = ckpt_lib.StageCheckpoints(str(run), 'rl')
  try:
    meta = ck.read_meta()
    data = ck.manager.restore(ITERATIONS, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  finally:
    ck.close()
  assert meta['complete'] and meta['step'] == ITERATIONS
  assert meta['summary']['steps'] == ITERATIONS and meta['summary']['tokens_seen'] > 0
  assert sum(data['data']['attempts']) == ITERATIONS * ROWS
  assert res[0]['final'] == {'step': ITERATIONS * UPDATES, 'opt_state_zero': True}


@pytest.mark.slow
def test_next_stage_state_from_previous_parameters_on_an_fsdp_mesh(two_process_run):
  """The hand-over between stages on a mesh that splits tensors across the processes: a saved
  joint-pretraining checkpoint read back as cooldown reads its previous stage (``restore_raw``)
  builds cooldown's state (``loop._init_state``). Given every tensor, the state holds exactly
  them; with ``lm_head`` missing, the random init runs and the given tensors replace its values
  without the sharded init being fetched to the host (which a multi-process job cannot do)."""
  _, res = two_process_run
  for r in res:
    got = r['init_from_previous']
    assert got['split_across_processes'] > 0, got   # the multi-process case is exercised
    assert got['all'] == {'copied': got['leaves'], 'given_equal': True, 'lm_head_fresh': False}
    assert got['partial'] == {'copied': got['leaves'] - 1, 'given_equal': True,
                              'lm_head_fresh': True}
  assert res[0]['init_from_previous'] == res[1]['init_from_previous']


@pytest.mark.slow
def test_two_processes_compute_what_one_process_does(two_process_run, tmp_path):
  """One process on 8 devices: the same problems each iteration (the sampler is a function of
  seed and iteration) and the same first samples and reference log-probs (the same initial
  policy and key, each row computed on its own device). Later iterations follow updates whose
  cross-device gradient sums may round differently, so they are not compared."""
  _, (res, _) = two_process_run
  _finish([_spawn(tmp_path / 'run', tmp_path / 'single.json', 8)])
  single = json.load(open(tmp_path / 'single.json'))
  assert (single['rc'], single['count'], single['devices']) == (0, 1, 8)
  assert ([r['prompt_ids'] for r in single['rollouts']]
          == [r['prompt_ids'] for r in res['rollouts']])
  first, first_single = res['rollouts'][0], single['rollouts'][0]
  assert first_single['tokens'] == first['tokens']
  assert first_single['correct'] == first['correct']
  np.testing.assert_allclose(_ref_logps(single)[0], _ref_logps(res)[0], rtol=1e-6)


def _ref_logps(record) -> list:
  """The gathered reference log-probs [rows] of each iteration (the only [ROWS] values)."""
  return [g for g in record['gathered'] if np.shape(g) == (ROWS,)]
