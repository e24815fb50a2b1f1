"""Muon vs AdamW on the MoE LM ``bench`` preset: train-step time and loss after a budget.

``python -m kimi_vl_jax.bench.optim [--steps 30] [--batch 4] [--seq_len 64]
[--lrs 1e-3,3e-3,1e-2] [--time_batch 4] [--time_seq_len 512] [--time_reps 5]
[--png optim_curves.png] [--ns_dtype bfloat16|float32]``

One run measures, side by side on the same devices:

1. Step time: the full jitted train step (forward, backward, grad clip, optimizer update,
   router-bias update; params, router and optimizer state donated) with Muon and with AdamW,
   alternating A/M/A/M over ``--time_reps`` repetitions on one fixed batch of
   ``--time_batch`` x ``--time_seq_len`` tokens (default 4 x 512, the LM issue's bench
   batch); the median per optimizer gives ``muon_step_time_ratio_vs_adamw`` (target
   <= 1.15). Every timed call starts from the same state (a fresh copy, made outside the
   timer, of the state after one warm step), so both optimizers time the same forward and
   backward work: chaining the steps lets the two runs' parameters, and with them the MoE
   routing and its dropless capacities, drift apart, which moved the ratio by +-0.06.
   Muon's Newton-Schulz work is fixed per step (~75 GFLOP here, 60 of them the 3 MoE
   layers x 64 experts x 3 matrices of 128 x 256), while the model's work grows with
   tokens, so the ratio falls as tokens per step grow.
2. Quality: for each optimizer and each lr of the 3-point sweep ``--lrs``, ``--steps`` steps
   from the same init on the same stream of generated text (``data.generated`` 'text'
   documents, UTF-8 byte tokens, so ids < 256 of the 8192 vocab), warmup 10% + cosine to
   0.1 lr, wd 0.1; then the mean next-token cross-entropy on 8 held-out batches of the
   eval split. Each optimizer's best lr gives its final loss (target: Muon <= AdamW).
   The budget is kept small for 2 CPU cores: short sequences (64 tokens) and 30 steps.
   One compile per optimizer and shape: the schedule's peak is 1 and the lr enters as an
   argument (every update is linear in lr, decoupled weight decay included).
   ``--steps 0`` measures the step time only (e.g. at a larger ``--time_batch``).

Training-loss curves (EMA over 5 steps) of every run go to ``--png``. The last line printed
is one JSON object with ``muon_step_time_ratio_vs_adamw``, ``muon_final_loss``,
``adamw_final_loss``, ``muon_best_lr``, ``adamw_best_lr``, ``muon_update_rms`` (the RMS of
Muon's pre-lr direction at the end of the best run; ~0.2 by design) and the raw figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import FrozenConfigDict

from kimi_vl_jax.config import base_config
from kimi_vl_jax.data import generated
from kimi_vl_jax.models.lm import MoeLM
from kimi_vl_jax.bench.lm import make_matmul_peak
from kimi_vl_jax.models.moe import update_router_bias
from kimi_vl_jax.optim import build_optimizer
from kimi_vl_jax.optim import routes as routes_lib

EVAL_BATCHES = 8


def text_batches(split: str, n: int, batch: int, seq_len: int, start: int = 0) -> np.ndarray:
  """[n, batch, seq_len + 1] int32 byte tokens of consecutive generated documents."""
  ds = generated.get_dataset('text', split, 0)
  need = n * batch * (seq_len + 1)
  buf, i = bytearray(), start
  while len(buf) < need:
    buf += ds[i]['items'][0]['text'].encode('utf-8') + b'\n\n'
    i += 1
  return np.frombuffer(bytes(buf[:need]), np.uint8).astype(np.int32).reshape(n, batch, seq_len + 1)


def next_token_loss(model, params, router, tokens_bs1):
  tokens, targets = tokens_bs1[:, :-1], tokens_bs1[:, 1:]
  seg = jnp.ones_like(tokens)
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, aux = model.apply({'params': params, 'router': router}, tokens, seg, pos)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.mean(ce), aux


def make_step(model, tx, clip: float, bias_rate: float):
  """(chained tx, jitted step). The step donates params, router and optimizer state (as a
  trainer does), so both optimizers update in place; pass ``fresh`` copies of reused trees."""
  tx = optax.chain(optax.clip_by_global_norm(clip), tx)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, router, opt_state, tokens, lr):
    (loss, aux), grads = jax.value_and_grad(
        lambda p: next_token_loss(model, p, router, tokens), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
    router = update_router_bias(router, aux['load_le'], bias_rate)
    return params, router, opt_state, loss

  return tx, step


def fresh(tree):
  """A copy of ``tree``'s arrays, to hand to a step that donates its inputs."""
  return jax.tree.map(jnp.copy, tree)


def time_steps(step_fns: dict, states: dict, args: tuple, reps: int, warmup: int = 1) -> dict:
  """Seconds per call of each ``step_fns[name](*states[name], *args)``, ``reps`` times each.

  Calls alternate between the names (shared-host fairness), after ``warmup`` untimed rounds
  (the first calls after compiling run ~30% slow here). Each call gets a fresh copy of its
  starting state, made and materialized outside the timer (the steps donate their inputs),
  so every call does the same work whatever the previous one returned.
  """
  times = {n: [] for n in step_fns}
  for rep in range(warmup + reps):
    for name, step in step_fns.items():
      state = jax.block_until_ready(fresh(states[name]))
      t0 = time.perf_counter()
      jax.block_until_ready(step(*state, *args))
      if rep >= warmup:
        times[name].append(time.perf_counter() - t0)
  return times


def newton_schulz_flops(boxed_params, ns_steps: int) -> int:
  """FLOPs of one Muon update's Newton-Schulz iterations over every Muon matrix of the model.

  Per matrix of shape (A, B), with m = min(A, B) and n = max(A, B) (the wide orientation), one
  iteration is X X^T (2 m^2 n), S^2 (2 m^3) and poly(S) X (2 m^2 n); stacks count per matrix.
  """
  total = 0
  for r in jax.tree.leaves(routes_lib.route_params(boxed_params),
                           is_leaf=lambda x: isinstance(x, routes_lib.Route)):
    if r.treatment != 'muon':
      continue
    m, n = sorted(r.matrix_shape)
    count = int(np.prod([r.shape[a] for a in r.batch])) if r.batch else 1
    total += ns_steps * count * (4 * m * m * n + 2 * m ** 3)
  return total


def optim_cfg(name: str, steps: int, ns_dtype: str):
  c = base_config('bench').optim
  c.name, c.lr, c.weight_decay, c.ns_dtype = name, 1.0, 0.1, ns_dtype
  c.warmup_steps, c.schedule, c.end_lr_ratio = max(steps // 10, 1), 'cosine', 0.1
  return c


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=30)
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--seq_len', type=int, default=64)
  ap.add_argument('--lrs', default='1e-3,3e-3,1e-2')
  ap.add_argument('--time_batch', type=int, default=4)
  ap.add_argument('--time_seq_len', type=int, default=512)
  ap.add_argument('--time_reps', type=int, default=5)
  ap.add_argument('--png', default='optim_curves.png')
  ap.add_argument('--ns_dtype', default=base_config('bench').optim.ns_dtype,
                  choices=('float32', 'bfloat16'),
                  help="Muon's Newton-Schulz operand dtype (default: the config's)")
  args = ap.parse_args(argv)
  lrs = [float(x) for x in args.lrs.split(',')]
  t_start = time.perf_counter()

  lm_cfg = FrozenConfigDict(base_config('bench').model.lm)
  model = MoeLM(lm_cfg)
  init_tokens = jnp.ones((1, args.seq_len), jnp.int32)
  variables = jax.jit(lambda k: model.init(
      k, init_tokens, init_tokens, jnp.arange(args.seq_len, dtype=jnp.int32)[None]))(
          jax.random.key(0))
  boxed = variables['params']
  params0, router0 = nn.unbox(boxed), nn.unbox(variables['router'])
  train = text_batches('train', max(args.steps, 1), args.batch, args.seq_len)
  held_out = text_batches('eval', EVAL_BATCHES, args.batch, args.seq_len)
  timing = text_batches('train', 1, args.time_batch, args.time_seq_len, start=10_000)[0]
  eval_fn = jax.jit(lambda p, r, t: next_token_loss(model, p, r, t)[0])

  steps_fns, opt_states = {}, {}
  for name in ('adamw', 'muon'):
    tx = build_optimizer(optim_cfg(name, args.steps, args.ns_dtype), boxed, total_steps=max(args.steps, 2))
    chained, step = make_step(model, tx, clip=1.0, bias_rate=lm_cfg.router_bias_update_rate)
    steps_fns[name], opt_states[name] = step, chained.init(params0)

  # 1. Step time, alternating the two optimizers on one batch (after a compile + warm step).
  warm = {n: steps_fns[n](*fresh((params0, router0, opt_states[n])), timing, 1e-3)[:3]
          for n in ('adamw', 'muon')}   # compiles; optimizer state past its zero init
  times = time_steps(steps_fns, warm, (timing, 1e-3), args.time_reps)
  print('step times (ms): ' + ', '.join(
      f'{n} ' + ' '.join(f'{t * 1e3:.0f}' for t in v) for n, v in times.items()), flush=True)
  step_s = {n: statistics.median(v) for n, v in times.items()}
  ratio = step_s['muon'] / step_s['adamw']
  peak_flops = make_matmul_peak(dtype=jnp.dtype(args.ns_dtype))()
  ns_flops = newton_schulz_flops(boxed, base_config('bench').optim.ns_steps)
  floor = (step_s['adamw'] + ns_flops / peak_flops) / step_s['adamw']
  print(f'step time ({args.time_batch}x{args.time_seq_len} tokens, median of {args.time_reps}): '
        f'adamw {step_s["adamw"] * 1e3:.0f} ms, muon {step_s["muon"] * 1e3:.0f} ms, '
        f'ratio {ratio:.3f}', flush=True)
  print(f'Newton-Schulz ({args.ns_dtype}): {ns_flops / 1e9:.1f} GFLOP/step; at the measured '
        f'{args.ns_dtype} matmul peak of '
        f'{peak_flops / 1e9:.0f} GFLOP/s it alone takes {ns_flops / peak_flops * 1e3:.0f} ms: '
        f'ratio floor {floor:.3f}', flush=True)

  # 2. Loss after a fixed budget, 3-point lr sweep per optimizer (--steps 0: timing only).
  curves, final, update_rms = {}, {}, {}
  for name in ('adamw', 'muon') if args.steps else ():
    for lr in lrs:
      params, router, opt_state = fresh((params0, router0, opt_states[name]))
      losses = []
      for i in range(args.steps):
        params, router, opt_state, loss = steps_fns[name](params, router, opt_state, train[i], lr)
        losses.append(loss)
      losses = [float(x) for x in jax.device_get(losses)]
      ev = float(np.mean([float(eval_fn(params, router, held_out[j])) for j in range(EVAL_BATCHES)]))
      curves[(name, lr)], final[(name, lr)] = losses, ev
      # RMS of the last pre-lr direction per group (Muon's is ~0.2 by design).
      rms = {k: float(v) for k, v in opt_state[1].update_rms.items()}
      update_rms[(name, lr)] = rms
      print(f'{name:5s} lr {lr:.0e}: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, '
            f'held-out loss {ev:.4f}, update rms muon {rms["muon"]:.3f} '
            f'adamw {rms["adamw"]:.3f}', flush=True)
  best = {n: min(lrs, key=lambda lr: final[(n, lr)]) if final else None for n in ('adamw', 'muon')}
  if final:
    _plot(curves, best, args.png)

  result = {
      'muon_step_time_ratio_vs_adamw': round(ratio, 4),
      'muon_final_loss': round(final[('muon', best['muon'])], 4) if final else None,
      'adamw_final_loss': round(final[('adamw', best['adamw'])], 4) if final else None,
      'muon_best_lr': best['muon'], 'adamw_best_lr': best['adamw'],
      'muon_update_rms': round(update_rms[('muon', best['muon'])]['muon'], 4) if final else None,
      'muon_step_ms': round(step_s['muon'] * 1e3, 1), 'adamw_step_ms': round(step_s['adamw'] * 1e3, 1),
      'muon_ratio_floor_at_peak': round(floor, 4), 'ns_gflop_per_step': round(ns_flops / 1e9, 2),
      'matmul_peak_gflops': round(peak_flops / 1e9, 1), 'ns_dtype': args.ns_dtype,
      'time_tokens_per_step': args.time_batch * args.time_seq_len,
      'train_tokens_per_step': args.batch * args.seq_len, 'steps': args.steps,
      'sweep': {f'{n}@{lr:g}': round(v, 4) for (n, lr), v in final.items()},
      'png': args.png if final else None, 'devices': f'{jax.device_count()}x{jax.devices()[0].platform}',
      'wall_s': round(time.perf_counter() - t_start, 1),
  }
  print(json.dumps(result), flush=True)
  return result


def _plot(curves, best, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {'adamw': 'tab:blue', 'muon': 'tab:red'}
  for (name, lr), losses in curves.items():
    ema, smooth = losses[0], []
    for x in losses:
      ema = 0.8 * ema + 0.2 * x
      smooth.append(ema)
    is_best = best[name] == lr
    ax.plot(smooth, color=colors[name], alpha=1.0 if is_best else 0.3,
            lw=2 if is_best else 1, label=f'{name} lr={lr:g}' + (' (best)' if is_best else ''))
  ax.set_xlabel('step')
  ax.set_ylabel('train loss (EMA)')
  ax.set_title('MoE LM bench preset: Muon vs AdamW')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  from kimi_vl_jax import cpu_runtime
  print('cpu runtime:', cpu_runtime.setup())   # before the first computation
  main()
