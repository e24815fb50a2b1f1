"""Kimi-VL-A3B at release scale: the released dims (SPEC §2, §3) on a pod mesh.

``arg`` picks the pod mesh: ``v5p-256`` (default, 128 chips: fsdp 16 x expert 8) or
``v5p-64`` (32 chips: fsdp 4 x expert 8).
"""
from kimi_vl_jax.config import base_config

_MESHES = {
    'v5p-256': dict(data=1, fsdp=16, expert=8, tensor=1),
    'v5p-64': dict(data=1, fsdp=4, expert=8, tensor=1),
}


# The ``:arg`` values this file accepts (the golden-config test snapshots each one).
ARGS = tuple(_MESHES)


def get_config(arg=None):
  if arg is not None and arg not in _MESHES:
    raise ValueError(f'unknown pod mesh {arg!r}; choose one of {", ".join(_MESHES)}')
  c = base_config('kimi_vl_a3b')
  c.name = 'kimi_vl_a3b'
  mesh = _MESHES[arg or 'v5p-256']
  for axis, size in mesh.items():
    c.mesh[axis] = size
  c.model.lm.dtype = 'bfloat16'
  c.model.vision.dtype = 'bfloat16'
  c.model.lm.remat_policy = 'save_dots'
  c.model.vision.remat_policy = 'save_dots'
  c.train.global_batch = 1024
  c.train.seq_len = 8192
  c.train.steps = 500_000
  c.optim.lr = 4.2e-4
  c.optim.warmup_steps = 2000
  return c
