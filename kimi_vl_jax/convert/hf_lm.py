"""Hugging Face DeepSeek-V3 / Moonlight language model <-> this package's MoeLM (numpy only).

- ``lm_config_from_hf(hf_config)`` / ``hf_config_from_lm(lm_cfg)``: the config dicts.
- ``params_from_hf(state_dict, lm_cfg)``: torch-layout weights (name -> array, Linear (out, in))
  -> ``{'params': ..., 'router': ...}`` for ``MoeLM`` (scanned or unrolled per
  ``lm_cfg.scan_layers``). Routed experts may come per expert
  (``mlp.experts.{e}.{gate,up,down}_proj.weight``, the released checkpoints) or packed
  (``mlp.experts.gate_up_proj`` [E, 2F, D] and ``mlp.experts.down_proj`` [E, D, F], transformers').
- ``hf_from_params(variables, lm_cfg, packed_experts=True)``: the inverse.

RoPE layout: the checkpoints (``rope_interleave=True``, transformers' default) hold rope dims as
interleaved pairs, which is our layout. A config with ``rope_interleave=False`` uses the
rotate-half layout (pair j = (x[j], x[j + R/2])); its q/k_pe rope rows are permuted to
interleaved on import (and the exported config always says ``rope_interleave=True``).
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from kimi_vl_jax.config.presets import _lm

# Fields copied verbatim between the HF config and our lm block.
_SAME = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
         'intermediate_size', 'moe_intermediate_size', 'n_routed_experts', 'n_shared_experts',
         'num_experts_per_tok', 'n_group', 'topk_group', 'routed_scaling_factor', 'norm_topk_prob',
         'first_k_dense_replace', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim',
         'v_head_dim', 'rms_norm_eps', 'max_position_embeddings', 'initializer_range')


def _get(hf: Any, key: str, default=None):
  return hf.get(key, default) if isinstance(hf, Mapping) else getattr(hf, key, default)


def lm_config_from_hf(hf_config: Any, **overrides) -> ml_collections.ConfigDict:
  """Our lm block from a DeepseekV3 config (a ``DeepseekV3Config`` or its dict)."""
  cfg = _lm()
  for key in _SAME:
    value = _get(hf_config, key)
    if value is None:
      raise ValueError(f'HF config: missing {key!r}')
    cfg[key] = type(cfg[key])(value)
  cfg.q_lora_rank = int(_get(hf_config, 'q_lora_rank') or 0)
  rope = _get(hf_config, 'rope_parameters') or _get(hf_config, 'rope_scaling') or {}
  theta = rope.get('rope_theta', _get(hf_config, 'rope_theta'))
  if theta is None:
    raise ValueError("HF config: missing 'rope_theta' (rope_parameters.rope_theta)")
  cfg.rope_theta = float(theta)
  if rope.get('rope_type', rope.get('type', 'default')) not in ('default', None):
    raise ValueError(f"HF config: rope_type {rope.get('rope_type')!r} is not supported (default only)")
  if _get(hf_config, 'hidden_act', 'silu') != 'silu':
    raise ValueError(f"HF config: hidden_act {_get(hf_config, 'hidden_act')!r} != 'silu'")
  kv_heads = _get(hf_config, 'num_key_value_heads') or cfg.num_attention_heads
  if kv_heads != cfg.num_attention_heads:
    raise ValueError(f'HF config: num_key_value_heads {kv_heads} != num_attention_heads')
  if _get(hf_config, 'attention_bias', False):
    raise ValueError('HF config: attention_bias=True is not supported (MLA has no biases)')
  if _get(hf_config, 'tie_word_embeddings', False):
    raise ValueError('HF config: tie_word_embeddings=True is not supported (untied lm_head)')
  if _get(hf_config, 'topk_method', 'noaux_tc') != 'noaux_tc':
    raise ValueError(f"HF config: topk_method {_get(hf_config, 'topk_method')!r} != 'noaux_tc'")
  cfg.update(overrides)
  return cfg


def hf_config_from_lm(lm_cfg) -> dict:
  """kwargs for ``transformers.DeepseekV3Config`` describing ``lm_cfg``."""
  out = {key: lm_cfg[key] for key in _SAME}
  out.update(q_lora_rank=lm_cfg.q_lora_rank or None, num_key_value_heads=lm_cfg.num_attention_heads,
             rope_parameters={'rope_type': 'default', 'rope_theta': float(lm_cfg.rope_theta)},
             rope_interleave=True, hidden_act='silu', attention_bias=False,
             tie_word_embeddings=False, num_nextn_predict_layers=0)
  return out


def _rope_half_to_interleaved(w_rows: np.ndarray, axis: int) -> np.ndarray:
  """Permutes a rope axis from rotate-half order [x_0..x_{R/2-1}, y_0..] to pairs (x_j, y_j)."""
  r = w_rows.shape[axis]
  perm = np.stack([np.arange(r // 2), np.arange(r // 2) + r // 2], axis=1).reshape(-1)
  return np.take(w_rows, perm, axis=axis)


def _layer_from_hf(sd, p, cfg, moe: bool, interleaved: bool):
  """One decoder layer's (params, router) trees from HF names with prefix ``p``."""
  h, dn, r, dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                  cfg.v_head_dim)
  c, d = cfg.kv_lora_rank, cfg.hidden_size
  w = lambda name: np.asarray(sd[p + name])  # noqa: E731

  def q_kernel(wt, in_dim):
    k = wt.T.reshape(in_dim, h, dn + r)
    if not interleaved:
      k = np.concatenate([k[..., :dn], _rope_half_to_interleaved(k[..., dn:], -1)], axis=-1)
    return k

  attn = {}
  if cfg.q_lora_rank:
    attn['q_a_proj'] = {'kernel': w('self_attn.q_a_proj.weight').T}
    attn['q_a_layernorm'] = {'scale': w('self_attn.q_a_layernorm.weight')}
    attn['q_b_proj'] = {'kernel': q_kernel(w('self_attn.q_b_proj.weight'), cfg.q_lora_rank)}
  else:
    attn['q_proj'] = {'kernel': q_kernel(w('self_attn.q_proj.weight'), d)}
  kva = w('self_attn.kv_a_proj_with_mqa.weight').T
  if not interleaved:
    kva = np.concatenate([kva[:, :c], _rope_half_to_interleaved(kva[:, c:], 1)], axis=1)
  attn['kv_a_proj_with_mqa'] = {'kernel': kva}
  attn['kv_a_layernorm'] = {'scale': w('self_attn.kv_a_layernorm.weight')}
  attn['kv_b_proj'] = {'kernel': w('self_attn.kv_b_proj.weight').T.reshape(c, h, dn + dv)}
  attn['o_proj'] = {'kernel': w('self_attn.o_proj.weight').T.reshape(h, dv, d)}
  params = {'input_layernorm': {'scale': w('input_layernorm.weight')},
            'post_attention_layernorm': {'scale': w('post_attention_layernorm.weight')},
            'self_attn': attn}
  router = None
  if not moe:
    params['mlp'] = {n: {'kernel': w(f'mlp.{n}.weight').T}
                     for n in ('gate_proj', 'up_proj', 'down_proj')}
    return params, router
  e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
  if p + 'mlp.experts.gate_up_proj' in sd:
    gu = w('mlp.experts.gate_up_proj')                      # [E, 2F, D]
    experts = {'gate_proj': np.transpose(gu[:, :f], (0, 2, 1)),
               'up_proj': np.transpose(gu[:, f:], (0, 2, 1)),
               'down_proj': np.transpose(w('mlp.experts.down_proj'), (0, 2, 1))}   # [E,D,F]->[E,F,D]
  else:
    experts = {n: np.stack([w(f'mlp.experts.{i}.{n}.weight').T for i in range(e)])
               for n in ('gate_proj', 'up_proj', 'down_proj')}
  mlp = {'gate': {'kernel': w('mlp.gate.weight').T}, 'experts': experts}
  if cfg.n_shared_experts:
    mlp['shared_experts'] = {n: {'kernel': w(f'mlp.shared_experts.{n}.weight').T}
                             for n in ('gate_proj', 'up_proj', 'down_proj')}
  params['mlp'] = mlp
  bias_key = p + 'mlp.gate.e_score_correction_bias'
  bias = np.asarray(sd[bias_key], np.float32) if bias_key in sd else np.zeros((e,), np.float32)
  router = {'mlp': {'gate': {'e_score_correction_bias': bias}}}
  return params, router


def _stack_group(trees, scan: bool):
  if not trees:
    return None
  if scan:
    import jax
    return {'layers': jax.tree.map(lambda *xs: np.stack(xs), *trees)}
  return {f'layers_{i}': t for i, t in enumerate(trees)}


def params_from_hf(state_dict: Mapping[str, Any], lm_cfg, *, prefix: str = '',
                   rope_interleave: bool = True) -> dict:
  """HF state dict (numpy-convertible values) -> {'params', 'router'} for MoeLM(lm_cfg).

  ``prefix``: stripped from every name (e.g. ``'language_model.'`` inside a Kimi-VL checkpoint).
  """
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  sd = {k: (v.detach().cpu().numpy() if hasattr(v, 'detach') else np.asarray(v))
        for k, v in sd.items()}
  cfg = lm_cfg
  k_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
  dense_p, moe_p, moe_r = [], [], []
  try:
    for layer in range(cfg.num_hidden_layers):
      pre = f'model.layers.{layer}.'
      lp, lr = _layer_from_hf(sd, pre, cfg, layer >= k_dense, rope_interleave)
      if layer < k_dense:
        dense_p.append(lp)
      else:
        moe_p.append(lp)
        moe_r.append(lr)
    params = {'embed_tokens': {'embedding': sd['model.embed_tokens.weight']},
              'norm': {'scale': sd['model.norm.weight']},
              'lm_head': {'kernel': sd['lm_head.weight'].T}}
  except KeyError as err:
    raise KeyError(f'HF state dict: missing tensor {prefix}{err.args[0]}') from None
  router = {}
  if dense_p:
    params['dense_layers'] = _stack_group(dense_p, cfg.scan_layers)
  if moe_p:
    params['moe_layers'] = _stack_group(moe_p, cfg.scan_layers)
    router['moe_layers'] = _stack_group(moe_r, cfg.scan_layers)
  _check_shapes(params, cfg)
  return {'params': params, 'router': router}


def _check_shapes(params, cfg):
  v, d = cfg.vocab_size, cfg.hidden_size
  for name, got, want in (('model.embed_tokens.weight', params['embed_tokens']['embedding'].shape, (v, d)),
                          ('lm_head.weight', params['lm_head']['kernel'].shape, (d, v))):
    if tuple(got) != want:
      raise ValueError(f'HF state dict: {name} has shape {got}, config wants {want}')


def _unstack_group(group, scan: bool, n: int):
  if group is None:
    return []
  if scan:
    return [{k: _index(v, i) for k, v in group['layers'].items()} for i in range(n)]
  return [group[f'layers_{i}'] for i in range(n)]


def _index(tree, i):
  if isinstance(tree, Mapping):
    return {k: _index(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]


def hf_from_params(variables: Mapping[str, Any], lm_cfg, *, packed_experts: bool = True,
                   prefix: str = '') -> dict:
  """MoeLM variables -> HF state dict of numpy arrays (torch Linear layout)."""
  cfg = lm_cfg
  params = variables['params']
  router = variables.get('router', {})
  h, dn, r, dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                  cfg.v_head_dim)
  c, d = cfg.kv_lora_rank, cfg.hidden_size
  k_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
  n_moe = cfg.num_hidden_layers - k_dense
  dense = _unstack_group(params.get('dense_layers'), cfg.scan_layers, k_dense)
  moe = _unstack_group(params.get('moe_layers'), cfg.scan_layers, n_moe)
  moe_r = _unstack_group(router.get('moe_layers'), cfg.scan_layers, n_moe)
  a = lambda x: np.asarray(x)  # noqa: E731
  sd = {'model.embed_tokens.weight': a(params['embed_tokens']['embedding']),
        'model.norm.weight': a(params['norm']['scale']),
        'lm_head.weight': a(params['lm_head']['kernel']).T}
  for layer, lp in enumerate(dense + moe):
    pre = f'model.layers.{layer}.'
    at = lp['self_attn']
    sd[pre + 'input_layernorm.weight'] = a(lp['input_layernorm']['scale'])
    sd[pre + 'post_attention_layernorm.weight'] = a(lp['post_attention_layernorm']['scale'])
    if cfg.q_lora_rank:
      sd[pre + 'self_attn.q_a_proj.weight'] = a(at['q_a_proj']['kernel']).T
      sd[pre + 'self_attn.q_a_layernorm.weight'] = a(at['q_a_layernorm']['scale'])
      sd[pre + 'self_attn.q_b_proj.weight'] = a(at['q_b_proj']['kernel']).reshape(
          cfg.q_lora_rank, h * (dn + r)).T
    else:
      sd[pre + 'self_attn.q_proj.weight'] = a(at['q_proj']['kernel']).reshape(d, h * (dn + r)).T
    sd[pre + 'self_attn.kv_a_proj_with_mqa.weight'] = a(at['kv_a_proj_with_mqa']['kernel']).T
    sd[pre + 'self_attn.kv_a_layernorm.weight'] = a(at['kv_a_layernorm']['scale'])
    sd[pre + 'self_attn.kv_b_proj.weight'] = a(at['kv_b_proj']['kernel']).reshape(c, h * (dn + dv)).T
    sd[pre + 'self_attn.o_proj.weight'] = a(at['o_proj']['kernel']).reshape(h * dv, d).T
    mlp = lp['mlp']
    if layer < k_dense:
      for n in ('gate_proj', 'up_proj', 'down_proj'):
        sd[pre + f'mlp.{n}.weight'] = a(mlp[n]['kernel']).T
      continue
    sd[pre + 'mlp.gate.weight'] = a(mlp['gate']['kernel']).T
    sd[pre + 'mlp.gate.e_score_correction_bias'] = a(
        moe_r[layer - k_dense]['mlp']['gate']['e_score_correction_bias']).astype(np.float32)
    ex = {n: a(mlp['experts'][n]) for n in ('gate_proj', 'up_proj', 'down_proj')}
    if packed_experts:
      sd[pre + 'mlp.experts.gate_up_proj'] = np.concatenate(
          [np.transpose(ex['gate_proj'], (0, 2, 1)), np.transpose(ex['up_proj'], (0, 2, 1))], axis=1)
      sd[pre + 'mlp.experts.down_proj'] = np.transpose(ex['down_proj'], (0, 2, 1))
    else:
      for i in range(cfg.n_routed_experts):
        for n in ('gate_proj', 'up_proj', 'down_proj'):
          sd[pre + f'mlp.experts.{i}.{n}.weight'] = ex[n][i].T
    if cfg.n_shared_experts:
      for n in ('gate_proj', 'up_proj', 'down_proj'):
        sd[pre + f'mlp.shared_experts.{n}.weight'] = a(mlp['shared_experts'][n]['kernel']).T
  return {prefix + k: np.ascontiguousarray(v) for k, v in sd.items()}

