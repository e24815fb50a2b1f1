"""``python -m kimi_vl_jax.convert``: Kimi-VL checkpoints between Hugging Face and Orbax.

  # HF directory (config.json + safetensors) -> Orbax checkpoint of KimiVL variables
  python -m kimi_vl_jax.convert --to=jax --src=Kimi-VL-A3B-Instruct --dst=ckpt/kimi_vl
  # Orbax checkpoint (or an HF directory, e.g. to change naming/dtype/sharding) -> HF directory
  python -m kimi_vl_jax.convert --to=hf --src=ckpt/kimi_vl --dst=out/Kimi-VL

The Orbax side is a directory with ``variables/`` (a StandardCheckpointer pytree:
{'params': ..., 'router': ...}) and ``model_config.json`` (the model block and the
<|media_pad|> id). HF reading streams layer by layer and refuses pickle ``.bin`` files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from kimi_vl_jax.convert import hf
from kimi_vl_jax.convert.hf_vision import ConversionError

ORBAX_VARIABLES = 'variables'
ORBAX_CONFIG = 'model_config.json'


def save_orbax(directory: str, model_cfg, variables, media_pad_id: int) -> None:
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, ORBAX_VARIABLES), variables, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, ORBAX_CONFIG), 'w') as f:
    json.dump({'model': model_cfg.to_dict(), 'media_pad_id': int(media_pad_id)}, f, indent=2,
              default=list)


def load_orbax(directory: str):
  """-> (model config block, variables as host numpy arrays, media_pad_id)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, ORBAX_CONFIG)
  if not os.path.exists(cfg_path):
    raise ConversionError(f'{directory}: no {ORBAX_CONFIG} (not written by this converter?)')
  with open(cfg_path) as f:
    meta = json.load(f)
  model_cfg = ml_collections.ConfigDict(meta['model'])
  model_cfg.vision.merge_kernel_size = tuple(model_cfg.vision.merge_kernel_size)
  path = os.path.join(directory, ORBAX_VARIABLES)
  ckptr = ocp.PyTreeCheckpointer()
  tree_meta = ckptr.metadata(path)
  tree_meta = getattr(tree_meta, 'item_metadata', tree_meta)
  tree_meta = getattr(tree_meta, 'tree', tree_meta)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta)
  variables = ckptr.restore(path, restore_args=restore_args)
  return model_cfg, variables, int(meta['media_pad_id'])


def _is_hf_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, hf.CONFIG_NAME))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m kimi_vl_jax.convert', description=__doc__.split('\n')[0])
  parser.add_argument('--to', required=True, choices=('jax', 'hf'))
  parser.add_argument('--src', required=True, help='HF directory or Orbax directory')
  parser.add_argument('--dst', required=True)
  parser.add_argument('--param_dtype', default='float32',
                      help="--to=jax: dtype of the saved weights ('keep' = the checkpoint's)")
  parser.add_argument('--no_scan', action='store_true', help='--to=jax: unstacked layers')
  parser.add_argument('--dtype', default='bfloat16', help="--to=hf: tensor dtype ('keep' = as is)")
  parser.add_argument('--packed_experts', action='store_true',
                      help="--to=hf: transformers' packed experts.gate_up_proj instead of per expert")
  parser.add_argument('--vision_naming', default='release', choices=('release', 'kimi_k25'))
  parser.add_argument('--max_shard_gb', type=float, default=4.0)
  args = parser.parse_args(argv)
  t0 = time.time()
  try:
    if not os.path.isdir(args.src):
      raise ConversionError(f'--src={args.src}: not a directory')
    if _is_hf_dir(args.src):
      dtype = None if args.param_dtype == 'keep' else args.param_dtype
      model_cfg, variables = hf.load_hf(args.src, scan_layers=not args.no_scan, param_dtype=dtype)
      media_pad_id = hf.media_pad_id_of(args.src)
    else:
      model_cfg, variables, media_pad_id = load_orbax(args.src)
    if args.to == 'jax':
      save_orbax(args.dst, model_cfg, variables, media_pad_id)
    else:
      hf.save_hf(args.dst, model_cfg, variables, media_pad_id=media_pad_id,
                 dtype=None if args.dtype == 'keep' else args.dtype,
                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                 packed_experts=args.packed_experts, vision_naming=args.vision_naming)
  except (ConversionError, KeyError, ValueError, FileNotFoundError) as e:
    print(f'convert: error: {e}', file=sys.stderr)
    return 2
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables['params']))
  print(f'converted {n:,} parameters {args.src} -> {args.dst} ({args.to}) in {time.time() - t0:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
