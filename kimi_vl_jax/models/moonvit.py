"""MoonViT: the native-resolution vision tower over packed patch buffers (SPEC §2.1-2.4).

Input is the fixed-shape buffer of ``data/patch_packing.py``: ``patches [B, P, C*p*p]`` with
per-slot image segment id (0 = empty), (row, col) in its image and the image's (h, w) grid.
Nothing depends on the image sizes at trace time, so any mix of images runs under one
compiled graph:

- patch embedding: a Dense over the flattened (C, p, p) patch (= the stride-p conv);
- position embedding: the learnable (H0, W0, D) table resized to each image's grid with torch
  bicubic semantics, evaluated per patch from its (row, col, h, w) (``ops/bicubic``);
- 2D RoPE, interleaved layout: pair (4i, 4i+1) rotates by col * f_i, pair (4i+2, 4i+3) by
  row * f_i, f_i = theta^(-4i/head_dim), in fp32 (SPEC §2.3);
- pre-norm blocks: fused qkv with bias, attention blocked by segment id through
  ``ops.attention.attention(causal=False)``, tanh-GELU MLP (SPEC §2.4); ``nn.scan`` over the
  blocks (params stacked on a leading 'layers' axis) with an optional remat policy;
- final LayerNorm; empty slots output exact zeros.

Output ``[B, P, D]`` keeps the merge-block slot order, so the projector's 2x2 pixel shuffle
is a reshape.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import FrozenConfigDict

from kimi_vl_jax.models.abstract import ComponentSpec, register
from kimi_vl_jax.models.norms import LayerNorm
from kimi_vl_jax.ops import bicubic
from kimi_vl_jax.ops.attention import attention
from kimi_vl_jax.ops.gelu import gelu_tanh

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _dtype(name: str):
  return jnp.dtype(name)


def _dense(features: int, axes: tuple[str, str], cfg, name: str) -> nn.Dense:
  return nn.Dense(
      features, use_bias=True, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name)


def _layer_norm(cfg, eps: float, name: str) -> LayerNorm:
  return LayerNorm(epsilon=eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def rope_angles(rows_bp: jax.Array, cols_bp: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Rotation angles [B, P, head_dim/2] of the interleaved 2D RoPE (fp32).

  Pair m = 2i rotates by col * f_i and pair m = 2i + 1 by row * f_i, f_i = theta^(-4i/head_dim).
  """
  inv_freq = (1.0 / (theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float32)
                               / np.float32(head_dim // 2)))).astype(np.float32)   # [hd/4]
  col = cols_bp.astype(jnp.float32)[..., None] * inv_freq
  row = rows_bp.astype(jnp.float32)[..., None] * inv_freq
  return jnp.stack([col, row], axis=-1).reshape(*rows_bp.shape, head_dim // 2)


def rope_cos_sin(angles_bpm: jax.Array) -> jax.Array:
  """[B, P, M] angles -> [2, B, P, M] (cos, sin), computed once for all blocks.

  The optimization barrier keeps them one materialized array: otherwise XLA fuses cos and
  sin into every consumer and evaluates them per element of q and k (x heads), in every
  block, forward and backward (16 such passes over [P, heads, head_dim] in a 4-block tower).
  """
  return jax.lax.optimization_barrier(jnp.stack([jnp.cos(angles_bpm), jnp.sin(angles_bpm)]))


def apply_rope(x_bphd: jax.Array, cos_sin_2bpm: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2m], x[2m+1]) by angle m, in fp32, cast back.

  ``cos_sin_2bpm``: ``rope_cos_sin`` of the angles.
  """
  dtype = x_bphd.dtype
  x = x_bphd.astype(jnp.float32).reshape(*x_bphd.shape[:-1], -1, 2)
  a, b = x[..., 0], x[..., 1]
  cos, sin = cos_sin_2bpm[0][:, :, None, :], cos_sin_2bpm[1][:, :, None, :]
  out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
  return out.reshape(x_bphd.shape).astype(dtype)


@jax.custom_vjp
def _split_qkv(qkv_bp3hd):
  """[B, P, 3, H, hd] -> (q, k, v), each [B, P, H, hd].

  The custom VJP stacks (dq, dk, dv) into one array; autodiff's transpose of the three
  slices writes three zero-padded full-size arrays and adds them.
  """
  return qkv_bp3hd[:, :, 0], qkv_bp3hd[:, :, 1], qkv_bp3hd[:, :, 2]


def _split_qkv_fwd(qkv_bp3hd):
  return _split_qkv(qkv_bp3hd), None


def _split_qkv_bwd(_, grads):
  return (jnp.stack(grads, axis=2),)


_split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


class MoonViTBlock(nn.Module):
  """Pre-norm transformer block: x + wo(attn(rope(qkv(norm0 x)))), then x + fc1(gelu(fc0(norm1 x)))."""
  config: FrozenConfigDict

  @nn.compact
  def __call__(self, x_bpd, segment_ids_bp, rope_2bpm):
    cfg = self.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = d // heads
    b, p, _ = x_bpd.shape
    h = _layer_norm(cfg, cfg.layer_norm_eps, 'norm0')(x_bpd)
    qkv = _dense(3 * d, ('vision_embed', 'vision_heads'), cfg, 'wqkv')(h)
    # Checkpoint layout: [q | k | v], each heads x head_dim contiguous.
    q, k, v = _split_qkv(qkv.reshape(b, p, 3, heads, hd))
    q = nn.with_logical_constraint(apply_rope(q, rope_2bpm), ('batch', 'act_patches', 'act_heads', 'act_kv'))
    k = nn.with_logical_constraint(apply_rope(k, rope_2bpm), ('batch', 'act_patches', 'act_heads', 'act_kv'))
    o = attention(q, k, v, segment_ids_bp, causal=False, backend=cfg.attention_backend,
                  scale=hd ** -0.5, block_size=cfg.attention_block_size,
                  head_groups=cfg.attention_head_groups)
    o = o.reshape(b, p, d)
    x_bpd = x_bpd + _dense(d, ('vision_heads', 'vision_embed'), cfg, 'wo')(o)
    h = _layer_norm(cfg, cfg.layer_norm_eps, 'norm1')(x_bpd)
    h = _dense(cfg.intermediate_size, ('vision_embed', 'vision_mlp'), cfg, 'fc0')(h)
    h = nn.with_logical_constraint(gelu_tanh(h), ('batch', 'act_patches', 'act_mlp'))
    x_bpd = x_bpd + _dense(d, ('vision_mlp', 'vision_embed'), cfg, 'fc1')(h)
    return nn.with_logical_constraint(x_bpd, ('batch', 'act_patches', 'act_embed'))


class _ScanBlock(nn.Module):
  """Scan body adapter: carry x, broadcast the per-slot side inputs."""
  config: FrozenConfigDict

  @nn.compact
  def __call__(self, x_bpd, segment_ids_bp, rope_2bpm):
    block = MoonViTBlock
    if self.config.remat_policy != 'none':
      block = nn.remat(block, policy=REMAT_POLICIES[self.config.remat_policy], prevent_cse=False)
    return block(self.config, name='block')(x_bpd, segment_ids_bp, rope_2bpm), None


class MoonViT(nn.Module):
  """The vision tower. ``config`` is the ``model.vision`` block.

  __call__(patches_bpc, segment_ids_bp, rows_bp, cols_bp, grid_h_bp, grid_w_bp) -> [B, P, D]
    patches_bpc: [B, P, C*p*p] normalized pixels in (C, p, p) order, merge-block slot order.
    segment_ids_bp: int [B, P], image index within the example (1-based), 0 = empty slot.
    rows_bp, cols_bp: int [B, P] patch coordinates inside its image.
    grid_h_bp, grid_w_bp: int [B, P] its image's patch grid (any value on empty slots).
  Returns final-LayerNorm features in the compute dtype, exactly zero on empty slots.
  """
  config: FrozenConfigDict

  @nn.compact
  def __call__(self, patches_bpc, segment_ids_bp, rows_bp, cols_bp, grid_h_bp, grid_w_bp):
    cfg = self.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    patch_dim = cfg.num_channels * cfg.patch_size ** 2
    if patches_bpc.shape[-1] != patch_dim:
      raise ValueError(f'MoonViT: patches last dim {patches_bpc.shape[-1]} != '
                       f'num_channels*patch_size^2 = {patch_dim}')
    x = _dense(d, ('patch_in', 'vision_embed'), cfg, 'patch_embed')(
        patches_bpc.astype(_dtype(cfg.dtype)))
    pos_table = self.param(
        'pos_emb',
        # (H0, W0, D): one logical name per array, so only H0 carries 'vision_pos'.
        nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                     ('vision_pos', None, 'vision_embed')),
        (cfg.init_pos_emb_height, cfg.init_pos_emb_width, d), _dtype(cfg.param_dtype))
    # Empty slots have grid 0; 1 keeps the bicubic scale finite (their output is zeroed anyway).
    pos = bicubic.interpolate_at(pos_table, rows_bp, cols_bp, jnp.maximum(grid_h_bp, 1),
                                 jnp.maximum(grid_w_bp, 1))
    x = (x.astype(jnp.float32) + pos).astype(_dtype(cfg.dtype))
    x = nn.with_logical_constraint(x, ('batch', 'act_patches', 'act_embed'))
    rope = rope_cos_sin(rope_angles(rows_bp, cols_bp, d // heads, cfg.rope_theta))
    segment_ids_bp = segment_ids_bp.astype(jnp.int32)

    if cfg.scan_layers:
      stack = nn.scan(_ScanBlock, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'},
                      unroll=min(cfg.scan_unroll, cfg.num_hidden_layers))  # see config/presets.py
      x, _ = stack(cfg, name='blocks')(x, segment_ids_bp, rope)
    else:
      for i in range(cfg.num_hidden_layers):
        x, _ = _ScanBlock(cfg, name=f'blocks_{i}')(x, segment_ids_bp, rope)

    x = _layer_norm(cfg, cfg.layer_norm_eps, 'final_layernorm')(x)
    return jnp.where((segment_ids_bp > 0)[..., None], x, jnp.zeros_like(x))


def dummy_inputs(config, batch: int = 1, num_patches: int = 4) -> tuple:
  """Shape-only inputs for init (one 2x2 image per example)."""
  c = config.num_channels * config.patch_size ** 2
  seg = jnp.ones((batch, num_patches), jnp.int32)
  rc = jnp.zeros((batch, num_patches), jnp.int32)
  grid = jnp.full((batch, num_patches), 2, jnp.int32)
  return (jnp.zeros((batch, num_patches, c), jnp.float32), seg, rc, rc, grid, grid)


@register('vision')
def _abstract_vision(model_cfg):
  cfg = FrozenConfigDict(model_cfg.vision)
  model = MoonViT(cfg)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(cfg)))
  return variables, ComponentSpec()
