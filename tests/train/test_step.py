"""Train step: microbatch accumulation == one batch (also with a whole-batch SigLIP term),
non-finite skip, frozen params, shardings."""
import dataclasses

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from kimi_vl_jax.config import base_config
from kimi_vl_jax.train import step as step_lib, tasks


def test_accumulation_matches_single_batch(toy):
  tx = optax.adamw(1e-2)
  out = []
  for m in (1, 2):
    task = toy.task()
    cfg = step_lib.StepConfig(microbatches=m, grad_clip_norm=1.0)
    mesh, sh, st = toy.setup(task, tx, cfg)
    fn = step_lib.jit_train_step(step_lib.make_train_step(task, tx, cfg), sh, toy.batch(0), mesh)
    for i in range(2):
      st, metrics = fn(st, toy.batch(i))
    out.append((st.params, metrics['loss'], metrics['grad_norm']))
  chex.assert_trees_all_close(out[0], out[1], rtol=1e-5, atol=1e-6)
  emb = out[0][0]['embed']['embedding']
  assert emb.sharding.spec[1] == 'fsdp', emb.sharding  # explicit out shardings kept


def _vit_batch(b=8, p=16, t=6):
  rng = np.random.default_rng(0)
  grid = np.full((b, p), 4, np.int32)
  cap_len = rng.integers(2, t + 1, b)
  return {'patches': rng.normal(size=(b, p, 588)).astype(np.float32),
          'patch_segment_ids': np.ones((b, p), np.int32),
          'patch_rows': np.tile(np.repeat(np.arange(4), 4), (b, 1)).astype(np.int32),
          'patch_cols': np.tile(np.tile(np.arange(4), 4), (b, 1)).astype(np.int32),
          'patch_grid_h': grid, 'patch_grid_w': grid,
          'caption': rng.integers(3, 512, (b, t)).astype(np.int32),
          'caption_mask': (np.arange(t)[None] < cap_len[:, None]).astype(np.int32),
          'source_ids': np.arange(b, dtype=np.int32) % 2}


def test_accumulated_siglip_takes_negatives_from_the_whole_batch(toy):
  """ViT pretraining in 4 microbatches of 2 pairs: the SigLIP term still pairs every image with
  all 8 captions (the task's coupled term, GradCache-style), so loss, SigLIP value, per-source
  caption loss and the updated parameters equal one 8-pair batch's, while a SigLIP per
  microbatch of 2 pairs is a different loss."""
  base = tasks.vit_pretrain_task(base_config('tiny').model, num_patches=16, caption_len=6,
                                 source_names=('a', 'b'))

  def init(rng):   # bias 0 instead of -10: the negatives weigh as much as the positives
    variables = base.init(rng)
    variables['params']['coca']['bias'] = jax.numpy.zeros(())
    return variables

  task = dataclasses.replace(base, init=init)
  tx = optax.sgd(0.5)
  batch = _vit_batch()
  out = {}
  for name, m in (('one', 1), ('gradcache', 4)):
    cfg = step_lib.StepConfig(microbatches=m, grad_clip_norm=0.0)
    mesh, sh, st = toy.setup(task, tx, cfg, devices=2)
    st0 = jax.device_get(st)
    fn = step_lib.jit_train_step(step_lib.make_train_step(task, tx, cfg), sh, batch, mesh)
    st, metrics = fn(st, batch)
    out[name] = (jax.device_get(st.params), float(metrics['loss']), float(metrics['siglip']),
                 *np.asarray(metrics['source_loss']))
  params, loss, sig, *source_loss = out['one']
  # Float32 sums in another order: parameters of size ~10 after the step agree to ~2e-6.
  chex.assert_trees_all_close(out['gradcache'][0], params, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['gradcache'][1:], (loss, sig, *source_loss), rtol=1e-5)
  # The microbatches (rows j, j + 4) on their own: SigLIP over 2 pairs averages elsewhere.
  siglip_of = jax.jit(lambda p, e, b: task.loss(p, e, b, None)[1]['means']['siglip'])
  per_micro = np.mean([float(siglip_of(st0.params, st0.extra, {k: v[j::4] for k, v in
                                                               batch.items()}))
                       for j in range(4)])
  assert abs(per_micro - sig) > 0.1, (per_micro, sig)


def test_nonfinite_step_is_skipped_and_counted(toy):
  tx = optax.adamw(1e-2)
  task = toy.task(poison=True)
  cfg = step_lib.StepConfig()
  mesh, sh, st = toy.setup(task, tx, cfg)
  fn = step_lib.jit_train_step(step_lib.make_train_step(task, tx, cfg), sh, toy.batch(0), mesh)
  st, m = fn(st, toy.batch(0))
  before = jax.device_get(st.params)
  bad = toy.batch(1)
  bad['tokens'][0, 0] = 0  # poisons the loss with NaN
  for k in range(2):
    st, m = fn(st, bad)
    assert int(m['skipped']) == 1 and int(m['nonfinite_run']) == k + 1
  chex.assert_trees_all_equal(jax.device_get(st.params), before)
  chex.assert_tree_all_finite(jax.device_get(st.opt_state))
  st, m = fn(st, toy.batch(2))
  assert int(m['skipped']) == 0 and int(st.nonfinite_run) == 0 and int(st.skipped_total) == 2


def test_frozen_params_do_not_move(toy):
  tx = optax.adamw(1e-2, weight_decay=0.1)
  task = toy.task()
  cfg = step_lib.StepConfig()
  abstract = nn.unbox(jax.eval_shape(task.init, jax.random.PRNGKey(0)))['params']
  trainable = {k: jax.tree.map(lambda _: k == 'lm_head', v) for k, v in abstract.items()}
  mesh, sh, st = toy.setup(task, tx, cfg)
  before = jax.device_get(st.params)
  fn = step_lib.jit_train_step(step_lib.make_train_step(task, tx, cfg, trainable), sh, toy.batch(0), mesh)
  for i in range(2):
    st, _ = fn(st, toy.batch(i))
  after = jax.device_get(st.params)
  chex.assert_trees_all_equal(after['embed'], before['embed'])
  chex.assert_trees_all_equal(after['body'], before['body'])
  assert not np.allclose(after['lm_head']['kernel'], before['lm_head']['kernel'])


def test_bf16_compute_keeps_fp32_master_weights(toy):
  tx = optax.adamw(1e-2)
  task = toy.task()
  cfg = step_lib.StepConfig(param_cast_dtype='bfloat16')
  mesh, sh, st = toy.setup(task, tx, cfg)
  fn = step_lib.jit_train_step(step_lib.make_train_step(task, tx, cfg), sh, toy.batch(0), mesh)
  before = jax.device_get(st.params)
  st, m = fn(st, toy.batch(0))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(st.params))
  assert np.isfinite(float(m['loss'])) and int(m['skipped']) == 0
  assert not np.array_equal(jax.device_get(st.params)['body']['kernel'], before['body']['kernel'])


def _muon_setup(toy, lr, schedule, rate):
  from kimi_vl_jax.config import base_config
  from kimi_vl_jax.optim import build_optimizer
  task = toy.task()
  ocfg = base_config('tiny').optim
  ocfg.update(dict(lr=lr, schedule=schedule, warmup_steps=1))
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0))['params']
  tx = build_optimizer(ocfg, abstract, toy.mesh(), total_steps=6)
  cfg = step_lib.StepConfig(router_bias_rate=rate)
  mesh, sh, st = toy.setup(task, tx, cfg)
  return task, tx, cfg, mesh, sh, st


def test_hparams_step_equals_compiled_in_numbers_and_shares_one_program(toy):
  """With ``step_hparams`` the lr schedule and router rate are arguments: the step gives the
  same results as the one with the numbers compiled in, and stages that differ only in those
  numbers (kind of schedule included) lower to the identical program."""
  runs, programs = [], []
  for lr, schedule, rate in ((1e-2, 'cosine', 0.0), (3e-3, 'linear', 1e-2)):
    task, tx, cfg, mesh, sh, st = _muon_setup(toy, lr, schedule, rate)
    step_fn = step_lib.make_train_step(task, tx, cfg, lr_fn=tx.schedule)
    baked = step_lib.jit_train_step(step_fn, sh, toy.batch(0), mesh)
    data = step_lib.jit_train_step(step_fn, sh, toy.batch(0), mesh, step_lib.step_hparams(tx, cfg))
    programs.append((baked.lower(st, toy.batch(0)).as_text(), data.lower(st, toy.batch(0)).as_text()))
    out = []
    for fn in (baked, data):
      s = jax.tree.map(lambda x: x.copy(), st)
      lrs = []
      for i in range(3):
        s, m = fn(s, toy.batch(i))
        lrs.append(float(m['lr']))
      out.append((jax.device_get(s.params), lrs))
    chex.assert_trees_all_close(out[0], out[1], rtol=1e-6, atol=1e-7)
    assert out[1][1][0] == 0.0 and out[1][1][1] == pytest.approx(lr, rel=1e-6)
  assert programs[0][1] == programs[1][1]      # one program for both stages
  assert programs[0][0] != programs[1][0]      # numbers compiled in: two programs


def test_step_traces_with_more_than_2_31_elements_per_group(toy):
  # Release-scale models have more than 2^31 elements per optimizer group (A3B: ~15.7B under
  # Muon). The update-RMS divisions once took those counts as Python ints, which overflow
  # int32 when traced (OverflowError before any device work). Shapes only: nothing is
  # allocated.
  from kimi_vl_jax.config import base_config
  from kimi_vl_jax.optim import build_optimizer
  task = toy.task(vocab=2 ** 16, width=2 ** 15 + 8)   # embed and lm_head: 2^31 + 2^19 each
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  tx = build_optimizer(base_config('tiny').optim, abstract['params'], total_steps=10)
  counts = {}
  for p in jax.tree.leaves(tx.plan, is_leaf=lambda x: hasattr(x, 'route')):
    counts[p.route.treatment] = counts.get(p.route.treatment, 0) + int(np.prod(p.route.shape))
  assert max(counts.values()) > 2 ** 31, counts
  cfg = step_lib.StepConfig(microbatches=1, grad_clip_norm=1.0)
  step = step_lib.make_train_step(task, tx, cfg)

  def make():
    from kimi_vl_jax.train import state as state_lib
    params, extra = state_lib.split_variables(nn.unbox(task.init(jax.random.PRNGKey(0))))
    return state_lib.create_state(params, extra, tx, jax.random.PRNGKey(1))

  state = jax.eval_shape(make)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), toy.batch(0, b=2, s=4))
  _, metrics = jax.eval_shape(step, state, batch)
  assert metrics['update_rms'].shape == () and metrics['update_rms'].dtype == np.float32
