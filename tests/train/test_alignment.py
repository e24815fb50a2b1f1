"""Alignment through the real loop (tiny Kimi-VL): the LM does not move, MoonViT and the
projector do; the stage leaves a final checkpoint, metrics, curves and a stage report."""
import os

import jax
import numpy as np

from kimi_vl_jax.config import base_config, validate
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.train import checkpoint as ckpt_lib, loop, stages as stages_lib


def test_alignment_freezes_the_lm(tmp_path):
  c = base_config('tiny')
  c.train.global_batch = 8
  c.train.seq_len = 64
  c.data.sources = 'shapes=generated:shapes@1#mm#qa'
  c.data.max_patches_per_row = 64
  c.data.in_token_limit = 64
  c.metrics.tensorboard = False
  c.optim.warmup_steps = 0
  for name in c.stages:
    c.stages[name].enabled = name == 'alignment'
  c.stages.alignment.steps = 2
  validate(c)
  workdir = str(tmp_path)
  assert loop.run_experiment(c, workdir) == 0

  stage = stages_lib.resolve(c, 'alignment')
  prep = loop.prepare_stage(c, stage, mesh_lib.build_mesh(c.mesh))
  # The state the stage started from, built as the loop built it (its compiled init comes
  # from the run's persistent compilation cache).
  with loop.compilation_cache(c.train.compilation_cache, workdir):
    start, _ = loop._init_state(prep.task, prep.opt, prep.shardings, prep.rng, None)
  init = jax.device_get(start.params)
  ck = ckpt_lib.StageCheckpoints(workdir, 'alignment')
  assert ck.read_meta()['complete']
  final = ck.restore_raw()['params']
  ck.close()
  jax.tree.map(np.testing.assert_array_equal, final['language_model'], init['language_model'])
  moved = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(final['vision_tower'], init['vision_tower'])
  assert moved(final['multi_modal_projector'], init['multi_modal_projector'])
  for f in ('metrics.jsonl', 'curves.png', 'report.md'):
    assert os.path.exists(os.path.join(workdir, 'alignment', f)), f
  assert os.path.exists(os.path.join(workdir, 'report.json'))

  # The generation CLI's path answers about a user's image file from that checkpoint.
  from PIL import Image
  from kimi_vl_jax import generate
  image = str(tmp_path / 'red.png')
  Image.new('RGB', (60, 44), (200, 10, 10)).save(image)
  assert generate.find_stage(workdir) == 'alignment'
  text = generate.answer(workdir, [image, image], 'What color is the shape?', max_new_tokens=3)
  assert isinstance(text, str)
