"""Pixel shuffle (2x2) + 2-layer MLP from MoonViT features to LM embeddings (SPEC §2.5).

MoonViT slots are in 2x2 merge-block order (``data/patch_packing.py``), so the pixel shuffle
is a reshape: slots [4t, 4t+4) are the sub-tokens (2R, 2C), (2R, 2C+1), (2R+1, 2C),
(2R+1, 2C+1) of LM image token t. Each sub-token is LayerNorm'ed on its own (``pre_norm``),
the four are concatenated (4*D), then Linear 4D -> 4D, exact (erf) GELU, Linear 4D -> LM width.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import FrozenConfigDict

from kimi_vl_jax.models.abstract import ComponentSpec, register
from kimi_vl_jax.models.norms import LayerNorm


class Projector(nn.Module):
  """``config`` is the ``model.projector`` block (input_size, merged_size, output_size, eps).

  __call__(x_bpd, segment_ids_bp) -> (tokens_btd [B, P/4, output_size], token_segment_ids_bt [B, P/4])
  Token t of example b comes from slots 4t..4t+3; its segment id is that of slot 4t (0 = empty,
  and its output is exactly zero).
  """
  config: FrozenConfigDict
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x_bpd, segment_ids_bp):
    cfg = self.config
    b, p, d = x_bpd.shape
    area = cfg.merged_size // cfg.input_size
    if d != cfg.input_size or p % area:
      raise ValueError(f'Projector: features [B, P, D] = {x_bpd.shape} need D = {cfg.input_size} '
                       f'and P divisible by {area}')
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    x = x_bpd.reshape(b, p // area, area, d)
    x = LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='pre_norm')(x)
    x = x.reshape(b, p // area, area * d)

    def dense(features, axes, name):
      return nn.Dense(
          features, dtype=dtype, param_dtype=param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
          name=name)

    x = dense(cfg.merged_size, ('vision_embed', 'vision_mlp'), 'linear_1')(x)
    x = jax.nn.gelu(x, approximate=False)
    x = dense(cfg.output_size, ('vision_mlp', 'embed'), 'linear_2')(x)
    token_seg = segment_ids_bp.reshape(b, p // area, area)[..., 0]
    x = jnp.where((token_seg > 0)[..., None], x, jnp.zeros_like(x))
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed')), token_seg


@register('projector')
def _abstract_projector(model_cfg):
  cfg = FrozenConfigDict(model_cfg.projector)
  model = Projector(cfg)
  x = jnp.zeros((1, 4, cfg.input_size), jnp.float32)
  seg = jnp.ones((1, 4), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, seg))
  return variables, ComponentSpec()
