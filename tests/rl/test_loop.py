"""The RL stage end to end on the tiny LM: rollouts, rewards, updates, optimizer reset, resume."""
import json
import os

import jax
import numpy as np
import pytest

from kimi_vl_jax.train import checkpoint as ckpt_lib, loop


@pytest.fixture(scope='module', autouse=True)
def _one_compilation_cache(tmp_path_factory):
  """The module's runs compile the same tiny-LM programs (sampler, reference log-probs, train
  step): one persistent compilation cache serves them all (run_experiment's 'auto' cache uses
  an already set directory). A program that differs (a poisoned loss, a decode budget) misses
  it and compiles."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla_cache')))
  cc.reset_cache()
  yield
  jax.config.update('jax_compilation_cache_dir', before)
  cc.reset_cache()


def _rl_config(iterations=2):
  from kimi_vl_jax.config import base_config
  c = base_config('tiny')
  c.mesh.data = -1
  c.train.seq_len = 64
  c.data.max_patches_per_row = 0
  for name in c.stages:
    c.stages[name].enabled = name == 'rl'
  c.stages.rl.steps = iterations
  c.stages.rl.global_batch = 8            # 4 problems x 2 samples
  c.stages.rl.lr = 1e-3
  c.rl.model = 'lm'
  c.rl.tasks = ('arithmetic',)
  c.rl.difficulties = (0, 1)
  c.rl.problems_per_difficulty = 8
  c.rl.samples_per_prompt = 2
  c.rl.max_response_tokens = 6
  c.rl.updates_per_iteration = 2
  c.rl.length_penalty_weight = 0.5
  c.rl.length_penalty_warmup = 1
  c.rl.sampling = 'curriculum'
  return c


def _data_state(ck, step):
  import orbax.checkpoint as ocp
  out = ck.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  return dict(out['data'])


def test_rl_stage_runs_iterations_resets_the_optimizer_and_resumes(tmp_path):
  from kimi_vl_jax.config import validate
  config = _rl_config()
  config.train.checkpoint_every = 1
  validate(config, num_devices=jax.device_count())
  assert loop.run_experiment(config, str(tmp_path)) == 0
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, 'rl', 'metrics.jsonl'))]
  rows = [r for r in rows if 'reward' in r]
  assert [r['step'] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r['loss']) and 0.0 <= r['accuracy'] <= 1.0
    assert 1 <= r['response_tokens'] <= 6
  assert [r['length_penalty_on'] for r in rows] == [0.0, 1.0]   # warm-up of one iteration
  ck = ckpt_lib.StageCheckpoints(str(tmp_path), 'rl')
  meta = ck.read_meta()
  raw = ck.restore_raw()
  ck.close()
  assert meta['complete'] and meta['summary']['steps'] == 2
  # 2 iterations x 2 updates moved the step counter; each iteration ended with a fresh
  # optimizer state (count 0, zero moments): the next policy starts its own optimization.
  assert int(raw['step']) == 4, raw['step']
  leaves = jax.tree.leaves(raw['opt_state'])
  assert leaves and all(np.all(np.asarray(x) == 0) for x in leaves), 'optimizer state not reset'
  assert meta['summary']['tokens_seen'] > 0
  # A second run finds the stage complete and does nothing.
  assert loop.run_experiment(config, str(tmp_path)) == 0

  # Resume: as if stopped after iteration 1. The sampler's statistics come back from the
  # checkpoint, so iteration 2 draws the same problems as the uninterrupted run did.
  ck = ckpt_lib.StageCheckpoints(str(tmp_path), 'rl')
  first = _data_state(ck, 2)
  assert sum(first['attempts']) == 2 * 8          # 2 iterations x 4 problems x 2 samples
  ck.manager.delete(2)
  assert ck.latest_step() == 1 and sum(_data_state(ck, 1)['attempts']) == 8
  ck.close()
  assert loop.run_experiment(config, str(tmp_path)) == 0
  ck = ckpt_lib.StageCheckpoints(str(tmp_path), 'rl')
  again, meta = _data_state(ck, 2), ck.read_meta()
  ck.close()
  assert meta['complete'] and again['attempts'] == first['attempts']


def test_rl_stage_with_partial_rollouts_continues_responses_across_iterations(tmp_path):
  """A budget of 3 of the 6 response tokens a row: the tiny policy does not end a response
  within 3 tokens, so iteration 1 only decodes (all 4 groups wait, no update); iteration 2
  continues the same 8 responses (no rows left for fresh problems), scores and trains on them.
  Resumed after iteration 1, the stage continues the waiting responses from the checkpoint
  and ends with the same sampler record."""
  from kimi_vl_jax.config import validate
  config = _rl_config(iterations=2)
  config.rl.max_response_tokens = 6
  config.rl.partial_rollout_tokens = 3
  config.train.checkpoint_every = 1
  validate(config, num_devices=jax.device_count())
  assert loop.run_experiment(config, str(tmp_path)) == 0
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, 'rl', 'metrics.jsonl'))]
  rows = [r for r in rows if 'decode_rows' in r]
  assert [r['step'] for r in rows] == [1, 2]
  first, second = rows
  assert (first['completed_groups'], first['waiting_groups'], first['decode_rows']) == (0, 4, 8)
  assert 'loss' not in first
  assert (second['completed_groups'], second['waiting_groups'], second['decode_rows']) == (4, 0, 8)
  assert np.isfinite(second['loss']) and 3 < second['response_tokens'] <= 6
  ck = ckpt_lib.StageCheckpoints(str(tmp_path), 'rl')
  waiting, final = _data_state(ck, 1), _data_state(ck, 2)
  assert len(waiting['partial_rollouts']) == 4 and sum(waiting['attempts']) == 0
  assert all(len(r) == 3 for g in waiting['partial_rollouts'] for r in g['responses'])
  assert final['partial_rollouts'] == [] and sum(final['attempts']) == 8
  ck.manager.delete(2)
  ck.close()
  assert loop.run_experiment(config, str(tmp_path)) == 0
  ck = ckpt_lib.StageCheckpoints(str(tmp_path), 'rl')
  again = _data_state(ck, 2)
  ck.close()
  assert again['attempts'] == final['attempts'] and again['partial_rollouts'] == []


def test_rl_stage_stops_on_consecutive_non_finite_updates(tmp_path, monkeypatch):
  """A NaN objective skips the update (the step's guard) and ends the stage with the same
  error as the other stages once train.max_consecutive_nonfinite updates in a row failed."""
  import jax.numpy as jnp
  from kimi_vl_jax.rl import loop as rl_loop
  real = rl_loop.rl_task

  def poisoned(base, train_cfg, tau):
    task = real(base, train_cfg, tau)
    def loss(params, extra, batch, rng):
      obj, aux = task.loss(params, extra, batch, rng)
      return obj * jnp.nan, aux
    return task.__class__(task.name, task.init, loss, task.source_names, task.model,
                          task.model_config)

  monkeypatch.setattr(rl_loop, 'rl_task', poisoned)
  config = _rl_config(iterations=2)
  config.train.max_consecutive_nonfinite = 2
  with pytest.raises(loop.NonFiniteError, match=r'rl: 2 consecutive non-finite updates ending '
                     r'in iteration 1'):
    loop.run_experiment(config, str(tmp_path))


def _user_problems(path, n_easy=3, n_hard=3):
  """Text-only problems: numeric ones at difficulty 0, choice ones at 1, and two exact ones at
  -1, which rl.difficulties=(0, 1) must filter out (the curriculum would draw them first)."""
  lines = []
  for i in range(n_easy):
    lines.append({'messages': [{'role': 'user', 'content': f'What is {i} + 1?'}],
                  'answer': str(i + 1), 'verifier': 'numeric', 'difficulty': 0})
  for i in range(n_hard):
    lines.append({'conversations': [{'from': 'human', 'value': f'Pick {"ABC"[i]}: (A) (B) (C)'},
                                    {'from': 'gpt', 'value': '(' + 'ABC'[i] + ')'}],
                  'verifier': 'choice', 'difficulty': 1})
  lines += [{'messages': [{'role': 'user', 'content': 'Say hi.'}], 'answer': 'hi',
             'difficulty': -1}] * 2
  path.write_text(''.join(json.dumps(l) + '\n' for l in lines))
  return str(path)


def test_rl_stage_trains_on_user_problems(tmp_path, monkeypatch):
  """rl.problems replaces the generated pool: every rollout draws problems of the JSONL file
  (difficulty -1 filtered out by rl.difficulties), each scored by its own verifier."""
  from kimi_vl_jax.config import validate
  from kimi_vl_jax.data.generated import is_correct
  from kimi_vl_jax.rl import rollout as rollout_lib
  path = _user_problems(tmp_path / 'problems.jsonl')
  config = _rl_config(iterations=1)
  config.rl.problems = path
  config.rl.tasks = ('count',)            # a generated-only key: ignored with rl.problems
  config.rl.updates_per_iteration = 1
  validate(config, num_devices=jax.device_count())
  rolls, real = [], rollout_lib.collect
  monkeypatch.setattr(rollout_lib, 'collect', lambda *a: rolls.append(real(*a)) or rolls[-1])
  workdir = str(tmp_path / 'run')
  assert loop.run_experiment(config, workdir) == 0
  [roll] = rolls
  assert len(roll.problems) == 4 and len({r['origin'] for r in roll.problems}) == 4
  for r in roll.problems:
    assert r['origin'].startswith(f'{path}:') and r['difficulty'] in (0, 1), r['origin']
    assert r['verifier'] == ('numeric' if r['difficulty'] == 0 else 'choice')
  verdicts = [[float(is_correct(r, roll.texts[p * 2 + j])) for j in range(2)]
              for p, r in enumerate(roll.problems)]
  np.testing.assert_array_equal(roll.correct, verdicts)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'rl', 'metrics.jsonl'))]
  [row] = [r for r in rows if 'reward' in r]
  assert np.isfinite(row['loss']) and row['accuracy'] == float(roll.correct.mean())


def test_rl_stage_checks_the_user_pool_fits_before_compiling(tmp_path):
  """The config check only bounds a user pool; its real size is checked when it is built."""
  from kimi_vl_jax.config import ConfigError
  config = _rl_config(iterations=1)       # 4 problems an iteration
  config.rl.problems = _user_problems(tmp_path / 'problems.jsonl', n_easy=1, n_hard=2)
  with pytest.raises(ConfigError, match=r'^config\.stages\.rl\.global_batch: 8 rows need 4 '
                     r'distinct problems an iteration, but the pool holds 3'):
    loop.run_experiment(config, str(tmp_path / 'run'))
