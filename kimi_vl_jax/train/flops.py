"""Model FLOPs per token for MFU: active-expert matmuls + attention scores (SPEC §3).

Training FLOPs per token = 3 x forward (forward + 2x backward). Forward:
- 2 x (active parameters, without the embedding lookup): dense/attention projections, the top-k
  routed experts plus shared experts of each MoE layer, lm_head;
- attention: QK^T and PV, 2 x S_ctx x (qk_head_dim + v_head_dim) x heads per layer, where S_ctx
  is the mean number of keys a query sees (S/2 for causal full rows).
Vision tower: 2 x params + 2 x 2 x P x hidden per layer (non-causal over its image).
"""
from __future__ import annotations

import jax


def lm_forward_flops_per_token(lm, seq_len: int) -> float:
  d = lm.hidden_size
  h = lm.num_attention_heads
  qk = lm.qk_nope_head_dim + lm.qk_rope_head_dim
  attn_params = (d * h * qk + d * (lm.kv_lora_rank + lm.qk_rope_head_dim)
                 + lm.kv_lora_rank * h * (lm.qk_nope_head_dim + lm.v_head_dim) + h * lm.v_head_dim * d)
  n_dense = min(lm.first_k_dense_replace, lm.num_hidden_layers)
  n_moe = lm.num_hidden_layers - n_dense
  dense_mlp = 3 * d * lm.intermediate_size
  moe_mlp = 3 * d * lm.moe_intermediate_size * (lm.num_experts_per_tok + lm.n_shared_experts)
  router = d * lm.n_routed_experts
  params = (lm.num_hidden_layers * attn_params + n_dense * dense_mlp + n_moe * (moe_mlp + router)
            + d * lm.vocab_size)
  attn = lm.num_hidden_layers * 2 * (seq_len / 2) * (qk + lm.v_head_dim) * h
  return 2.0 * params + attn


def vision_forward_flops_per_patch(vision, patches: int) -> float:
  d = vision.hidden_size
  layer = 4 * d * d + 2 * d * vision.intermediate_size
  params = vision.num_hidden_layers * layer + 3 * vision.patch_size ** 2 * d
  attn = vision.num_hidden_layers * 2 * patches * 2 * d
  return 2.0 * params + attn


# Dense bf16 peak per chip, TFLOP/s (vendor figures). CPU has no meaningful peak: a nominal
# 0.1 TFLOP/s per device keeps the number finite and comparable between runs on one machine.
_PEAK_TFLOPS = {'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0,
                'TPU v6 lite': 918.0, 'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0,
                'NVIDIA A100': 312.0, 'cpu': 0.1}


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, tf in _PEAK_TFLOPS.items():
    if kind.lower().startswith(name.lower()):
      return tf * 1e12
  return _PEAK_TFLOPS['cpu'] * 1e12
