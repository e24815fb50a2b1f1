"""The experiment schema: every key an experiment may set, with its default.

Experiment files (``experiments/*.py``) start from ``base_config(preset)`` and override
values; ``validate`` rejects any key that is not in this schema, so a typo in an
experiment or a ``--config.x.y=`` override is an error, not a silently ignored setting.
"""
from __future__ import annotations

import ml_collections

from kimi_vl_jax.config import presets


def base_config(preset: str = 'small') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'experiment'
  c.model = presets.get_preset(preset)

  # Mesh axis sizes; -1 takes the devices the other axes leave (at most one -1).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))

  c.train = ml_collections.ConfigDict(dict(
      seed=0,
      global_batch=8,          # sequences per step, over all processes
      seq_len=256,             # tokens per packed row
      steps=10,
      microbatches=1,          # gradient accumulation
      grad_clip_norm=1.0,      # 0 = off
      max_consecutive_nonfinite=3,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name='muon',             # muon | adamw
      lr=4.2e-4,
      end_lr_ratio=0.1,        # cosine floor as a fraction of lr (4.2e-5 / 4.2e-4)
      warmup_steps=2,
      schedule='cosine',       # cosine | linear | constant
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      momentum=0.95,
      ns_steps=5,
      ns_dtype='float32',      # float32 | bfloat16
  ))

  c.metrics = ml_collections.ConfigDict(dict(
      log_every=1,
      tensorboard=True,
      progress=True,
  ))
  return c
