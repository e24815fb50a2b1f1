"""MoE layer micro-benchmark: forward + backward time of one ``MoEBlock`` per expert backend.

    python -m kimi_vl_jax.bench.moe [--backends=capacity,dense,ragged] [--repeats=5]

Uses the ``bench`` preset's MoE dims (hidden 256, expert width 128, top-6, 2 shared experts,
batch 4 x 512 tokens, fp32) and times, side by side in one process, the layer with 64 and with
8 routed experts (same top-k and width), so their ratio shows whether cost follows the active
experts (target <= 1.5x) rather than all experts. It also measures a plain matmul peak on this
machine and reports the layer's useful FLOP rate against it. Timings interleave the variants
and keep the best of ``repeats`` runs, so background load hits all of them alike.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import FrozenConfigDict

from kimi_vl_jax.bench.lm import make_matmul_peak
from kimi_vl_jax.config.presets import get_preset
from kimi_vl_jax.models.moe import MoEBlock
from kimi_vl_jax.ops.moe_dispatch import resolve_backend


def moe_config(num_experts: int, backend: str = 'auto', *, preset: str = 'bench',
               capacity_factor: Optional[float] = None, dtype: str = 'float32') -> FrozenConfigDict:
  """The preset's LM block with ``num_experts`` routed experts and the given backend."""
  lm = get_preset(preset).lm
  lm.n_routed_experts = num_experts
  lm.n_group, lm.topk_group = 1, 1
  lm.moe_backend = backend
  lm.dtype = dtype
  if capacity_factor is not None:
    lm.moe_capacity_factor = capacity_factor
  return FrozenConfigDict(lm)


def moe_layer_flops(cfg, tokens: int) -> float:
  """Useful FLOPs of one forward + backward (3x forward) of the layer: router, top-k experts,
  shared experts. Padding rows, capacity slack and the unused experts do not count."""
  d, f = cfg.hidden_size, cfg.moe_intermediate_size
  fwd = 2 * tokens * d * cfg.n_routed_experts                       # router
  fwd += 2 * tokens * cfg.num_experts_per_tok * 3 * d * f           # routed SwiGLU
  fwd += 2 * tokens * 3 * d * f * cfg.n_shared_experts              # shared SwiGLU
  return 3.0 * fwd


def build_moe_step(num_experts: int, backend: str = 'auto', *, preset: str = 'bench',
                   batch: int = 4, seq: int = 512, capacity_factor: Optional[float] = None,
                   dtype: str = 'float32', seed: int = 0) -> Callable[[], dict]:
  """A compiled forward+backward of one MoEBlock on random inputs; returns a zero-arg runner.

  The runner executes one step, blocks until it is done, and returns the layer's aux dict.
  """
  cfg = moe_config(num_experts, backend, preset=preset, capacity_factor=capacity_factor,
                   dtype=dtype)
  block = MoEBlock(cfg)
  kx, kp = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (batch, seq, cfg.hidden_size), jnp.dtype(dtype))
  seg = jnp.ones((batch, seq), jnp.int32)
  variables = nn.unbox(block.init(kp, x, seg))
  params, router = variables['params'], {'router': variables['router']}

  def loss(p, x):
    y, aux = block.apply({'params': p, **router}, x, seg)
    return jnp.mean(jnp.square(y.astype(jnp.float32))), aux

  step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

  def run():
    grads, aux = step(params, x)
    jax.block_until_ready(grads)
    return aux

  run()   # compile + warm up
  return run


def _best_times(runners: dict, repeats: int) -> dict:
  best = {name: float('inf') for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run()
      best[name] = min(best[name], time.perf_counter() - t0)
  return best


def time_moe_layer(num_experts: int, backend: str = 'auto', *, repeats: int = 5, **kwargs) -> float:
  """Best-of-``repeats`` seconds of one MoE layer forward+backward (kwargs: build_moe_step's)."""
  run = build_moe_step(num_experts, backend, **kwargs)
  return _best_times({'x': run}, repeats)['x']


def compare_expert_counts(backend: str = 'auto', counts=(64, 8), *, repeats: int = 5,
                          **kwargs) -> dict:
  """Seconds per forward+backward for each expert count, timed interleaved in one process."""
  runners = {e: build_moe_step(e, backend, **kwargs) for e in counts}
  return _best_times(runners, repeats)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backends', default='capacity,dense,ragged')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--preset', default='bench')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--slow_repeats', type=int, default=1,
                      help='repeats for backends that compute every expert (dense, ragged on CPU)')
  args = parser.parse_args(argv)
  platform = jax.default_backend()
  tokens = args.batch * args.seq
  shape = dict(batch=args.batch, seq=args.seq, preset=args.preset)
  peak = make_matmul_peak()()
  print(f'platform {platform}; matmul peak {peak / 1e9:.1f} GFLOP/s; tokens {tokens}')
  result = {'platform': platform, 'matmul_peak_gflops': round(peak / 1e9, 2)}
  for backend in [b.strip() for b in args.backends.split(',') if b.strip()]:
    slow = backend == 'dense' or (backend == 'ragged' and platform == 'cpu')
    times = compare_expert_counts(backend, (64, 8), repeats=args.slow_repeats if slow else args.repeats,
                                  **shape)
    ratio = times[64] / times[8]
    flops = moe_layer_flops(moe_config(64, preset=args.preset), tokens)
    mfu = flops / times[64] / peak
    print(f'{backend:9s} ({resolve_backend(backend)}): 64 experts {times[64] * 1e3:8.1f} ms, '
          f'8 experts {times[8] * 1e3:8.1f} ms, ratio {ratio:5.2f}, '
          f'64-expert layer at {mfu * 100:5.1f}% of matmul peak')
    result[f'{backend}_ms_64'] = round(times[64] * 1e3, 2)
    result[f'{backend}_ms_8'] = round(times[8] * 1e3, 2)
    result[f'{backend}_ratio_64_vs_8'] = round(ratio, 3)
    result[f'{backend}_mfu_64'] = round(mfu, 4)
  default = resolve_backend('auto')
  for key in (f'{default}_ratio_64_vs_8', 'auto_ratio_64_vs_8'):
    if key in result:   # the ratio of the backend 'auto' picks on this platform
      result['moe_time_ratio_64_vs_8'] = result[key]
      break
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  from kimi_vl_jax import cpu_runtime
  print('cpu runtime:', cpu_runtime.setup())   # before the first computation
  main()
