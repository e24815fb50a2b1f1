"""``validate(config)``: turn config mistakes into one-line errors before anything compiles.

Every error is a ``ConfigError`` whose message starts with the dotted key at fault
(``config.model.lm.num_attention_heads: ...``).
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Optional

import ml_collections

from kimi_vl_jax.config import base

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


class ConfigError(ValueError):
  """A mistake in an experiment config; the message names the key."""


def _fail(key: str, msg: str):
  raise ConfigError(f'config.{key}: {msg}')


def _check_keys(cfg: Any, schema: Any, prefix: str):
  """Every key of cfg must exist in schema (recursively, for ConfigDict values)."""
  if not isinstance(cfg, ml_collections.ConfigDict) or not isinstance(schema, ml_collections.ConfigDict):
    return
  for key in cfg.keys():
    path = f'{prefix}.{key}' if prefix else key
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      _fail(path, f'unknown key{hint}')
    if isinstance(schema[key], ml_collections.ConfigDict) and not isinstance(
        cfg[key], ml_collections.ConfigDict):
      _fail(path, f'must be a block with keys {", ".join(schema[key].keys())}; got {cfg[key]!r}')
    _check_keys(cfg[key], schema[key], path)


def _positive_int(cfg, key: str, allow_zero: bool = False):
  value = _get(cfg, key)
  lo = 0 if allow_zero else 1
  if not isinstance(value, int) or isinstance(value, bool) or value < lo:
    _fail(key, f'must be an integer >= {lo}, got {value!r}')


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split('.'):
    if part not in node:
      _fail(dotted, 'missing (experiments start from base_config(), which sets every key)')
    node = node[part]
  return node


def _positive_float(cfg, key: str, allow_zero: bool = False):
  value = _get(cfg, key)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    _fail(key, f'must be a number {">=" if allow_zero else ">"} 0, got {value!r}')


def _in_unit_interval(cfg, key: str):
  value = _get(cfg, key)
  if not isinstance(value, (int, float)) or not 0 <= value < 1:
    _fail(key, f'must be in [0, 1), got {value!r}')


def _check_lm(cfg):
  lm = cfg.model.lm
  p = 'model.lm'
  for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
            'intermediate_size', 'moe_intermediate_size', 'n_routed_experts',
            'num_experts_per_tok', 'n_group', 'topk_group', 'kv_lora_rank',
            'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'attention_block_size'):
    _positive_int(cfg, f'{p}.{k}')
  for k in ('n_shared_experts', 'first_k_dense_replace', 'q_lora_rank', 'moe_token_chunk'):
    _positive_int(cfg, f'{p}.{k}', allow_zero=True)
  if lm.qk_rope_head_dim % 2:
    _fail(f'{p}.qk_rope_head_dim', f'rotary dims must be even, got {lm.qk_rope_head_dim}')
  if lm.num_experts_per_tok > lm.n_routed_experts:
    _fail(f'{p}.num_experts_per_tok',
          f'top-k {lm.num_experts_per_tok} exceeds n_routed_experts {lm.n_routed_experts}')
  if lm.n_routed_experts % lm.n_group:
    _fail(f'{p}.n_group', f'{lm.n_group} groups do not divide {lm.n_routed_experts} experts')
  if lm.topk_group > lm.n_group:
    _fail(f'{p}.topk_group', f'{lm.topk_group} exceeds n_group {lm.n_group}')
  per_group = lm.n_routed_experts // lm.n_group
  if lm.num_experts_per_tok > lm.topk_group * per_group:
    _fail(f'{p}.num_experts_per_tok',
          f'top-k {lm.num_experts_per_tok} exceeds the {lm.topk_group * per_group} experts '
          f'of the {lm.topk_group} selected groups')
  if lm.first_k_dense_replace > lm.num_hidden_layers:
    _fail(f'{p}.first_k_dense_replace',
          f'{lm.first_k_dense_replace} exceeds num_hidden_layers {lm.num_hidden_layers}')
  for k in ('rope_theta', 'rms_norm_eps', 'kv_lora_norm_eps', 'initializer_range',
            'routed_scaling_factor'):
    _positive_float(cfg, f'{p}.{k}')
  for k in ('logits_soft_cap', 'router_bias_update_rate', 'seq_balance_loss_alpha'):
    _positive_float(cfg, f'{p}.{k}', allow_zero=True)
  _one_of(cfg, f'{p}.attention_backend', ('auto', 'xla', 'cudnn', 'splash', 'naive'))
  _one_of(cfg, f'{p}.moe_backend', ('auto', 'ragged', 'capacity', 'dense'))
  _one_of(cfg, f'{p}.remat_policy', ('none', 'full', 'save_dots'))
  _positive_int(cfg, f'{p}.scan_unroll')
  _one_of(cfg, f'{p}.dtype', ('float32', 'bfloat16'))
  _one_of(cfg, f'{p}.param_dtype', ('float32', 'bfloat16'))
  if lm.moe_capacity_factor < 0:
    _fail(f'{p}.moe_capacity_factor', f'must be >= 0 (0 = dropless), got {lm.moe_capacity_factor}')
  if lm.max_position_embeddings < 1:
    _fail(f'{p}.max_position_embeddings', f'must be >= 1, got {lm.max_position_embeddings}')


def _check_vision(cfg):
  v = cfg.model.vision
  p = 'model.vision'
  for k in ('patch_size', 'num_channels', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
            'num_attention_heads', 'init_pos_emb_height', 'init_pos_emb_width',
            'max_patches_per_side'):
    _positive_int(cfg, f'{p}.{k}')
  for k in ('layer_norm_eps', 'rope_theta'):
    _positive_float(cfg, f'{p}.{k}')
  if v.hidden_size % v.num_attention_heads:
    _fail(f'{p}.num_attention_heads',
          f'{v.num_attention_heads} heads do not divide hidden_size {v.hidden_size}')
  head_dim = v.hidden_size // v.num_attention_heads
  if head_dim % 4:
    _fail(f'{p}.num_attention_heads',
          f'head dim {head_dim} must be a multiple of 4 for 2D rotary (row and column pairs)')
  if not isinstance(v.merge_kernel_size, (tuple, list)) or tuple(v.merge_kernel_size) != (2, 2):
    _fail(f'{p}.merge_kernel_size', f'only (2, 2) is supported, got {v.merge_kernel_size!r}')
  _one_of(cfg, f'{p}.remat_policy', ('none', 'full', 'save_dots'))
  _positive_int(cfg, f'{p}.scan_unroll')
  _one_of(cfg, f'{p}.attention_backend', ('auto', 'xla', 'cudnn', 'splash', 'naive'))
  _positive_int(cfg, f'{p}.attention_block_size')
  _positive_int(cfg, f'{p}.attention_head_groups')
  if v.num_attention_heads % v.attention_head_groups:
    _fail(f'{p}.attention_head_groups', f'{v.attention_head_groups} groups do not divide the '
          f'{v.num_attention_heads} heads')
  _one_of(cfg, f'{p}.dtype', ('float32', 'bfloat16'))
  _one_of(cfg, f'{p}.param_dtype', ('float32', 'bfloat16'))
  proj = cfg.model.projector
  # The projector repeats the two widths it joins; an override of one width must set it too.
  if proj.input_size != v.hidden_size:
    _fail('model.projector.input_size', f'{proj.input_size} != model.vision.hidden_size '
          f'{v.hidden_size} (set --config.model.projector.input_size={v.hidden_size})')
  if proj.merged_size != 4 * v.hidden_size:
    _fail('model.projector.merged_size', f'{proj.merged_size} != 4 * model.vision.hidden_size '
          f'(set --config.model.projector.merged_size={4 * v.hidden_size})')
  if proj.output_size != cfg.model.lm.hidden_size:
    _fail('model.projector.output_size', f'{proj.output_size} != model.lm.hidden_size '
          f'{cfg.model.lm.hidden_size} (set --config.model.projector.output_size='
          f'{cfg.model.lm.hidden_size})')


def _one_of(cfg, key: str, choices):
  value = _get(cfg, key)
  if value not in choices:
    _fail(key, f'must be one of {", ".join(map(str, choices))}; got {value!r}')


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """Mesh axis sizes with the single -1 filled in; errors name config.mesh.<axis>."""
  sizes = {a: mesh_cfg[a] for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if not isinstance(s, int) or (s < 1 and s != -1):
      _fail(f'mesh.{a}', f'must be a positive integer or -1, got {s!r}')
  if len(free) > 1:
    _fail(f'mesh.{free[1]}', f'only one axis may be -1 (also {free[0]})')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      _fail(f'mesh.{free[0]}', f'the fixed axes use {fixed} devices, which does not divide '
            f'the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    _fail('mesh', f'axis sizes {sizes} multiply to {fixed}, but there are {num_devices} devices')
  return sizes


def _check_train(cfg, num_devices: Optional[int]):
  for k in ('global_batch', 'seq_len', 'steps', 'microbatches', 'max_consecutive_nonfinite'):
    _positive_int(cfg, f'train.{k}')
  _positive_int(cfg, 'train.seed', allow_zero=True)
  _positive_float(cfg, 'train.grad_clip_norm', allow_zero=True)
  _positive_int(cfg, 'train.loss_vocab_chunk', allow_zero=True)
  _positive_int(cfg, 'train.loss_token_chunk', allow_zero=True)
  t = cfg.train
  if t.loss_token_chunk and not t.loss_vocab_chunk:
    _fail('train.loss_token_chunk', f'{t.loss_token_chunk} needs train.loss_vocab_chunk > 0 '
          '(sequence slices belong to the chunked cross-entropy)')
  if t.global_batch % t.microbatches:
    _fail('train.microbatches', f'{t.microbatches} microbatches do not divide global_batch {t.global_batch}')
  fixed = [_get(cfg, f'mesh.{a}') for a in MESH_AXES]
  if num_devices is None and -1 not in fixed:
    # A fully specified mesh implies its device count (e.g. a pod mesh described on a laptop).
    num_devices = math.prod(s for s in fixed if isinstance(s, int) and s > 0)
  if num_devices is not None:
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    dp = sizes['data'] * sizes['fsdp'] * sizes['expert']
    per_micro = t.global_batch // t.microbatches
    if per_micro % dp:
      _fail('train.global_batch', f'{t.global_batch} (/{t.microbatches} microbatches) is not '
            f'divisible by the data-parallel size {dp} (data*fsdp*expert)')
    if cfg.model.lm.n_routed_experts % sizes['expert']:
      _fail('mesh.expert', f'expert axis {sizes["expert"]} does not divide '
            f'{cfg.model.lm.n_routed_experts} routed experts')
    # Attention heads are split over the tensor axis (rules.py: heads -> tensor).
    for block in ('lm', 'vision'):
      heads = cfg.model[block].num_attention_heads
      if heads % sizes['tensor']:
        _fail('mesh.tensor', f'tensor axis {sizes["tensor"]} does not divide '
              f'model.{block}.num_attention_heads {heads}')
  if t.seq_len > cfg.model.lm.max_position_embeddings:
    _fail('train.seq_len', f'{t.seq_len} exceeds model.lm.max_position_embeddings '
          f'{cfg.model.lm.max_position_embeddings}')


def _check_optim(cfg):
  _one_of(cfg, 'optim.name', ('muon', 'adamw'))
  _one_of(cfg, 'optim.schedule', ('cosine', 'linear', 'constant'))
  _one_of(cfg, 'optim.ns_dtype', ('float32', 'bfloat16'))
  if not cfg.optim.lr > 0:
    _fail('optim.lr', f'must be positive, got {cfg.optim.lr}')
  _positive_int(cfg, 'optim.warmup_steps', allow_zero=True)
  _positive_int(cfg, 'optim.ns_steps')
  for k in ('b1', 'b2', 'momentum'):
    _in_unit_interval(cfg, f'optim.{k}')
  _positive_float(cfg, 'optim.eps')
  _positive_float(cfg, 'optim.weight_decay', allow_zero=True)
  if not 0 <= _get(cfg, 'optim.end_lr_ratio') <= 1:
    _fail('optim.end_lr_ratio', f'must be in [0, 1], got {cfg.optim.end_lr_ratio!r}')


def _check_metrics(cfg):
  _positive_int(cfg, 'metrics.log_every')


# Extra checks registered by later subsystems (data, trainer, RL) without editing this file's core.
_EXTRA_CHECKS: list[Callable] = []


# The modules whose import registers those checks. validate() imports them itself, so a
# check never depends on what the caller happened to import first (a test, a tool, main).
# A subsystem that adds a ``@register_check`` module lists it here.
CHECK_MODULES = ('kimi_vl_jax.data.config_check', 'kimi_vl_jax.train.stages',
                 'kimi_vl_jax.train.evaluate', 'kimi_vl_jax.rl.config_check')


def register_check(fn: Callable) -> Callable:
  """Decorator: ``fn(config, num_devices)`` raises ConfigError for mistakes in its own block;
  ``num_devices`` is validate's device count (None when unknown)."""
  if fn not in _EXTRA_CHECKS:
    _EXTRA_CHECKS.append(fn)
  return fn


def _import_check_modules():
  import importlib
  for name in CHECK_MODULES:
    importlib.import_module(name)


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
             schema: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """Checks ``config`` against the schema and its own consistency; returns it unchanged.

  Args:
    config: a resolved experiment config.
    num_devices: if given, mesh sizes and batch divisibility are checked against it.
    schema: the key schema (default: ``base.base_config()``).
  """
  _import_check_modules()
  schema = schema if schema is not None else base.base_config()
  _check_keys(config, schema, '')
  _check_lm(config)
  _check_vision(config)
  _check_train(config, num_devices)
  _check_optim(config)
  _check_metrics(config)
  for fn in _EXTRA_CHECKS:
    fn(config, num_devices)
  return config


# The data block's checks live with the data code (registered on import).
from kimi_vl_jax.data import config_check as _data_config_check  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
