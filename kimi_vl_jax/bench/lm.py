"""MoE-LM benchmark (issue 3): JAX vs transformers' torch DeepseekV3 train step, MFU, MoE scaling,
attention memory.

``python -m kimi_vl_jax.bench.lm`` on the ``bench`` preset (vocab 8192, hidden 256, 4 layers of which
1 dense, 64 experts top-6, batch 4 x 512, fp32, AdamW) measures in one run:

1. JAX train step tokens/s (loss = next-token cross-entropy, grads, optax.adamw update; jitted,
   params/opt state donated) and the same step in ``transformers.DeepseekV3ForCausalLM`` (same
   dims, torch.set_num_threads(cores), torch.optim.AdamW); their ratio.
2. MFU: model FLOPs per step / step time / a matmul peak measured here (best fp32 [N,N]@[N,N]
   jitted matmul). Model FLOPs = 6 * N_active * tokens (N_active: active matmul parameters, i.e.
   attention, dense MLP, shared experts, top-k routed experts, router, lm_head; not the embedding
   lookup) + attention score/value FLOPs 3 * 2 * B * H * S^2 * (d_qk + d_v) / 2 (causal half).
   torch's MFU on the same count too, and the MFU the 2x target would take (2 x torch's).
3. One MoE layer (fwd+bwd) with 64 vs 8 routed experts at the same top-k and expert width:
   the ratio of the medians, and each alternating round's ratio (this host's noise).
4. Compiled peak memory (arguments + outputs + temporaries, from ``memory_analysis``) of the xla
   attention backend's forward+backward at S = 16384 vs 8192.

The last line is one JSON object with every headline number.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import FrozenConfigDict

from kimi_vl_jax.config.presets import get_preset
from kimi_vl_jax.models.lm import MoeLM


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _alternating_times(fns, rounds: int, warmup: int) -> list[list[float]]:
  """Seconds of each no-arg callable per round, timed in alternating rounds (shared-host
  fairness: every callable sees each round's background load)."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(rounds):
    for t, fn in zip(times, fns):
      t.append(_timed(fn))
  return times


def _alternating_medians(fns, rounds: int, warmup: int) -> list[float]:
  """Median seconds of each no-arg callable over ``_alternating_times``' rounds."""
  return [float(np.median(t)) for t in _alternating_times(fns, rounds, warmup)]


def _batch(cfg, batch: int, seq: int, seed: int = 0):
  tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, size=(batch, seq + 1))
  return tokens.astype(np.int32)


# ------------------------------------------------------------------------------------- jax


def make_jax_train_step(cfg, batch: int, seq: int):
  """A no-arg callable running one jitted MoeLM train step (fwd + bwd + AdamW) to completion."""
  model = MoeLM(FrozenConfigDict(cfg))
  data = _batch(cfg, batch, seq)
  inputs, labels = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
  seg = jnp.ones_like(inputs)
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), inputs.shape)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), inputs, seg, pos)
  import flax.linen as nn
  variables = nn.unbox(variables)
  params, router = variables['params'], variables.get('router', {})
  tx = optax.adamw(1e-3, weight_decay=0.01)
  opt_state = tx.init(params)

  def step(params, opt_state, router, inputs, labels):
    def loss_fn(p):
      logits, aux = model.apply({'params': p, 'router': router}, inputs, seg, pos)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), aux

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  state = {'p': params, 'o': opt_state}

  def run():
    state['p'], state['o'], loss = step(state['p'], state['o'], router, inputs, labels)
    loss.block_until_ready()

  return run


def active_matmul_params(cfg) -> float:
  """Parameters that take part in a matmul per token (active experts only; no embedding lookup)."""
  d, h = cfg.hidden_size, cfg.num_attention_heads
  dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  if cfg.q_lora_rank:
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * dqk
  else:
    q = d * h * dqk
  attn = (q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
          + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
          + h * cfg.v_head_dim * d)
  n_dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
  n_moe = cfg.num_hidden_layers - n_dense
  dense_mlp = 3 * d * cfg.intermediate_size
  moe_mlp = (3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
             + d * cfg.n_routed_experts)
  return float(cfg.num_hidden_layers * attn + n_dense * dense_mlp + n_moe * moe_mlp
               + d * cfg.vocab_size)


def train_flops(cfg, batch: int, seq: int) -> float:
  """FLOPs of one train step: 6 N_active T + causal attention (fwd + 2x bwd)."""
  tokens = batch * seq
  dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  attn_fwd = 2 * batch * cfg.num_attention_heads * seq * seq * (dqk + cfg.v_head_dim) / 2
  return 6 * active_matmul_params(cfg) * tokens + 3 * attn_fwd * cfg.num_hidden_layers


def make_matmul_peak(n: int = 1024, repeats: int = 5, dtype=jnp.float32):
  """A no-arg callable returning the best FLOP/s of ``repeats`` jitted [n,n] @ [n,n] with
  operands in ``dtype`` and fp32 accumulation/result (bf16: the Newton-Schulz products)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()

  def peak():
    best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n ** 3 / best

  return peak


# ----------------------------------------------------------------------------------- torch


def make_torch_train_step(cfg, batch: int, seq: int):
  """A no-arg callable running one transformers DeepseekV3ForCausalLM train step (AdamW)."""
  import torch
  import transformers
  from kimi_vl_jax.convert.hf_lm import hf_config_from_lm
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  hf_cfg = transformers.DeepseekV3Config(**hf_config_from_lm(cfg))
  model = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  data = torch.as_tensor(_batch(cfg, batch, seq), dtype=torch.long)
  inputs, labels = data[:, :-1], data[:, 1:]

  def run():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return run


# ------------------------------------------------------------------------------- moe layer


def make_moe_layer(cfg, experts: int, batch: int, seq: int):
  """A no-arg callable running fwd+bwd of one MoEBlock with ``experts`` routed experts."""
  from kimi_vl_jax.models.moe import MoEBlock
  import flax.linen as nn
  c = cfg.copy_and_resolve_references()
  c.n_routed_experts = experts
  c.n_group, c.topk_group = 1, 1
  block = MoEBlock(FrozenConfigDict(c))
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, seq, c.hidden_size), jnp.float32)
  seg = jnp.ones((batch, seq), jnp.int32)
  variables = nn.unbox(jax.jit(block.init)(jax.random.PRNGKey(1), x, seg))

  @jax.jit
  def fwd_bwd(params, x):
    def loss(p, x):
      y, _ = block.apply({'params': p, 'router': variables['router']}, x, seg)
      return jnp.sum(y * y)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  return lambda: jax.block_until_ready(fwd_bwd(variables['params'], x))


# ------------------------------------------------------------------------------- attention


def attention_peak_bytes(cfg, seq: int, batch: int = 1) -> int:
  """Compiled peak bytes (args + outputs + temps) of xla attention fwd+bwd at length ``seq``."""
  from kimi_vl_jax.ops.attention import attention
  h = cfg.num_attention_heads
  dqk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  q = jax.ShapeDtypeStruct((batch, seq, h, dqk), jnp.float32)
  v = jax.ShapeDtypeStruct((batch, seq, h, cfg.v_head_dim), jnp.float32)
  seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(q, k, v, seg):
    o = attention(q, k, v, seg, causal=True, backend='xla', block_size=cfg.attention_block_size)
    return jnp.sum(o * o)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, v, seg).compile()
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='bench')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--steps', type=int, default=5)
  # Untimed steps first: compile, then the process heap growing to the step's working set
  # (with cpu_runtime.setup the first ~3 steps still fault in new pages; later ones reuse them).
  parser.add_argument('--warmup', type=int, default=4)
  parser.add_argument('--skip_torch', action='store_true')
  args = parser.parse_args(argv)

  cfg = get_preset(args.preset).lm
  cfg.dtype = cfg.param_dtype = 'float32'
  cfg.attention_backend = 'xla'
  tokens = args.batch * args.seq
  print(f'backend={jax.default_backend()} devices={jax.device_count()} cores={os.cpu_count()} '
        f'preset={args.preset} batch={args.batch}x{args.seq} moe_backend={cfg.moe_backend}')

  # The host may be shared, so the matmul peak, the JAX step and the torch step are timed in
  # alternating rounds (each sees the same background load) and the medians are compared.
  peak_fn = make_matmul_peak()
  jax_step = make_jax_train_step(cfg, args.batch, args.seq)
  torch_step = None if args.skip_torch else make_torch_train_step(cfg, args.batch, args.seq)
  for _ in range(args.warmup):
    jax_step()
    if torch_step:
      torch_step()
  peaks, t_jaxs, t_torchs = [], [], []
  for _ in range(args.steps):
    peaks.append(peak_fn())
    t_jaxs.append(_timed(jax_step))
    if torch_step:
      t_torchs.append(_timed(torch_step))
  peak, t_jax = float(np.median(peaks)), float(np.median(t_jaxs))
  t_torch = float(np.median(t_torchs)) if t_torchs else float('nan')
  flops = train_flops(cfg, args.batch, args.seq)
  mfu = flops / t_jax / peak
  print(f'matmul peak (fp32 1024^3, median over rounds of best-of-5): {peak / 1e9:.1f} GFLOP/s '
        f'(rounds: {", ".join(f"{p / 1e9:.0f}" for p in peaks)})')
  print(f'JAX   train step: {t_jax * 1e3:8.1f} ms  {tokens / t_jax:9.0f} tokens/s  '
        f'{flops / t_jax / 1e9:.1f} GFLOP/s  MFU {100 * mfu:.1f}% '
        f'(N_active matmul params {active_matmul_params(cfg) / 1e6:.2f}M, {flops / 1e9:.1f} GFLOP/step; '
        f'rounds ms: {", ".join(f"{t * 1e3:.0f}" for t in t_jaxs)})')
  if torch_step:
    print(f'torch train step: {t_torch * 1e3:8.1f} ms  {tokens / t_torch:9.0f} tokens/s  '
          f'(rounds ms: {", ".join(f"{t * 1e3:.0f}" for t in t_torchs)})')
  speedup = t_torch / t_jax
  torch_mfu = flops / t_torch / peak
  print(f'speedup JAX vs torch: {speedup:.2f}x (target >= 2x); MFU {100 * mfu:.1f}% (target >= 50%)')
  if torch_step:
    print(f'torch MFU {100 * torch_mfu:.1f}%: 2x torch would take {200 * torch_mfu:.1f}% MFU')

  rounds64, rounds8 = _alternating_times(
      [make_moe_layer(cfg, e, args.batch, args.seq) for e in (64, 8)], 2 * args.steps, args.warmup)
  t64, t8 = float(np.median(rounds64)), float(np.median(rounds8))
  # Per-round ratios show this host's noise next to the ratio of the medians.
  round_ratios = [a / b for a, b in zip(rounds64, rounds8)]
  print(f'MoE layer fwd+bwd: 64 experts {t64 * 1e3:.1f} ms, 8 experts {t8 * 1e3:.1f} ms, '
        f'ratio {t64 / t8:.2f} (target <= 1.5; per round: '
        f'{", ".join(f"{r:.2f}" for r in round_ratios)})')

  m8 = attention_peak_bytes(cfg, 8192)
  m16 = attention_peak_bytes(cfg, 16384)
  print(f'xla attention fwd+bwd peak memory: S=8192 {m8 / 2**20:.1f} MiB, S=16384 '
        f'{m16 / 2**20:.1f} MiB, ratio {m16 / m8:.2f} (target <= 2.5)')

  result = {'jax_tokens_per_s': tokens / t_jax, 'torch_tokens_per_s': tokens / t_torch,
            'speedup_vs_torch': speedup, 'mfu': mfu, 'matmul_peak_gflops': peak / 1e9,
            'torch_mfu': torch_mfu, 'mfu_needed_for_2x': 2 * torch_mfu,
            'moe_time_ratio_64_vs_8': t64 / t8,
            'moe_time_ratio_rounds': [round(r, 3) for r in round_ratios],
            'attn_peak_mem_ratio_16k_vs_8k': m16 / m8}
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  from kimi_vl_jax import cpu_runtime
  print('cpu runtime:', cpu_runtime.setup())   # before the first computation
  main()
