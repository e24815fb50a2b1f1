"""Kimi-VL Hugging Face directories <-> (model config, KimiVL variables), streamed shard by shard.

A directory holds ``config.json`` (the release's ``kimi_vl`` format: ``vision_config``,
``text_config``, ``media_placeholder_token_id``) and safetensors weights (``model.safetensors``
or shards listed in ``model.safetensors.index.json``) named as in SPEC §3.3:
``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.*``. Loading also accepts
transformers' Kimi_K25 vision naming (``vision_tower.layers.*`` or ``model.vision_tower.*``,
``mm_projector.*``). Pickle checkpoints (``*.bin``, ``*.pt``) are refused: unpickling runs code.

Memory: tensors are read lazily (memory-mapped safetensors), one decoder layer at a time,
and written into preallocated stacked arrays, so loading peaks at about one model copy plus
one layer; saving converts one layer at a time and flushes each shard when it is full.

Variables: ``{'params': {'vision_tower', 'multi_modal_projector', 'language_model'},
'router': {'language_model'}}`` (plain numpy trees; see models/kimi_vl.py).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kimi_vl_jax.config import presets
from kimi_vl_jax.convert import hf_lm, hf_vision
from kimi_vl_jax.convert.hf_vision import ConversionError

CONFIG_NAME = 'config.json'
SINGLE_NAME = 'model.safetensors'
INDEX_NAME = 'model.safetensors.index.json'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.ckpt')
LM_PREFIX = 'language_model.'
VISION_PREFIXES = ('vision_tower.', 'model.vision_tower.')
PROJECTOR_PREFIXES = ('multi_modal_projector.', 'mm_projector.', 'model.mm_projector.')
_VISION_FIELDS = ('patch_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                  'num_attention_heads', 'init_pos_emb_height', 'init_pos_emb_width')


# ----------------------------------------------------------------------------- configs


def model_config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our ``model`` block (lm, vision, projector) from a Kimi-VL config.json dict."""
  for key in ('vision_config', 'text_config'):
    if key not in hf_config:
      raise ConversionError(f'{CONFIG_NAME}: missing {key!r} (not a Kimi-VL config?)')
  vc = dict(hf_config['vision_config'])
  if 'pos_emb_height' in vc:   # transformers Kimi_K25 spelling
    vc.setdefault('init_pos_emb_height', vc['pos_emb_height'])
    vc.setdefault('init_pos_emb_width', vc['pos_emb_width'])
  missing = [k for k in _VISION_FIELDS if k not in vc]
  if missing:
    raise ConversionError(f'{CONFIG_NAME}: vision_config lacks {missing}')
  lm = hf_lm.lm_config_from_hf(hf_config['text_config'])
  vision = presets._vision(**{k: int(vc[k]) for k in _VISION_FIELDS},
                           merge_kernel_size=tuple(vc.get('merge_kernel_size', (2, 2))))
  return ml_collections.ConfigDict(dict(
      name='hf', lm=lm, vision=vision,
      projector=presets._projector(vision.hidden_size, lm.hidden_size,
                                   tuple(vision.merge_kernel_size))))


def hf_config_from_model(model_cfg, media_pad_id: int, dtype: str = 'bfloat16') -> dict:
  """The release-format config.json dict for a model block."""
  text = hf_lm.hf_config_from_lm(model_cfg.lm)
  text.update(model_type='deepseek_v3', topk_method='noaux_tc', scoring_func='sigmoid',
              rope_theta=float(model_cfg.lm.rope_theta), torch_dtype=dtype)
  v = model_cfg.vision
  vision = {k: int(v[k]) for k in _VISION_FIELDS}
  vision.update(model_type='moonvit', merge_kernel_size=list(v.merge_kernel_size))
  return {'architectures': ['KimiVLForConditionalGeneration'], 'model_type': 'kimi_vl',
          'vision_config': vision, 'text_config': text,
          'media_placeholder_token_id': int(media_pad_id), 'ignore_index': -100,
          'pad_token_id': 0, 'torch_dtype': dtype}


# ----------------------------------------------------------------------------- reading


class SafetensorsDir(Mapping):
  """Lazy name -> numpy tensor view over a directory's safetensors file(s)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._files: dict[str, Any] = {}
    index = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, SINGLE_NAME)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ConversionError(f'{index}: no "weight_map" object')
      self._where = dict(weight_map)
    elif os.path.exists(single):
      with safe_open(single, framework='np') as f:
        self._where = {k: SINGLE_NAME for k in f.keys()}
    else:
      pickles = sorted(n for n in os.listdir(directory) if n.endswith(PICKLE_SUFFIXES))
      if pickles:
        raise ConversionError(
            f'{directory}: only pickle checkpoints ({", ".join(pickles[:3])}); refusing to unpickle '
            f'(it can run arbitrary code). Convert them to safetensors first.')
      raise ConversionError(f'{directory}: no {SINGLE_NAME} or {INDEX_NAME}')
    for shard in sorted(set(self._where.values())):
      if not os.path.exists(os.path.join(directory, shard)):
        raise ConversionError(f'{directory}: shard {shard} listed in {INDEX_NAME} is missing')

  def _handle(self, shard: str):
    if shard not in self._files:
      self._files[shard] = safe_open(os.path.join(self.directory, shard), framework='np')
    return self._files[shard]

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(name)
    return self._handle(self._where[name]).get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, name) -> bool:
    return name in self._where


class _Tracked(Mapping):
  """A prefix-stripped view that records which names were read."""

  def __init__(self, base: Mapping, prefix: str):
    self.base, self.prefix, self.used = base, prefix, set()

  def __getitem__(self, name):
    value = self.base[self.prefix + name]
    self.used.add(name)
    return value

  def __contains__(self, name):
    return self.prefix + name in self.base

  def __iter__(self):
    n = len(self.prefix)
    return (k[n:] for k in self.base if k.startswith(self.prefix))

  def __len__(self):
    return sum(1 for _ in iter(self))


def _cast(x, dtype) -> np.ndarray:
  """Casts floating arrays (bfloat16 included) to ``dtype``; others (and dtype None) unchanged."""
  x = np.asarray(x)
  is_float = np.issubdtype(x.dtype, np.floating) or x.dtype.name == 'bfloat16'
  return x.astype(dtype, copy=False) if dtype is not None and is_float else x


def _lm_params_streaming(tensors: Mapping, cfg, dtype) -> dict:
  """MoeLM {'params', 'router'} read one decoder layer at a time (see hf_lm for the layout)."""
  sd = _Tracked(tensors, LM_PREFIX)
  k_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
  sizes = {'dense_layers': k_dense, 'moe_layers': cfg.num_hidden_layers - k_dense}
  groups: dict[str, Any] = {}
  routers: dict[str, Any] = {}
  interleaved = True   # the release stores rope dims as interleaved pairs (hf_lm docs)
  for layer in range(cfg.num_hidden_layers):
    moe = layer >= k_dense
    group, i = ('moe_layers', layer - k_dense) if moe else ('dense_layers', layer)
    try:
      lp, lr = hf_lm._layer_from_hf(sd, f'model.layers.{layer}.', cfg, moe, interleaved)
    except KeyError as e:
      raise ConversionError(f'missing tensor {LM_PREFIX}{e.args[0]}') from None
    lp = jax.tree.map(lambda x: _cast(x, dtype), lp)
    for name, tree, store in (('params', lp, groups), ('router', lr, routers)):
      if tree is None:
        continue
      if cfg.scan_layers:
        if group not in store:
          store[group] = jax.tree.map(lambda x: np.empty((sizes[group],) + x.shape, x.dtype), tree)
        jax.tree.map(lambda buf, x: buf.__setitem__(i, x), store[group], tree)
      else:
        store.setdefault(group, {})[f'layers_{i}'] = jax.tree.map(np.ascontiguousarray, tree)
  try:
    params = {'embed_tokens': {'embedding': _cast(sd['model.embed_tokens.weight'], dtype)},
              'norm': {'scale': _cast(sd['model.norm.weight'], dtype)},
              'lm_head': {'kernel': _cast(sd['lm_head.weight'], dtype).T}}
  except KeyError as e:
    raise ConversionError(f'missing tensor {LM_PREFIX}{e.args[0]}') from None
  wrap = (lambda g: {'layers': g}) if cfg.scan_layers else (lambda g: g)
  params.update({g: wrap(t) for g, t in groups.items()})
  router = {g: wrap(t) for g, t in routers.items()}
  hf_lm._check_shapes(params, cfg)
  left = sorted(set(sd) - sd.used)
  if left:
    raise ConversionError(f'{len(left)} unexpected tensors under {LM_PREFIX!r} (more layers than '
                          f'text_config.num_hidden_layers, or MTP heads?): {left[:6]}')
  return {'params': params, 'router': router}


def _find_prefix(tensors: Mapping, candidates, what: str) -> str:
  for prefix in candidates:
    if any(k.startswith(prefix) for k in tensors):
      return prefix
  raise ConversionError(f'no {what} tensors (looked for prefixes {candidates})')


def load_hf(directory: str, *, scan_layers: bool = True,
            param_dtype: Optional[str] = 'float32') -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a Kimi-VL HF directory -> (model config block, variables of numpy arrays).

  ``param_dtype``: cast floating weights to it (None keeps the checkpoint's dtypes); the MoE
  router bias always stays float32.
  """
  cfg_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise ConversionError(f'{directory}: no {CONFIG_NAME}')
  with open(cfg_path) as f:
    hf_config = json.load(f)
  model_cfg = model_config_from_hf(hf_config)
  model_cfg.lm.scan_layers = scan_layers
  model_cfg.vision.scan_layers = scan_layers
  if param_dtype is not None:
    model_cfg.lm.param_dtype = model_cfg.vision.param_dtype = param_dtype
  dtype = None if param_dtype is None else np.dtype(param_dtype)
  tensors = SafetensorsDir(directory)
  known = (LM_PREFIX,) + VISION_PREFIXES + PROJECTOR_PREFIXES
  stray = sorted(k for k in tensors if not k.startswith(known))
  if stray:
    raise ConversionError(f'{len(stray)} tensors outside vision_tower/multi_modal_projector/'
                          f'language_model: {stray[:6]}')
  vp = _find_prefix(tensors, VISION_PREFIXES, 'vision tower')
  pp = _find_prefix(tensors, PROJECTOR_PREFIXES, 'projector')
  cast = lambda t: jax.tree.map(lambda x: _cast(x, dtype), t)  # noqa: E731
  vision = cast(hf_vision.vision_from_hf(tensors, model_cfg.vision, prefix=vp))
  projector = cast(hf_vision.projector_from_hf(tensors, model_cfg.projector, prefix=pp))
  lm = _lm_params_streaming(tensors, model_cfg.lm, dtype)
  variables = {'params': {'vision_tower': vision, 'multi_modal_projector': projector,
                          'language_model': lm['params']},
               'router': {'language_model': lm['router']}}
  return model_cfg, variables


def media_pad_id_of(directory: str) -> int:
  with open(os.path.join(directory, CONFIG_NAME)) as f:
    return int(json.load(f).get('media_placeholder_token_id', 163605))


# ----------------------------------------------------------------------------- writing


def _lm_layer_tensors(lm_vars: Mapping, cfg, layer: int, packed_experts: bool) -> dict:
  """HF tensors of one decoder layer (hf_lm's exporter on a one-layer view, no big copies)."""
  k_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
  moe = layer >= k_dense
  group, i = ('moe_layers', layer - k_dense) if moe else ('dense_layers', layer)
  params, router = lm_vars['params'], lm_vars.get('router', {})
  take = ((lambda g: {'layers': jax.tree.map(lambda x: np.asarray(x)[i:i + 1], g['layers'])})
          if cfg.scan_layers else (lambda g: {'layers_0': g[f'layers_{i}']}))
  tiny = np.zeros((1, 1), np.float32)   # embed/norm/lm_head are exported separately
  one = {'params': {'embed_tokens': {'embedding': tiny}, 'norm': {'scale': tiny[0]},
                    'lm_head': {'kernel': tiny}, group: take(params[group])},
         'router': {group: take(router[group])} if moe else {}}
  one_cfg = ml_collections.ConfigDict(copy.deepcopy(cfg.to_dict()))
  one_cfg.num_hidden_layers = 1
  one_cfg.first_k_dense_replace = 0 if moe else 1
  sd = hf_lm.hf_from_params(one, one_cfg, packed_experts=packed_experts)
  out = {}
  for k, v in sd.items():
    if k.startswith('model.layers.0.'):
      out[f'{LM_PREFIX}model.layers.{layer}.' + k[len('model.layers.0.'):]] = v
  return out


def iter_hf_tensors(model_cfg, variables: Mapping, *, packed_experts: bool = False,
                    vision_naming: str = 'release') -> Iterator[tuple[str, np.ndarray]]:
  """(name, tensor) of the whole model in checkpoint order, converted lazily per layer."""
  params = variables['params']
  vprefix = 'vision_tower.'
  pprefix = 'multi_modal_projector.' if vision_naming == 'release' else 'mm_projector.'
  yield from hf_vision.vision_to_hf(params['vision_tower'], model_cfg.vision, vision_naming,
                                    vprefix).items()
  yield from hf_vision.projector_to_hf(params['multi_modal_projector'], model_cfg.projector,
                                       vision_naming, pprefix).items()
  lm_params = params['language_model']
  lm_vars = {'params': lm_params, 'router': variables.get('router', {}).get('language_model', {})}
  yield f'{LM_PREFIX}model.embed_tokens.weight', np.asarray(lm_params['embed_tokens']['embedding'])
  for layer in range(model_cfg.lm.num_hidden_layers):
    yield from _lm_layer_tensors(lm_vars, model_cfg.lm, layer, packed_experts).items()
  yield f'{LM_PREFIX}model.norm.weight', np.asarray(lm_params['norm']['scale'])
  yield f'{LM_PREFIX}lm_head.weight', np.ascontiguousarray(np.asarray(lm_params['lm_head']['kernel']).T)


def save_hf(directory: str, model_cfg, variables: Mapping, *, media_pad_id: int,
            dtype: Optional[str] = 'bfloat16', max_shard_bytes: int = 4 << 30,
            packed_experts: bool = False, vision_naming: str = 'release') -> list[str]:
  """Writes config.json + safetensors shards (+ index); returns the shard file names.

  ``dtype``: floating tensors are cast to it (None keeps the variables' dtypes); the router
  bias ``e_score_correction_bias`` stays float32 as in the release.
  """
  os.makedirs(directory, exist_ok=True)
  target = None if dtype is None else np.dtype(dtype)
  tmp_names, weight_map, shard, shard_bytes, total = [], {}, {}, 0, 0

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      name = f'tmp-{len(tmp_names):05d}.safetensors'
      save_file(shard, os.path.join(directory, name), metadata={'format': 'pt'})
      tmp_names.append(name)
      shard, shard_bytes = {}, 0

  for name, x in iter_hf_tensors(model_cfg, variables, packed_experts=packed_experts,
                                 vision_naming=vision_naming):
    if target is not None and not name.endswith('e_score_correction_bias'):
      x = _cast(x, target)
    x = np.ascontiguousarray(x)
    if shard and shard_bytes + x.nbytes > max_shard_bytes:
      flush()
    shard[name] = x
    weight_map[name] = len(tmp_names)
    shard_bytes += x.nbytes
    total += x.nbytes
  flush()
  n = len(tmp_names)
  final = [SINGLE_NAME] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
  for tmp, fin in zip(tmp_names, final):
    os.replace(os.path.join(directory, tmp), os.path.join(directory, fin))
  if n > 1:
    with open(os.path.join(directory, INDEX_NAME), 'w') as f:
      json.dump({'metadata': {'total_size': total},
                 'weight_map': {k: final[v] for k, v in weight_map.items()}}, f, indent=2)
  hf_config = hf_config_from_model(model_cfg, media_pad_id, dtype or 'float32')
  with open(os.path.join(directory, CONFIG_NAME), 'w') as f:
    json.dump(hf_config, f, indent=2)
  return final
