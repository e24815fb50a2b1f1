"""Generation with an MLA latent cache: prefill, one-token decode steps, sampling.

The cache (``init_cache``) holds, per layer and cached token, only the normalized kv latent
``ckv`` [C] and the roped ``kpe`` [R] (SPEC §3.1), stacked per layer group:
``{'dense': {'ckv': [Ld, B, T, C], 'kpe': [Ld, B, T, R]}, 'moe': {...}, 'segment_ids': [B, T],
'positions': [B, T], 'index': int32 []}``. Slots never written keep segment id 0, so they are
never attended. Every row writes its new tokens at the same slot ``index``; rows of different
prompt lengths differ only in their positions and in which slots carry segment id 0.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_cache(lm_cfg, batch: int, max_len: int, dtype: str = 'float32') -> dict:
  """An empty cache for ``batch`` rows of up to ``max_len`` tokens."""
  k = min(lm_cfg.first_k_dense_replace, lm_cfg.num_hidden_layers)
  n_moe = lm_cfg.num_hidden_layers - k
  dt = jnp.dtype(dtype)

  def group(n):
    if not n:
      return None
    return {'ckv': jnp.zeros((n, batch, max_len, lm_cfg.kv_lora_rank), dt),
            'kpe': jnp.zeros((n, batch, max_len, lm_cfg.qk_rope_head_dim), dt)}

  return {'dense': group(k), 'moe': group(n_moe),
          'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
          'positions': jnp.zeros((batch, max_len), jnp.int32),
          'index': jnp.zeros((), jnp.int32)}


def forward_with_cache(model: nn.Module, variables, tokens_bs, segment_ids_bs, positions_bs,
                       cache: dict):
  """Runs S new tokens (a prefill chunk, or S = 1 to decode) against the cache.

  Returns (logits [B, S, V] fp32, updated cache).
  """
  logits, aux = model.apply(variables, tokens_bs, segment_ids_bs, positions_bs,
                            decode_cache=cache)
  return logits, aux['cache']


def sample_logits(logits_bv: jax.Array, rng: jax.Array, temperature: float = 0.0,
                  top_p: float = 1.0) -> jax.Array:
  """Next tokens [B] int32: greedy when ``temperature == 0``, else temperature + nucleus (top-p).

  Top-p keeps the smallest set of most probable tokens whose mass reaches ``top_p`` (the most
  probable token is always kept).
  """
  if temperature <= 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order_bv = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order_bv, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs     # mass of strictly better tokens
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order_bv].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_p',
                                             'eos_id'))
def generate(model: nn.Module, variables, prompt_bs: jax.Array, prompt_len_b: jax.Array,
             rng: jax.Array, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: Optional[int] = None):
  """Samples ``max_new_tokens`` after right-padded prompts.

  Args:
    model: a ``MoeLM``; variables: its {'params', 'router'}.
    prompt_bs: int [B, S] prompts, right-padded; prompt_len_b: int [B] lengths (>= 1).
    rng: PRNG key (unused when greedy).
  Returns:
    (tokens [B, max_new_tokens] int32, logits [B, max_new_tokens, V] fp32 of each sampled step).
    After ``eos_id`` a row keeps emitting ``eos_id``.
  """
  b, s = prompt_bs.shape
  cfg = model.config
  cache = init_cache(cfg, b, s + max_new_tokens, cfg.dtype)
  pos_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  seg_bs = (pos_bs < prompt_len_b[:, None]).astype(jnp.int32)
  logits, cache = forward_with_cache(model, variables, prompt_bs, seg_bs, pos_bs, cache)
  last_bv = jnp.take_along_axis(logits, (prompt_len_b - 1)[:, None, None], axis=1)[:, 0]

  def step(carry, t):
    cache, logits_bv, rng, done_b = carry
    rng, sub = jax.random.split(rng)
    tok_b = sample_logits(logits_bv, sub, temperature, top_p)
    if eos_id is not None:
      tok_b = jnp.where(done_b, eos_id, tok_b)
      done_b = done_b | (tok_b == eos_id)
    pos_b1 = (prompt_len_b + t)[:, None].astype(jnp.int32)
    new_logits, cache = forward_with_cache(model, variables, tok_b[:, None],
                                           jnp.ones((b, 1), jnp.int32), pos_b1, cache)
    return (cache, new_logits[:, 0], rng, done_b), (tok_b, logits_bv)

  init = (cache, last_bv, rng, jnp.zeros((b,), bool))
  _, (toks_nb, logits_nbv) = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
  return jnp.swapaxes(toks_nb, 0, 1), jnp.swapaxes(logits_nbv, 0, 1)
