"""Data-pipeline benchmark: pipeline throughput next to the train step's consumption rate.

``python -m kimi_vl_jax.bench.data`` (small preset, the default mix of generated datasets): the grain
pipeline with ``--workers`` spawned worker processes produces packed batches
(``global_batch`` rows of ``seq_len`` tokens, ``data.max_patches_per_row`` patch slots); we time
``--batches`` batches after ``--warmup`` and count examples and real image patches (read-ahead
is bounded by ``data.worker_buffer`` per worker, a few examples, so the timed window measures
production, not a drained buffer). Then the
consumption side: the small preset's Kimi-VL forward+backward+SGD update (``train.tasks``'s
``kimi_vl`` task; the ``lm`` task if the Kimi-VL model is unavailable) on a batch of exactly
that shape, compiled once, timed over ``--train_steps``. Both run in this one process, one
after the other, on the same machine.

headroom = pipeline examples/s / train examples/s (target >= 3). The last line is JSON with
``examples_per_s``, ``patches_per_s``, ``train_examples_per_s``, ``headroom``.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

flags.DEFINE_integer('workers', 2, 'grain worker processes')
flags.DEFINE_integer('batches', 24, 'timed pipeline batches (>> the few buffered examples)')
flags.DEFINE_integer('warmup', 2, 'untimed pipeline batches (worker start-up)')
flags.DEFINE_integer('train_steps', 4, 'timed train steps')
flags.DEFINE_string('preset', 'small', 'model preset')
flags.DEFINE_string('sources', '', 'data.sources of the mix (default: config.data.sources, the '
                    'generated datasets)')
flags.DEFINE_integer('seq_len', 0, 'tokens per row (0 = config default)')
flags.DEFINE_integer('global_batch', 0, 'rows per batch (0 = config default)')
FLAGS = flags.FLAGS


def _config():
  from kimi_vl_jax.config import base
  c = base.base_config(FLAGS.preset)
  if FLAGS.sources:
    c.data.sources = FLAGS.sources
  c.data.workers = FLAGS.workers
  if FLAGS.seq_len:
    c.train.seq_len = FLAGS.seq_len
  if FLAGS.global_batch:
    c.train.global_batch = FLAGS.global_batch
  return c


def measure_pipeline(cfg) -> tuple[dict, dict]:
  """Times the pipeline; returns (rates, one batch for the train-step stand-in)."""
  from kimi_vl_jax.data import pipeline
  t_start = time.perf_counter()
  ds = pipeline.build_dataset(cfg, process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(FLAGS.warmup):
    batch = next(it)
  startup = time.perf_counter() - t_start
  examples = patches = tokens = 0
  t0 = time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(it)
    examples += int(((batch['positions'] == 0) & (batch['segment_ids'] > 0)).sum())
    patches += int((batch['patch_segment_ids'] > 0).sum()) if 'patch_segment_ids' in batch else 0
    tokens += int((batch['segment_ids'] > 0).sum())
  dt = time.perf_counter() - t0
  report = it.report()
  it.close()
  return ({'examples_per_s': examples / dt, 'patches_per_s': patches / dt,
           'batches_per_s': FLAGS.batches / dt, 'tokens_per_s': tokens / dt,
           'examples_per_batch': examples / FLAGS.batches, 'startup_s': startup,
           'report': report}, batch)


def measure_train(cfg, batch: dict) -> dict:
  """Steps/s of forward+backward+update of the small preset on ``batch``'s shape."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from kimi_vl_jax.data import special_tokens as st
  from kimi_vl_jax.data import tokenizer as tokenizer_lib
  from kimi_vl_jax.train import tasks
  names = [s.split('=')[0] for s in cfg.data.sources.split(';')]
  media_pad = tokenizer_lib.load_or_train('', cfg.model.lm.vocab_size).token_id(st.MEDIA_PAD)
  try:
    task, kind = tasks.kimi_vl_task(cfg.model, cfg.train, names, media_pad), 'kimi_vl'
    variables = nn.unbox(task.init(jax.random.PRNGKey(0)))
  except ImportError:
    task, kind = tasks.lm_task(cfg.model, cfg.train, names), 'lm'
    batch = {k: batch[k] for k in tasks.LM_KEYS}
    variables = nn.unbox(task.init(jax.random.PRNGKey(0)))
  params = variables['params']
  extra = {k: v for k, v in variables.items() if k != 'params'}

  @jax.jit
  def step(params, batch):
    (obj, _), grads = jax.value_and_grad(lambda p: task.loss(p, extra, batch, None),
                                         has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 1e-4 * g, params, grads), obj

  dev_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params, obj = step(params, dev_batch)        # compile
  jax.block_until_ready(obj)
  t0 = time.perf_counter()
  for _ in range(FLAGS.train_steps):
    params, obj = step(params, dev_batch)
  jax.block_until_ready(obj)
  dt = time.perf_counter() - t0
  return {'train_task': kind, 'train_steps_per_s': FLAGS.train_steps / dt}


def main(argv):
  del argv
  cfg = _config()
  pipe, batch = measure_pipeline(cfg)
  train = measure_train(cfg, batch)
  # The train step consumes whole batches: examples/s = steps/s x examples per batch.
  train_examples = train['train_steps_per_s'] * pipe['examples_per_batch']
  out = {
      'examples_per_s': round(pipe['examples_per_s'], 2),
      'patches_per_s': round(pipe['patches_per_s'], 1),
      'tokens_per_s': round(pipe['tokens_per_s'], 1),
      'batches_per_s': round(pipe['batches_per_s'], 3),
      'train_steps_per_s': round(train['train_steps_per_s'], 3),
      'train_examples_per_s': round(train_examples, 2),
      'headroom': round(pipe['batches_per_s'] / train['train_steps_per_s'], 2),
      'train_task': train['train_task'],
      'workers': FLAGS.workers, 'batch_shape': list(batch['tokens'].shape),
      'patch_slots': int(batch['patches'].shape[1]) if 'patches' in batch else 0,
      'examples_per_batch': round(pipe['examples_per_batch'], 2),
      'pipeline_startup_s': round(pipe['startup_s'], 2),
      'cpu_count': os.cpu_count(),
  }
  print('realized mix / skips:', json.dumps(pipe['report']))
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
