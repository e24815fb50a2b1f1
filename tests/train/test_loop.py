"""The loop end to end in subprocesses (CPU): exact resume after kill -9, SIGTERM saves and exits 0.

Exact resume: N steps with a checkpoint every N/2, kill -9 once step N's checkpoint is committed,
resume to 2N: losses and parameters equal (bitwise) those of 2N uninterrupted steps.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kimi_vl_jax.train import checkpoint as ckpt_lib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
N = 4


def _cmd(workdir, steps, every):
  return [sys.executable, '-m', 'kimi_vl_jax.main', f'--config={HERE}/resume_experiment.py:{steps},{every}',
          f'--workdir={workdir}', '--mode=train']


def _env(cache_dir):
  env = dict(os.environ)
  # One persistent compilation cache for the test's runs: the first compiles the step, the
  # others load it (a program that differs, e.g. in what a resumed run bakes in, misses the
  # cache and compiles; the runs' own 'auto' caches would only serve the resumed run).
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  # Single-threaded Eigen: threaded CPU dots/reductions may split work by load, which moves
  # the last bits between processes; bitwise resume is a property of the trainer, not of that.
  env['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false '
                      'intra_op_parallelism_threads=1')
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _losses(workdir):
  path = os.path.join(workdir, 'joint_pretrain', 'metrics.jsonl')
  rows = [json.loads(l) for l in open(path) if l.strip()]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _final_params(workdir):
  ck = ckpt_lib.StageCheckpoints(workdir, 'joint_pretrain')
  try:
    assert ck.read_meta()['complete']
    return ck.restore_raw()['params']
  finally:
    ck.close()


def _wait_for(path, proc, timeout=300):
  t0 = time.time()
  while not os.path.isdir(path):
    if proc.poll() is not None:
      raise AssertionError(f'process ended (rc {proc.returncode}) before {path} appeared')
    if time.time() - t0 > timeout:
      raise AssertionError(f'timed out waiting for {path}')
    time.sleep(0.2)


@pytest.mark.slow
def test_exact_resume_after_kill9_and_sigterm(tmp_path):
  ref, cut, term = (str(tmp_path / n) for n in ('ref', 'cut', 'term'))
  env = _env(str(tmp_path / 'compilation_cache'))
  subprocess.run(_cmd(ref, 2 * N, N), cwd=ROOT, env=env, check=True, capture_output=True)

  proc = subprocess.Popen(_cmd(cut, 2 * N, N // 2), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(os.path.join(cut, 'checkpoints', 'joint_pretrain', str(N)), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = subprocess.run(_cmd(cut, 2 * N, N // 2), cwd=ROOT, env=env, capture_output=True,
                           text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]

  ref_losses, cut_losses = _losses(ref), _losses(cut)
  assert sorted(ref_losses) == list(range(1, 2 * N + 1))
  for step in range(1, 2 * N + 1):
    assert cut_losses[step] == ref_losses[step], (step, cut_losses[step], ref_losses[step])
  jax.tree.map(np.testing.assert_array_equal, _final_params(cut), _final_params(ref))

  # SIGTERM mid-run: the process saves a checkpoint and exits 0; it restores and is not final.
  proc = subprocess.Popen(_cmd(term, 1000, 0), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(term, 'joint_pretrain', 'metrics.jsonl')
  t0 = time.time()
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() - t0 < 300, 'no training step before SIGTERM'
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  ck = ckpt_lib.StageCheckpoints(term, 'joint_pretrain')
  step = ck.latest_step()
  meta = ck.read_meta()
  assert step is not None and 0 < step < 1000 and not meta['complete']
  state = ck.restore_raw()
  assert int(state['step']) == step
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))
  ck.close()


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
  """NaN losses (out-of-vocabulary ids embed to NaN) are skipped, then the run stops with an
  error naming the stage, step and data position, and no checkpoint is written."""
  import importlib.util
  from kimi_vl_jax.train import data as data_lib, loop

  spec = importlib.util.spec_from_file_location('resume_experiment', os.path.join(HERE, 'resume_experiment.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config('6,0')
  config.train.max_consecutive_nonfinite = 2

  class Poisoned:
    def __init__(self, inner):
      self.inner, self.tok, self.source_names = inner, inner.tok, inner.source_names

    def next(self):
      batch = self.inner.next()
      batch['tokens'] = np.where(batch['segment_ids'] > 0, 10 ** 6, batch['tokens']).astype(np.int32)
      return batch

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, s):
      self.inner.set_state(s)

  factory = lambda c, s, m: Poisoned(data_lib.make_source(c, s, m))
  with pytest.raises(loop.NonFiniteError, match=r'joint_pretrain: 2 consecutive non-finite steps '
                     r'ending at step 2 \(data position'):
    loop.run_experiment(config, str(tmp_path), source_factory=factory)
  assert ckpt_lib.StageCheckpoints(str(tmp_path), 'joint_pretrain').latest_step() is None


def _expert_parallel_config(expert: int):
  from kimi_vl_jax.config import base_config
  c = base_config('tiny')
  c.train.global_batch = 8
  c.train.seq_len = 32
  c.mesh.data, c.mesh.expert = 8 // expert, expert
  c.model.lm.moe_backend = 'capacity'
  c.data.sources = 'text=generated:text@1'
  c.data.max_patches_per_row = 0
  c.stages.joint_pretrain.task = 'lm'
  c.stages.joint_pretrain.steps = 1
  # fp32 Newton-Schulz: with bf16 operands the fp32-level differences between the two
  # meshes' gradients (reduction order) round into differences of up to ~4% of a leaf's
  # largest Muon update (measured; 3e-4 with fp32), beyond this test's tolerance.
  c.optim.ns_dtype = 'float32'
  return c


def _collectives(lowered):
  hlo = lowered.compile().as_text()
  return {k: hlo.count(k) for k in ('all-to-all', 'all-gather')}


def test_train_step_exchanges_tokens_over_the_expert_axis_and_matches_data_parallel():
  """The jitted step traces under the mesh (``activation_context``): with expert=2 its MoE
  layers exchange tokens (more all-to-alls and far fewer all-gathers than the same step
  traced without the mesh, where GSPMD gathers expert weights), and the step's loss and
  updated parameters equal those of the same step on a data-only mesh."""
  from kimi_vl_jax.parallel import mesh as mesh_lib, sharding as shard_lib
  from kimi_vl_jax.train import loop, stages as stages_lib
  out = {}
  for expert in (1, 2):
    config = _expert_parallel_config(expert)
    mesh = mesh_lib.build_mesh(config.mesh)
    stage = stages_lib.resolve(config, 'joint_pretrain')
    prep = loop.prepare_stage(config, stage, mesh)
    batch = shard_lib.make_global_batch(prep.source.next(), mesh)
    st, _ = loop._init_state(prep.task, prep.opt, prep.shardings, prep.rng, None)
    if expert == 2:   # lowered before the step runs: the step donates (consumes) the state
      trainer = _collectives(prep.jitted.lower(st, batch))
      no_mesh = _collectives(prep.jitted.fn.lower(st, batch))   # traced without the context
      assert trainer['all-to-all'] > no_mesh['all-to-all'], (trainer, no_mesh)
      assert trainer['all-gather'] < no_mesh['all-gather'] / 2, (trainer, no_mesh)
    new, metrics = prep.jitted(st, batch)
    out[expert] = (float(metrics['loss']), jax.device_get(new.params))
  np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               out[2][1], out[1][1])


def _pair_config():
  """Tiny text-only joint pretraining and cooldown: the defaults give them different lr
  schedules (cosine / linear to 0), warmups, budgets and router-bias rates (> 0 / 0)."""
  c = _expert_parallel_config(1)
  c.stages.cooldown.task = 'lm'
  c.stages.joint_pretrain.steps = 3
  c.stages.cooldown.steps = 2
  return c


def test_stages_differing_only_in_lr_and_router_rate_share_one_program():
  """The loop passes the schedule and router rate as data (``step.step_hparams``), so joint
  pretraining and cooldown lower to the same program, which the persistent compilation cache
  then compiles once."""
  from kimi_vl_jax.parallel import mesh as mesh_lib, sharding as shard_lib
  from kimi_vl_jax.train import loop, stages as stages_lib
  c = _pair_config()
  mesh = mesh_lib.build_mesh(c.mesh)
  texts, hparams = [], []
  for name in ('joint_pretrain', 'cooldown'):
    stage = stages_lib.resolve(c, name)
    prep = loop.prepare_stage(c, stage, mesh)
    batch = shard_lib.make_global_batch(prep.source.next(), mesh)
    # Lowering needs only the state's shapes and shardings (the same text as with the
    # initialized state; running the init would compile it for nothing).
    st = jax.eval_shape(lambda: loop._init_state(prep.task, prep.opt, prep.shardings, prep.rng,
                                                 None)[0])
    st = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), st,
                      prep.shardings)
    texts.append(prep.jitted.lower(st, batch).as_text())
    hparams.append(jax.device_get(prep.jitted.hparams))
  assert hparams[0]['router_bias_rate'] > 0 and hparams[1]['router_bias_rate'] == 0
  assert hparams[0]['schedule']['cosine'] == 1 and hparams[1]['schedule']['cosine'] == 0
  assert texts[0] == texts[1]


def test_init_from_previous_stage_without_random_init():
  """A stage whose tensors all come from the previous stage builds its state without running
  the random init (traced once, for shapes only; the init-then-copy path traces it again to run
  it), and gets exactly what the init-then-copy path gives; a tensor the previous stage lacks
  still gets its fresh init."""
  from kimi_vl_jax.parallel import mesh as mesh_lib
  from kimi_vl_jax.train import loop, stages as stages_lib
  c = _pair_config()
  mesh = mesh_lib.build_mesh(c.mesh)
  prep = loop.prepare_stage(c, stages_lib.resolve(c, 'cooldown'), mesh)
  fresh, _ = loop._init_state(prep.task, prep.opt, prep.shardings, prep.rng, None)
  fresh = jax.device_get(fresh)
  prev_params = jax.tree.map(lambda x: x + 1.0, fresh.params)
  prev = (prev_params, jax.tree.map(lambda x: x - 1.0, fresh.extra))

  calls = []
  counted = lambda: dataclasses.replace(   # a new function each time: no trace cache hits
      prep.task, init=lambda rng: calls.append(1) or prep.task.init(rng))
  st, copied = loop._init_state(counted(), prep.opt, prep.shardings, prep.rng, prev)
  assert len(calls) == 1, 'the random init ran although every tensor came from the previous stage'
  st = jax.device_get(st)
  assert len(copied) == len(jax.tree.leaves(fresh.params))
  jax.tree.map(np.testing.assert_array_equal, st.params, prev[0])
  jax.tree.map(np.testing.assert_array_equal, st.extra, prev[1])
  jax.tree.map(np.testing.assert_array_equal, st.opt_state, fresh.opt_state)
  np.testing.assert_array_equal(st.rng, fresh.rng)
  assert st.params['lm_head']['kernel'].dtype == np.float32

  partial = dict(prev_params)
  del partial['lm_head']
  calls.clear()
  st, copied = loop._init_state(counted(), prep.opt, prep.shardings, prep.rng, (partial, prev[1]))
  assert len(calls) == 2
  st = jax.device_get(st)
  np.testing.assert_array_equal(st.params['lm_head']['kernel'], fresh.params['lm_head']['kernel'])
  jax.tree.map(np.testing.assert_array_equal, st.params['embed_tokens'], prev_params['embed_tokens'])


def test_compilation_cache_setting_is_scoped_to_the_run(tmp_path):
  from kimi_vl_jax.train import loop
  before = jax.config.jax_compilation_cache_dir
  with loop.compilation_cache('auto', str(tmp_path)) as path:
    assert path == (before or str(tmp_path / 'compilation_cache'))
    assert jax.config.jax_compilation_cache_dir == path
  assert jax.config.jax_compilation_cache_dir == before
  with loop.compilation_cache('', str(tmp_path)) as path:
    assert path is None and jax.config.jax_compilation_cache_dir is None
  own = str(tmp_path / 'own')
  with loop.compilation_cache(own, str(tmp_path)):
    with loop.compilation_cache('auto', str(tmp_path)) as path:
      assert path == own          # a directory the user already chose wins over 'auto'
  assert jax.config.jax_compilation_cache_dir == before
