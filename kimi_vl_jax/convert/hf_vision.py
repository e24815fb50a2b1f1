"""MoonViT + projector weights <-> Hugging Face tensors (SPEC §2.6, §3.3), both directions.

Two HF namings are understood (torch Linear weights are (out, in); Flax kernels (in, out)):

release (``moonshotai/Kimi-VL-A3B-*``), prefix ``vision_tower.`` / ``multi_modal_projector.``:
  patch_embed.proj.{weight (D,3,p,p), bias}, patch_embed.pos_emb.weight (H0,W0,D),
  encoder.blocks.{i}.{norm0,norm1}.{weight,bias}, encoder.blocks.{i}.wqkv.{weight (3D,D), bias},
  encoder.blocks.{i}.wo.*, encoder.blocks.{i}.mlp.{fc0,fc1}.*, encoder.final_layernorm.*;
  projector pre_norm.*, linear_1.*, linear_2.*.
  The fused wqkv rows are q|k|v with interleaved-pair RoPE dims: exactly this model's layout.

kimi_k25 (transformers ``Kimi_K25VisionModel`` / ``Kimi_K25MultimodalProjection``):
  patch_embed.proj.*, patch_embed.pos_emb.position_embeddings, layers.{i}.{norm1,norm2}.*,
  layers.{i}.attn.{q_proj,k_proj,v_proj,proj}.*, layers.{i}.mlp.{fc1,fc2}.*, final_layernorm.*;
  projector pre_norm.*, in_proj.*, out_proj.*.
  Its RoPE is rotate_half: within each head, dim m pairs with m + hd/2. Our pair (2m, 2m+1)
  is its pair (m, m + hd/2), so q/k rows (and biases) are permuted per head:
  ours[2m] = theirs[m], ours[2m+1] = theirs[m + hd/2]  (transformers' PermuteForRope).

Conversion only reshapes, transposes and permutes: dtypes are kept and a round trip is
bit-exact. Params are plain nested dicts of numpy arrays (no logical-partitioning boxes),
laid out as ``MoonViT``/``Projector`` create them (scanned blocks stacked on axis 0, or
``blocks_{i}`` when ``scan_layers`` is off).
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

NAMINGS = ('release', 'kimi_k25')
RELEASE_VISION_PREFIX = 'vision_tower.'
RELEASE_PROJECTOR_PREFIX = 'multi_modal_projector.'

# Per-block names: ours -> (release, kimi_k25).
_BLOCK_LINEAR = {'wo': ('wo', 'attn.proj'), 'fc0': ('mlp.fc0', 'mlp.fc1'),
                 'fc1': ('mlp.fc1', 'mlp.fc2')}
_BLOCK_NORM = {'norm0': ('norm0', 'norm1'), 'norm1': ('norm1', 'norm2')}


class ConversionError(ValueError):
  """A checkpoint does not match the expected names or shapes; the message names the tensor."""


def _naming_index(naming: str) -> int:
  if naming not in NAMINGS:
    raise ConversionError(f'unknown naming {naming!r}; choose one of {NAMINGS}')
  return NAMINGS.index(naming)


def detect_vision_naming(tensors: Mapping[str, object], prefix: str) -> str:
  if f'{prefix}encoder.blocks.0.wqkv.weight' in tensors:
    return 'release'
  if f'{prefix}layers.0.attn.q_proj.weight' in tensors:
    return 'kimi_k25'
  sample = sorted(k for k in tensors if k.startswith(prefix))[:5]
  raise ConversionError(
      f'no MoonViT tensors under prefix {prefix!r} (looked for {prefix}encoder.blocks.0.wqkv.weight '
      f'and {prefix}layers.0.attn.q_proj.weight); keys there: {sample}')


class _Reader:
  """Takes tensors by name, checking shapes, and remembers which names were used."""

  def __init__(self, tensors: Mapping[str, object]):
    self.tensors = tensors
    self.used: set[str] = set()

  def __call__(self, name: str, shape: tuple) -> np.ndarray:
    if name not in self.tensors:
      raise ConversionError(f'missing tensor {name!r} (expected shape {shape})')
    x = np.asarray(self.tensors[name])
    if tuple(x.shape) != tuple(shape):
      raise ConversionError(f'tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)}')
    self.used.add(name)
    return x

  def check_all_used(self, prefix: str):
    left = sorted(k for k in self.tensors if k.startswith(prefix) and k not in self.used)
    if left:
      raise ConversionError(f'{len(left)} unexpected tensors under {prefix!r}: {left[:8]}')


def rope_rows_from_halves(w: np.ndarray, heads: int) -> np.ndarray:
  """rotate_half row order -> interleaved-pair row order, per head (axis 0 = heads*hd)."""
  hd = w.shape[0] // heads
  return w.reshape(heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_rows_to_halves(w: np.ndarray, heads: int) -> np.ndarray:
  """Interleaved-pair row order -> rotate_half row order (inverse of rope_rows_from_halves)."""
  hd = w.shape[0] // heads
  return w.reshape(heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _block_from_hf(read: _Reader, base: str, naming: int, cfg) -> dict:
  d, m, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
  block = {}
  for ours, names in _BLOCK_NORM.items():
    block[ours] = {'scale': read(f'{base}{names[naming]}.weight', (d,)),
                   'bias': read(f'{base}{names[naming]}.bias', (d,))}
  if naming == 0:
    w = read(f'{base}wqkv.weight', (3 * d, d))
    b = read(f'{base}wqkv.bias', (3 * d,))
  else:
    ws, bs = [], []
    for part in ('q', 'k', 'v'):
      wp = read(f'{base}attn.{part}_proj.weight', (d, d))
      bp = read(f'{base}attn.{part}_proj.bias', (d,))
      if part != 'v':
        wp, bp = rope_rows_from_halves(wp, heads), rope_rows_from_halves(bp, heads)
      ws.append(wp)
      bs.append(bp)
    w, b = np.concatenate(ws, 0), np.concatenate(bs, 0)
  block['wqkv'] = {'kernel': w.T, 'bias': b}
  shapes = {'wo': (d, d), 'fc0': (m, d), 'fc1': (d, m)}
  for ours, names in _BLOCK_LINEAR.items():
    w = read(f'{base}{names[naming]}.weight', shapes[ours])
    block[ours] = {'kernel': w.T, 'bias': read(f'{base}{names[naming]}.bias', (shapes[ours][0],))}
  return block


def vision_from_hf(tensors: Mapping[str, object], config,
                   prefix: str = RELEASE_VISION_PREFIX) -> dict:
  """MoonViT params from HF tensors (either naming, detected). ``config``: model.vision block."""
  naming = _naming_index(detect_vision_naming(tensors, prefix))
  read = _Reader(tensors)
  d, p, c = config.hidden_size, config.patch_size, config.num_channels
  params = {}
  w = read(f'{prefix}patch_embed.proj.weight', (d, c, p, p))
  params['patch_embed'] = {'kernel': w.reshape(d, c * p * p).T,
                           'bias': read(f'{prefix}patch_embed.proj.bias', (d,))}
  pos_name = 'weight' if naming == 0 else 'position_embeddings'
  params['pos_emb'] = read(f'{prefix}patch_embed.pos_emb.{pos_name}',
                           (config.init_pos_emb_height, config.init_pos_emb_width, d))
  block_base = f'{prefix}encoder.blocks.' if naming == 0 else f'{prefix}layers.'
  blocks = [_block_from_hf(read, f'{block_base}{i}.', naming, config)
            for i in range(config.num_hidden_layers)]
  if config.scan_layers:
    params['blocks'] = {'block': jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  else:
    for i, blk in enumerate(blocks):
      params[f'blocks_{i}'] = {'block': blk}
  final = f'{prefix}encoder.final_layernorm' if naming == 0 else f'{prefix}final_layernorm'
  params['final_layernorm'] = {'scale': read(f'{final}.weight', (d,)),
                               'bias': read(f'{final}.bias', (d,))}
  read.check_all_used(prefix)
  return params


def vision_to_hf(params: Mapping, config, naming: str = 'release',
                 prefix: str = RELEASE_VISION_PREFIX) -> dict[str, np.ndarray]:
  """HF tensors of MoonViT params, in the given naming (inverse of vision_from_hf)."""
  nidx = _naming_index(naming)
  d, p, c, heads = config.hidden_size, config.patch_size, config.num_channels, config.num_attention_heads
  out: dict[str, np.ndarray] = {}
  pe = params['patch_embed']
  out[f'{prefix}patch_embed.proj.weight'] = np.asarray(pe['kernel']).T.reshape(d, c, p, p)
  out[f'{prefix}patch_embed.proj.bias'] = np.asarray(pe['bias'])
  pos_name = 'weight' if nidx == 0 else 'position_embeddings'
  out[f'{prefix}patch_embed.pos_emb.{pos_name}'] = np.asarray(params['pos_emb'])
  block_base = f'{prefix}encoder.blocks.' if nidx == 0 else f'{prefix}layers.'
  for i in range(config.num_hidden_layers):
    if config.scan_layers:
      blk = jax.tree.map(lambda x: np.asarray(x)[i], params['blocks']['block'])
    else:
      blk = params[f'blocks_{i}']['block']
    base = f'{block_base}{i}.'
    for ours, names in _BLOCK_NORM.items():
      out[f'{base}{names[nidx]}.weight'] = np.asarray(blk[ours]['scale'])
      out[f'{base}{names[nidx]}.bias'] = np.asarray(blk[ours]['bias'])
    w = np.asarray(blk['wqkv']['kernel']).T
    b = np.asarray(blk['wqkv']['bias'])
    if nidx == 0:
      out[f'{base}wqkv.weight'], out[f'{base}wqkv.bias'] = w, b
    else:
      for j, part in enumerate(('q', 'k', 'v')):
        wp, bp = w[j * d:(j + 1) * d], b[j * d:(j + 1) * d]
        if part != 'v':
          wp, bp = rope_rows_to_halves(wp, heads), rope_rows_to_halves(bp, heads)
        out[f'{base}attn.{part}_proj.weight'] = wp
        out[f'{base}attn.{part}_proj.bias'] = bp
    for ours, names in _BLOCK_LINEAR.items():
      out[f'{base}{names[nidx]}.weight'] = np.asarray(blk[ours]['kernel']).T
      out[f'{base}{names[nidx]}.bias'] = np.asarray(blk[ours]['bias'])
  final = f'{prefix}encoder.final_layernorm' if nidx == 0 else f'{prefix}final_layernorm'
  out[f'{final}.weight'] = np.asarray(params['final_layernorm']['scale'])
  out[f'{final}.bias'] = np.asarray(params['final_layernorm']['bias'])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


_PROJ_LINEAR = {'linear_1': ('linear_1', 'in_proj'), 'linear_2': ('linear_2', 'out_proj')}


def detect_projector_naming(tensors: Mapping[str, object], prefix: str) -> str:
  if f'{prefix}linear_1.weight' in tensors:
    return 'release'
  if f'{prefix}in_proj.weight' in tensors:
    return 'kimi_k25'
  raise ConversionError(f'no projector tensors under prefix {prefix!r} (looked for '
                        f'{prefix}linear_1.weight and {prefix}in_proj.weight)')


def projector_from_hf(tensors: Mapping[str, object], config,
                      prefix: str = RELEASE_PROJECTOR_PREFIX) -> dict:
  """Projector params from HF tensors (either naming). ``config``: model.projector block."""
  nidx = _naming_index(detect_projector_naming(tensors, prefix))
  read = _Reader(tensors)
  d, m, o = config.input_size, config.merged_size, config.output_size
  params = {'pre_norm': {'scale': read(f'{prefix}pre_norm.weight', (d,)),
                         'bias': read(f'{prefix}pre_norm.bias', (d,))}}
  for ours, names in _PROJ_LINEAR.items():
    shape = (m, m) if ours == 'linear_1' else (o, m)
    params[ours] = {'kernel': read(f'{prefix}{names[nidx]}.weight', shape).T,
                    'bias': read(f'{prefix}{names[nidx]}.bias', (shape[0],))}
  read.check_all_used(prefix)
  return params


def projector_to_hf(params: Mapping, config, naming: str = 'release',
                    prefix: str = RELEASE_PROJECTOR_PREFIX) -> dict[str, np.ndarray]:
  """HF tensors of projector params (inverse of projector_from_hf)."""
  nidx = _naming_index(naming)
  out = {f'{prefix}pre_norm.weight': np.asarray(params['pre_norm']['scale']),
         f'{prefix}pre_norm.bias': np.asarray(params['pre_norm']['bias'])}
  for ours, names in _PROJ_LINEAR.items():
    out[f'{prefix}{names[nidx]}.weight'] = np.asarray(params[ours]['kernel']).T
    out[f'{prefix}{names[nidx]}.bias'] = np.asarray(params[ours]['bias'])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
