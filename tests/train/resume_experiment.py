"""A tiny text-only experiment for the trainer's subprocess tests (exact resume, SIGTERM).

``arg``: '<steps>,<checkpoint_every>'.
"""
from kimi_vl_jax.config import base_config


def get_config(arg='8,4'):
  steps, every = (int(x) for x in arg.split(','))
  c = base_config('tiny')
  c.name = 'resume_test'
  c.train.global_batch = 8
  c.train.seq_len = 64
  c.train.checkpoint_every = every
  c.train.async_checkpoints = True
  c.optim.warmup_steps = 1
  c.data.sources = 'text=generated:text@1;math=generated:math@1'
  c.data.max_patches_per_row = 0
  c.metrics.tensorboard = False
  for name in c.stages:
    c.stages[name].enabled = False
  c.stages.joint_pretrain.enabled = True
  c.stages.joint_pretrain.task = 'lm'
  c.stages.joint_pretrain.steps = steps
  return c
