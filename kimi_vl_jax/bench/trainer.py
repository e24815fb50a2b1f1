"""Trainer overhead: step time through the full loop vs the bare jitted step on the same batches.

    python -m kimi_vl_jax.bench.trainer [--steps=24] [--warmup=4] [--checkpoint_every=8]

One Kimi-VL joint-pretraining stage of the small preset on generated data (images + text).
- bare: the stage's jitted step over pre-built, pre-placed batches, dispatched back to back and
  blocked once at the end (what the device alone needs), timed before and after the loop run
  (the mean is reported, so a drifting machine load biases neither side);
- loop: ``loop.run_stage`` (data built on a background thread, global batch assembly, metrics
  fetched and written every step as JSONL + TensorBoard, async Orbax checkpoint every K steps),
  timed from the metrics records' wall-clock stamps over the steps after warm-up.
Both run the same batches (the source is a pure function of the step) in one process.
The last line is one JSON object: loop_step_s, bare_step_s, overhead (= loop / bare - 1).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

_STEPS = flags.DEFINE_integer('steps', 24, 'Steps timed in each mode (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 4, 'Untimed steps first (compile, caches).')
_CKPT = flags.DEFINE_integer('checkpoint_every', 8, 'Async checkpoint interval in the loop.')
_PRESET = flags.DEFINE_string('preset', 'small', 'Model preset.')
_BATCH = flags.DEFINE_integer('global_batch', 8, 'Rows per step.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per row.')


def bench_config(preset: str, steps: int, checkpoint_every: int, global_batch: int, seq_len: int):
  from kimi_vl_jax.config import base_config
  c = base_config(preset)
  c.train.global_batch = global_batch
  c.train.seq_len = seq_len
  c.train.checkpoint_every = checkpoint_every
  c.train.keep_checkpoints = 2
  c.data.sources = ('text=generated:text@1#text;shapes=generated:shapes@2#mm#qa;'
                    'ocr=generated:ocr@1#mm#qa')
  c.data.max_patches_per_row = 256
  c.data.in_token_limit = 256
  c.metrics.log_every = 1
  c.metrics.progress = False
  for name in c.stages:
    c.stages[name].enabled = name == 'joint_pretrain'
  c.stages.joint_pretrain.steps = steps
  c.stages.joint_pretrain.text_only_fraction = 0.0
  c.stages.joint_pretrain.multimodal_share_start = 0.5
  c.stages.joint_pretrain.multimodal_share_end = 0.5
  return c


def main(argv):
  del argv
  import jax
  from kimi_vl_jax.metrics.writer import read_jsonl
  from kimi_vl_jax.parallel import mesh as mesh_lib, sharding as shard_lib
  from kimi_vl_jax.train import loop, stages as stages_lib

  warm, n = _WARMUP.value, _STEPS.value
  total = warm + n
  config = bench_config(_PRESET.value, total, _CKPT.value, _BATCH.value, _SEQ.value)
  mesh = mesh_lib.build_mesh(config.mesh)
  stage = stages_lib.resolve(config, 'joint_pretrain')

  # Bare: the same batches, built and placed before timing.
  prep = loop.prepare_stage(config, stage, mesh)
  batches = [shard_lib.make_global_batch(prep.source.next(), mesh) for _ in range(total)]
  st, _ = loop._init_state(prep.task, prep.opt, prep.shardings, prep.rng, None)
  for b in batches[:warm]:
    st, m = prep.jitted(st, b)
  jax.block_until_ready((st, m))

  def time_bare(st):
    t0 = time.perf_counter()
    for b in batches[warm:]:
      st, m = prep.jitted(st, b)
    jax.block_until_ready((st, m))
    return (time.perf_counter() - t0) / n, st

  bare_before, st = time_bare(st)

  # Loop: everything a real stage does.
  with tempfile.TemporaryDirectory() as workdir:
    with loop._Preemption() as preempt:
      loop.run_stage(config, stage, workdir, mesh, None, preempt, evaluator=None)
    rows = [r for r in read_jsonl(os.path.join(workdir, 'joint_pretrain', 'metrics.jsonl'))
            if 'loss' in r]
    times = {r['step']: r['time'] for r in rows}
    loop_step = (times[total] - times[warm]) / n
  # Bare again after the loop: on a shared machine the load drifts, so the loop is compared
  # with the mean of the bare timings on either side of it.
  bare_after, st = time_bare(st)
  bare = (bare_before + bare_after) / 2
  result = {'loop_step_s': round(loop_step, 5), 'bare_step_s': round(bare, 5),
            'overhead': round(loop_step / bare - 1.0, 4),
            'bare_before_s': round(bare_before, 5), 'bare_after_s': round(bare_after, 5), 'steps': n, 'warmup': warm,
            'checkpoint_every': _CKPT.value, 'preset': _PRESET.value,
            'global_batch': _BATCH.value, 'seq_len': _SEQ.value,
            'devices': jax.device_count(), 'platform': jax.devices()[0].platform}
  print(f'bare jitted step: {bare * 1e3:.1f} ms   full loop step: {loop_step * 1e3:.1f} ms   '
        f'overhead: {100 * (loop_step / bare - 1):.1f}%')
  print(json.dumps(result))


if __name__ == '__main__':
  from kimi_vl_jax import cpu_runtime
  print('cpu runtime:', cpu_runtime.setup())   # before the first computation, as main.py does
  app.run(main)
