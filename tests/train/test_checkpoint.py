"""Checkpoints: round trip, restore onto a different mesh (8 -> 4 devices), keep-last-N,
an interrupted (uncommitted) write is never restored."""
import os

import chex
import jax
import optax

from kimi_vl_jax.train import checkpoint as ckpt_lib, step as step_lib


def test_restore_on_smaller_mesh_and_keep_last(toy, tmp_path):
  tx = optax.adamw(1e-2)
  task = toy.task()
  cfg = step_lib.StepConfig()
  mesh8, sh8, st = toy.setup(task, tx, cfg, devices=8)
  fn = step_lib.jit_train_step(step_lib.make_train_step(task, tx, cfg), sh8, toy.batch(0), mesh8)
  ck = ckpt_lib.StageCheckpoints(str(tmp_path), 'joint', keep=2)
  for i in range(3):
    st, _ = fn(st, toy.batch(i))
    ck.save(i + 1, st, {'stage': 'joint', 'step': i + 1, 'tokens_seen': 64 * (i + 1)})
  ck.wait()
  assert sorted(ck.manager.all_steps()) == [2, 3]

  mesh4, sh4, fresh = toy.setup(task, tx, cfg, devices=4)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), fresh, sh4)
  restored, meta, data = ckpt_lib.StageCheckpoints(str(tmp_path), 'joint').restore(abstract)
  assert meta['step'] == 3 and meta['tokens_seen'] == 192 and data is None
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(st))
  leaf = restored.params['embed']['embedding']
  assert len(leaf.sharding.mesh.devices.flatten()) == 4
  ck.close()


def test_uncommitted_write_is_ignored(toy, tmp_path):
  tx = optax.sgd(0.1)
  task = toy.task()
  _, _, st = toy.setup(task, tx, step_lib.StepConfig(), devices=8)
  ck = ckpt_lib.StageCheckpoints(str(tmp_path), 's', keep=3, async_save=False)
  ck.save(1, st, {'step': 1})
  ck.wait()
  # What a kill -9 mid-write leaves: a step directory that was never committed (renamed).
  os.makedirs(os.path.join(ck.directory, '2.orbax-checkpoint-tmp-123', 'state'))
  ck2 = ckpt_lib.StageCheckpoints(str(tmp_path), 's', keep=3)
  assert ck2.latest_step() == 1
  assert ck2.read_meta()['step'] == 1
