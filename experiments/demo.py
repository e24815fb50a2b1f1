"""Demo: the small preset on generated data, on CPU (what `make demo` runs)."""
from kimi_vl_jax.config import base_config


def get_config(arg=None):
  if arg:
    raise ValueError(f'demo takes no :arg, got {arg!r}')
  c = base_config('small')
  c.name = 'demo'
  c.mesh.data = -1
  c.train.global_batch = 8
  c.train.seq_len = 512
  c.train.steps = 200
  return c
