"""Model presets: the one place where model dimensions live.

Each preset is a ConfigDict with three blocks whose field names follow the released
Hugging Face configs (SPEC §2, §3), so conversion is a rename, not a translation:

- ``lm``: the DeepSeek-V3 / Moonlight MoE language model.
- ``vision``: MoonViT.
- ``projector``: pixel shuffle (2x2) + 2-layer MLP into the LM width.

Presets:
- ``tiny``: unit tests (seconds to compile on CPU).
- ``small``: the CPU demo and the benchmarks of the vision tower and trainer.
- ``bench``: the MoE-LM benchmark config of the LM issue (vision as ``small``).
- ``kimi_vl_a3b``: the released Kimi-VL-A3B dimensions (SPEC §2, §3).

``scan_unroll`` (lm and vision): layers per iteration of the layer scan (``jax.lax.scan``'s
unroll). 1 keeps one rolled loop, whose compile time does not grow with depth (the released
27-layer dims); a value >= the stack's depth lays the layers out straight, with parameters
still stacked on the 'layers' axis (checkpoints and optimizer routes do not change). On
XLA:CPU the rolled loop writes every layer's residuals into stacked buffers and reads them
back, and zero-fills and slices the stacked weight gradients: fully unrolled, the bench
preset's LM train step ran 737 vs 799 ms (compile 10.4 vs 8.9 s), so the 4-layer CPU
presets unroll.
"""
from __future__ import annotations

import copy

import ml_collections



def _lm(**overrides) -> ml_collections.ConfigDict:
  """LM block with the released A3B values as defaults (SPEC §3)."""
  lm = dict(
      vocab_size=163840,
      hidden_size=2048,
      num_hidden_layers=27,
      num_attention_heads=16,
      intermediate_size=11264,        # dense MLP of the first_k_dense_replace layers
      moe_intermediate_size=1408,     # one routed expert
      n_routed_experts=64,
      n_shared_experts=2,             # one SwiGLU of n_shared * moe_intermediate
      num_experts_per_tok=6,
      n_group=1,
      topk_group=1,
      routed_scaling_factor=2.446,
      norm_topk_prob=True,
      first_k_dense_replace=1,
      q_lora_rank=0,                  # 0 = no q-LoRA (Kimi-VL); HF spells it null
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      rope_theta=800000.0,
      rms_norm_eps=1e-5,
      kv_lora_norm_eps=1e-6,
      max_position_embeddings=131072,
      initializer_range=0.02,
      logits_soft_cap=0.0,            # 0 = off (the release uses none)
      # Implementation choices (not part of the checkpoint).
      attention_backend='auto',       # auto | xla | cudnn | splash | naive
      attention_block_size=512,       # query/key block of the xla backend
      moe_backend='auto',             # auto | ragged | capacity | dense
      moe_capacity_factor=0.0,        # capacity backend: 0 = dropless (capacity = tokens)
      moe_token_chunk=0,              # > 0: route sequence slices of this many tokens at a time
                                      # (bounds dispatch buffers of long rows; 0 = whole rows)
      router_bias_update_rate=1e-3,   # u of the aux-loss-free bias update
      seq_balance_loss_alpha=0.0,     # optional sequence-wise balance loss
      scan_layers=True,
      scan_unroll=1,                  # layers per scan iteration (module docstring)
      remat_policy='none',            # none | full | save_dots
      dtype='float32',                # compute dtype
      param_dtype='float32',          # master weights
  )
  lm.update(overrides)
  return ml_collections.ConfigDict(lm)


def _vision(**overrides) -> ml_collections.ConfigDict:
  """MoonViT block with the released values as defaults (SPEC §2)."""
  vision = dict(
      patch_size=14,
      num_channels=3,
      hidden_size=1152,
      intermediate_size=4304,
      num_hidden_layers=27,
      num_attention_heads=16,
      init_pos_emb_height=64,
      init_pos_emb_width=64,
      merge_kernel_size=(2, 2),
      layer_norm_eps=1e-5,
      rope_theta=10000.0,
      max_patches_per_side=512,
      attention_backend='auto',       # auto | xla | cudnn | splash | naive (same op as the LM)
      attention_block_size=512,       # query/key block of the xla backend
      attention_head_groups=1,        # xla backend: passes over the tiles, H / groups heads each
      scan_layers=True,
      scan_unroll=1,                  # layers per scan iteration (module docstring)
      remat_policy='none',
      dtype='float32',
      param_dtype='float32',
  )
  vision.update(overrides)
  return ml_collections.ConfigDict(vision)


def _projector(vision_hidden: int, text_hidden: int, merge=(2, 2)) -> ml_collections.ConfigDict:
  merged = vision_hidden * merge[0] * merge[1]
  return ml_collections.ConfigDict(dict(
      input_size=vision_hidden, merged_size=merged, output_size=text_hidden,
      layer_norm_eps=1e-5))


def _coca(vision, vocab_size: int, layers: int) -> ml_collections.ConfigDict:
  """CoCa heads of MoonViT pretraining (train/coca.py): text encoder + caption decoder widths.

  The report starts them from SigLIP-SO400M's text tower and a small text LM; here they match
  the vision width and are discarded after the ViT stage.
  """
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, width=vision.hidden_size, layers=layers,
      heads=vision.num_attention_heads, mlp=vision.intermediate_size, max_len=64,
      embed_dim=vision.hidden_size))


def _preset(name: str, lm, vision, coca_layers: int = 2) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, lm=lm, vision=vision,
      projector=_projector(vision.hidden_size, lm.hidden_size, tuple(vision.merge_kernel_size)),
      coca=_coca(vision, lm.vocab_size, coca_layers)))


def _tiny():
  lm = _lm(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
           intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
           n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
           max_position_embeddings=4096, attention_block_size=64)
  vision = _vision(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, init_pos_emb_height=8, init_pos_emb_width=8)
  return _preset('tiny', lm, vision, coca_layers=1)


def _small():
  lm = _lm(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
           intermediate_size=1024, moe_intermediate_size=128, n_routed_experts=16,
           n_shared_experts=1, num_experts_per_tok=4, kv_lora_rank=64,
           qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
           max_position_embeddings=16384, rope_theta=50000.0,
           attention_block_size=128,  # 128x128 score tiles stay in CPU cache (7x faster than 512)
           scan_unroll=4)             # straight-line layers (module docstring)
  vision = _vision(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, init_pos_emb_height=16, init_pos_emb_width=16,
                   scan_unroll=4,
                   # Rows of many small images: 512-wide tiles spend 7/8 of the work on
                   # cross-image pairs; 128-wide ones are 2.7x faster fwd+bwd on CPU.
                   attention_block_size=128,
                   # 2 heads a pass over the tiles: a 2-6% faster step on CPU (ops/attention).
                   attention_head_groups=2)
  return _preset('small', lm, vision)


def _bench():
  """The LM benchmark config of the MoE-LM issue (vocab 8192, hidden 256, 64 experts)."""
  lm = _lm(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
           intermediate_size=1024, moe_intermediate_size=128, n_routed_experts=64,
           n_shared_experts=2, num_experts_per_tok=6, kv_lora_rank=64,
           qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
           max_position_embeddings=16384,
           attention_block_size=128,  # 128x128 score tiles stay in CPU cache (7x faster than 512)
           scan_unroll=4)             # straight-line layers (module docstring)
  return _preset('bench', lm, _small().vision)


def _kimi_vl_a3b():
  return _preset('kimi_vl_a3b', _lm(), _vision(), coca_layers=12)


_PRESETS = {'tiny': _tiny, 'small': _small, 'bench': _bench, 'kimi_vl_a3b': _kimi_vl_a3b}

PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str) -> ml_collections.ConfigDict:
  """Returns a fresh copy of the named model preset."""
  if name not in _PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {", ".join(_PRESETS)}')
  return copy.deepcopy(_PRESETS[name]())
