"""The Moonlight / DeepSeek-V3 MoE language model (SPEC §3) over packed sequences.

``first_k_dense_replace`` dense decoder layers, then MoE decoder layers; each group is one
``nn.scan`` (parameters stacked on a leading 'layers' axis) when ``scan_layers``, so compile
time does not grow with depth. Each layer is pre-norm:
``h = x + MLA(norm(x)); y = h + FFN(norm(h))`` with FFN = SwiGLU (dense) or MoEBlock.
Then a final RMSNorm and an untied ``lm_head`` (optional tanh logit soft-cap).

Decoding: ``decode_cache`` (see ``models/generate.py``) holds per layer only the MLA latent and
k_pe of every cached token, plus the cache slots' segment ids and positions and the next
write index; the new tokens are written at ``index`` and attend to every cached slot of their
segment with position <= theirs.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import FrozenConfigDict

from kimi_vl_jax.models.abstract import ComponentSpec, register
from kimi_vl_jax.models.mla import MLA
from kimi_vl_jax.models.mlp import MLP
from kimi_vl_jax.models.norms import RMSNorm

REMAT_POLICIES = ('none', 'full', 'save_dots')


class DecoderLayer(nn.Module):
  """One pre-norm decoder layer; ``moe`` selects MoEBlock over the dense SwiGLU.

  ``__call__(x_bsd, segment_ids_bs, positions_bs, cache, cache_meta) -> (x_bsd, (aux, cache))``
  (the scan signature: x is the carry, the cache slice is scanned, the rest broadcast).
  """
  config: FrozenConfigDict
  moe: bool

  @nn.compact
  def __call__(self, x_bsd, segment_ids_bs, positions_bs, cache, cache_meta):
    cfg = self.config
    h_bsd = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype, name='input_layernorm')(x_bsd)
    attn_bsd, new_cache = MLA(cfg, name='self_attn')(h_bsd, segment_ids_bs, positions_bs, cache,
                                                     cache_meta)
    x_bsd = x_bsd + attn_bsd.astype(x_bsd.dtype)
    h_bsd = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype,
                    name='post_attention_layernorm')(x_bsd)
    if self.moe:
      from kimi_vl_jax.models.moe import MoEBlock  # the MoE engineer's module (same package)
      ffn_bsd, aux = MoEBlock(cfg, name='mlp')(h_bsd, segment_ids_bs)
    else:
      ffn_bsd = MLP(cfg.intermediate_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    initializer_range=cfg.initializer_range, name='mlp')(h_bsd)
      aux = {}
    x_bsd = x_bsd + ffn_bsd.astype(x_bsd.dtype)
    x_bsd = nn.with_logical_constraint(x_bsd, ('batch', 'length', 'act_embed'))
    return x_bsd, (aux, new_cache)


def _layer_class(cfg, scanned: bool):
  """DecoderLayer wrapped in remat per ``remat_policy``."""
  policy = cfg.remat_policy
  if policy not in REMAT_POLICIES:
    raise ValueError(f'lm.remat_policy must be one of {REMAT_POLICIES}; got {policy!r}')
  if policy == 'none':
    return DecoderLayer
  jax_policy = None if policy == 'full' else jax.checkpoint_policies.checkpoint_dots
  # Under scan the loop already stops CSE across the remat boundary.
  return nn.remat(DecoderLayer, policy=jax_policy, prevent_cse=not scanned)


class _Stack(nn.Module):
  """``num`` identical decoder layers, scanned or unrolled. Returns (x, aux stacked, cache)."""
  config: FrozenConfigDict
  moe: bool
  num: int

  @nn.compact
  def __call__(self, x_bsd, segment_ids_bs, positions_bs, cache, cache_meta):
    cfg = self.config
    if cfg.scan_layers:
      scanned = nn.scan(_layer_class(cfg, True), variable_axes={'params': 0, 'router': 0},
                        split_rngs={'params': True},
                        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=self.num,
                        metadata_params={nn.PARTITION_NAME: 'layers'},
                        unroll=min(cfg.scan_unroll, self.num))   # see config/presets.py
      return scanned(cfg, self.moe, name='layers')(x_bsd, segment_ids_bs, positions_bs, cache,
                                                   cache_meta)
    layer_cls = _layer_class(cfg, False)
    auxes, caches = [], []
    for i in range(self.num):
      cache_i = None if cache is None else jax.tree.map(lambda c: c[i], cache)
      x_bsd, (aux, new_cache) = layer_cls(cfg, self.moe, name=f'layers_{i}')(
          x_bsd, segment_ids_bs, positions_bs, cache_i, cache_meta)
      auxes.append(aux)
      caches.append(new_cache)
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    aux = jax.tree.map(stack, *auxes) if auxes and auxes[0] else {}
    new_cache = jax.tree.map(stack, *caches) if cache is not None else None
    return x_bsd, (aux, new_cache)


class MoeLM(nn.Module):
  """The decoder LM. ``config``: the lm block (FrozenConfigDict)."""
  config: FrozenConfigDict

  def setup(self):
    cfg = self.config
    n_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    self.n_dense, self.n_moe = n_dense, cfg.num_hidden_layers - n_dense
    init = nn.initializers.normal(cfg.initializer_range)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nn.with_logical_partitioning(init, ('vocab', 'embed')))
    self.dense_layers = _Stack(cfg, False, n_dense) if n_dense else None
    self.moe_layers = _Stack(cfg, True, self.n_moe) if self.n_moe else None
    self.norm = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                            param_dtype=jnp.dtype(cfg.param_dtype),
                            kernel_init=nn.with_logical_partitioning(init, ('embed', 'vocab')))

  def embed(self, tokens_bs: jax.Array) -> jax.Array:
    """Token embeddings [B, S, D] in the compute dtype (Kimi-VL swaps in image features)."""
    return self.embed_tokens(tokens_bs)

  def __call__(self, tokens_bs: jax.Array, segment_ids_bs: jax.Array, positions_bs: jax.Array, *,
               inputs_embeds_bsd: Optional[jax.Array] = None, decode_cache: Optional[dict] = None,
               deterministic: bool = True):
    """Args:
      tokens_bs: int [B, S] (ignored when ``inputs_embeds_bsd`` is given).
      segment_ids_bs: int [B, S], 0 = padding; positions_bs: int [B, S], restart per segment.
      inputs_embeds_bsd: optional [B, S, D] embeddings to use instead of the token lookup.
      decode_cache: optional cache from ``generate.init_cache``; the S new tokens are written at
        its ``index``.
      deterministic: unused (the model has no dropout); kept for the trainer's call signature.
    Returns:
      logits [B, S, V] fp32 and aux {'load_le': [L_moe, E], 'dropped': int32, 'balance_loss':
      fp32} (+ 'cache' when decoding).
    """
    del deterministic
    cfg = self.config
    if segment_ids_bs.ndim != 2 or positions_bs.shape != segment_ids_bs.shape:
      raise ValueError(f'MoeLM: segment_ids {segment_ids_bs.shape} and positions '
                       f'{positions_bs.shape} must both be [B, S]')
    if inputs_embeds_bsd is None:
      if tokens_bs.shape != segment_ids_bs.shape:
        raise ValueError(f'MoeLM: tokens {tokens_bs.shape} != segment_ids {segment_ids_bs.shape}')
      x_bsd = self.embed(tokens_bs)
    else:
      x_bsd = inputs_embeds_bsd.astype(jnp.dtype(cfg.dtype))
    x_bsd = nn.with_logical_constraint(x_bsd, ('batch', 'length', 'act_embed'))

    cache_meta, dense_cache, moe_cache = None, None, None
    if decode_cache is not None:
      idx = decode_cache['index']
      cache_meta = {
          'index': idx,
          'segment_ids': jax.lax.dynamic_update_slice(
              decode_cache['segment_ids'], segment_ids_bs.astype(jnp.int32), (0, idx)),
          'positions': jax.lax.dynamic_update_slice(
              decode_cache['positions'], positions_bs.astype(jnp.int32), (0, idx)),
      }
      dense_cache, moe_cache = decode_cache['dense'], decode_cache['moe']

    new_dense = new_moe = None
    if self.dense_layers is not None:
      x_bsd, (_, new_dense) = self.dense_layers(x_bsd, segment_ids_bs, positions_bs, dense_cache,
                                                cache_meta)
    if self.moe_layers is not None:
      x_bsd, (moe_aux, new_moe) = self.moe_layers(x_bsd, segment_ids_bs, positions_bs, moe_cache,
                                                  cache_meta)
      aux = {'load_le': moe_aux['load_e'].astype(jnp.float32),
             'dropped': jnp.sum(moe_aux['dropped']).astype(jnp.int32),
             'balance_loss': jnp.sum(moe_aux['balance_loss']).astype(jnp.float32)}
    else:
      aux = {'load_le': jnp.zeros((0, cfg.n_routed_experts), jnp.float32),
             'dropped': jnp.zeros((), jnp.int32), 'balance_loss': jnp.zeros((), jnp.float32)}

    x_bsd = self.norm(x_bsd)
    # lm_head on a [tokens, D] view (2-D dots are ~2x faster on XLA:CPU; same elsewhere).
    logits_bsv = self.lm_head(x_bsd.reshape(-1, x_bsd.shape[-1])).astype(jnp.float32)
    logits_bsv = logits_bsv.reshape(x_bsd.shape[:-1] + (cfg.vocab_size,))
    logits_bsv = nn.with_logical_constraint(logits_bsv, ('batch', 'length', 'act_vocab'))
    if cfg.logits_soft_cap and cfg.logits_soft_cap > 0:
      cap = float(cfg.logits_soft_cap)
      logits_bsv = cap * jnp.tanh(logits_bsv / cap)
    if decode_cache is not None:
      aux['cache'] = {'dense': new_dense, 'moe': new_moe,
                      'segment_ids': cache_meta['segment_ids'],
                      'positions': cache_meta['positions'],
                      'index': decode_cache['index'] + x_bsd.shape[1]}
    return logits_bsv, aux


def dummy_inputs(batch: int = 1, length: int = 8):
  """(tokens, segment_ids, positions) of ones/aranges for init and eval_shape."""
  tokens = jnp.ones((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return tokens, tokens, positions


@register('lm')
def _abstract_lm(model_cfg):
  """Shapes of the LM variables (no allocation) and how to count its active parameters."""
  cfg = FrozenConfigDict(model_cfg.lm)
  model = MoeLM(cfg)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs()))
  # 'mlp/experts/' matches the routed expert stacks only (not 'mlp/shared_experts/').
  return variables, ComponentSpec(routed_expert_key='mlp/experts/',
                                  active_fraction=cfg.num_experts_per_tok / cfg.n_routed_experts)
