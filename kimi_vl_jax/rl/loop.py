"""The RL stage (SPEC §5, Kimi k1.5 online policy mirror descent): iterations of
sample -> score -> update -> reset.

Iteration i (``stage.steps`` iterations in all):
1. ``sampling.ProblemSampler`` picks P = global_batch / k problems of the pool
   (``rollout.ProblemPool``: the user problems of ``rl.problems`` (``rl/problems.py``), else
   generated ones of ``rl.dataset`` / ``rl.tasks``; at ``rl.difficulties``), by
   ``rl.sampling`` (uniform, curriculum easy-to-hard, or prioritized by 1 - success rate).
2. The current policy pi_i samples k = ``rl.samples_per_prompt`` responses per problem
   (``evaluate.make_decoder``: KV-cache decoding at ``rl.temperature`` / ``rl.top_p``, at most
   ``rl.max_response_tokens``); the problem's verifier scores each (``scoring.is_correct``).
   With ``rl.partial_rollout_tokens`` > 0 (partial rollouts, ``rl/partial.py``) an iteration
   decodes at most that many tokens a row: groups with unfinished responses wait and continue
   next iteration, ahead of fresh problems, and only groups whose k responses all ended go on
   to steps 3-5 (none: the iteration only decodes).
3. Rewards: correct (0/1) plus ``rl.length_penalty_weight`` x the length penalty among the k
   responses, from iteration ``rl.length_penalty_warmup`` on (``rewards.shaped_rewards``);
   advantage = reward - the mean of its k.
4. pi_i is the reference: each row's sequence log-probability under it is computed once, then
   ``rl.updates_per_iteration`` train steps minimize the mirror-descent loss (``rl/task.py``)
   with the stage's optimizer, microbatches and clipping (``step.make_train_step``).
5. The optimizer state is re-initialized (jitted, sharded ``opt.init``); the sampler records
   the successes.

Metrics per iteration (``<workdir>/rl/metrics.jsonl``): reward, accuracy, response length,
finished share, loss, log ratio, decoded rows, completed and waiting groups; the stage
checkpoint keeps the sampler's statistics and the waiting groups, so a resumed stage continues
where it stopped. Evals (``stage.block.eval``) run as in other stages.

Multi-process jobs (``jax.distributed``): every process computes the same host-side rollout
data (pool, sampler and its seed, tokenizer, prompt and training rows are deterministic), turns
it into global arrays (``sharding.make_global_batch_from_full``: each process supplies the rows
its devices hold), runs the decoder, reference log-probs and train steps sharded over the
global mesh, and all-gathers the device results it reads on the host
(``sharding.gather_to_host``), so every process scores the same responses and updates the
sampler identically. Only process 0 writes metrics and reports (``MetricsWriter``,
``loop.stage_report``); Orbax coordinates the checkpoint, whose sampler statistics (a JSON
item) are the same on every process by that determinism.
"""
from __future__ import annotations

import dataclasses
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kimi_vl_jax.data import image_processor as ip
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.metrics.writer import MetricsWriter
from kimi_vl_jax.parallel import sharding as shard_lib
from kimi_vl_jax.rl import partial as partial_lib
from kimi_vl_jax.rl import rewards as rewards_lib
from kimi_vl_jax.rl import rollout as rollout_lib
from kimi_vl_jax.rl.sampling import ProblemSampler
from kimi_vl_jax.rl.task import rl_task, sequence_logp
from kimi_vl_jax.train import checkpoint as ckpt_lib, evaluate, stages as stages_lib
from kimi_vl_jax.train import state as state_lib, step as step_lib, tasks as tasks_lib


def _dp(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp', 'expert')]))


@dataclasses.dataclass
class RLPrograms:
  """An RL stage's model and jitted programs (``prepare_rl``)."""
  base_stage: stages_lib.Stage   # the stage with the policy's own task (for evals)
  base: step_lib.Task             # the policy's task (lm or kimi_vl)
  task: step_lib.Task             # the RL task: base's model, the mirror-descent loss
  opt: object
  shardings: object               # the train state's
  rng: jax.Array
  step_fn: object                 # the unjitted train step (``step.make_train_step``)
  step_cfg: step_lib.StepConfig
  train_step: object              # loop._LazyJit of step_fn
  reinit: object                  # jitted, sharded optimizer re-init
  decode: object                  # jitted sampler: budget (or max_response_tokens) new tokens
  ref_logp: object                # jitted per-row sequence log-prob under given params
  decode_tokens: int              # new tokens one decode call produces


def prepare_rl(config, stage: stages_lib.Stage, mesh, stop_id: int, media_pad_id: int
               ) -> RLPrograms:
  """The RL stage's tasks, optimizer, shardings and programs, as ``run_rl_stage`` runs them
  and ``train/aot.py`` compiles them (nothing is traced or allocated here)."""
  from kimi_vl_jax.train import loop as loop_lib        # shared stage helpers
  from kimi_vl_jax.optim import build_optimizer
  rl, t = config.rl, config.train
  base_stage = dataclasses.replace(stage, task=rl.model)
  base = loop_lib.build_task(config, base_stage, (), media_pad_id)
  task = rl_task(base, t, float(rl.tau))
  updates = int(rl.updates_per_iteration)
  rng = jax.random.PRNGKey(t.seed + 1000 * stage.index)
  abstract = state_lib.abstract_variables(task.init, rng)
  opt = build_optimizer(stage.optim, abstract['params'], mesh, trainable=stage.trainable or None,
                        total_steps=stage.steps * updates)
  sh = state_lib.state_shardings(abstract, opt, mesh)
  mask = (stages_lib.trainable_mask(nn.unbox(abstract)['params'], stage.trainable)
          if stage.trainable else None)
  step_cfg = step_lib.StepConfig(microbatches=stage.microbatches, grad_clip_norm=t.grad_clip_norm,
                                 router_bias_rate=stage.router_bias_rate,
                                 param_cast_dtype=t.param_cast_dtype)
  step_fn = step_lib.make_train_step(task, opt, step_cfg, mask)
  train_step = loop_lib._LazyJit(step_fn, sh, mesh, step_lib.step_hparams(opt, step_cfg))
  reinit = jax.jit(opt.init, out_shardings=sh.opt_state)
  # Partial rollouts decode rl.partial_rollout_tokens an iteration; else the whole response.
  new_tokens = int(rl.get('partial_rollout_tokens', 0)) or int(rl.max_response_tokens)
  decode = jax.jit(evaluate.make_decoder(base, new_tokens, stop_id, float(rl.temperature),
                                         float(rl.top_p)))
  vocab_chunk, token_chunk = int(t.get('loss_vocab_chunk', 0)), int(t.get('loss_token_chunk', 0))
  ref_logp = jax.jit(lambda p, e, b: sequence_logp(base, p, e, b, vocab_chunk, token_chunk)[0])
  return RLPrograms(base_stage, base, task, opt, sh, rng, step_fn, step_cfg, train_step, reinit,
                    decode, ref_logp, new_tokens)


def run_rl_stage(config, stage: stages_lib.Stage, workdir: str, mesh, preempt,
                 evaluator=None) -> dict:
  """Runs (or resumes) the RL stage; returns its summary (``{'interrupted': True}`` on SIGTERM)."""
  from kimi_vl_jax.train import loop as loop_lib        # shared stage helpers
  from kimi_vl_jax.data.tokenizer import load_or_train
  rl, t = config.rl, config.train
  ck = ckpt_lib.StageCheckpoints(workdir, stage.name, keep=t.keep_checkpoints,
                                 async_save=t.async_checkpoints)
  meta = ck.read_meta()
  if meta and meta.get('complete'):
    ck.close()
    return meta.get('summary', {})
  # The pool first: a bad problem line or a pool too small for the batch fails before any
  # compile.
  try:
    pool = rollout_lib.ProblemPool.from_config(config)
    pool.check_fits(stage.name, stage.global_batch, int(rl.samples_per_prompt))
  except Exception:
    ck.close()
    raise

  tok = load_or_train(config.data.tokenizer, config.model.lm.vocab_size, config.data.tokenizer_cache)
  image_cfg = ip.ImageProcessorConfig.from_vision_config(config.model.vision,
                                                         config.data.in_token_limit)
  stop_id = tok.token_id(st.IM_END)
  progs = prepare_rl(config, stage, mesh, stop_id, tok.token_id(st.MEDIA_PAD))
  base_stage, base, task, opt, sh, rng = (progs.base_stage, progs.base, progs.task, progs.opt,
                                          progs.shardings, progs.rng)
  train_step, reinit, decode, ref_logp = (progs.train_step, progs.reinit, progs.decode,
                                          progs.ref_logp)
  k, updates = int(rl.samples_per_prompt), int(rl.updates_per_iteration)
  max_new = int(rl.max_response_tokens)
  budget = int(rl.get('partial_rollout_tokens', 0))   # 0: whole responses in one iteration

  sampler = ProblemSampler(pool.difficulty, rl.sampling, seed=t.seed)
  buffer = partial_lib.RolloutBuffer()
  # The stage checkpoint's data item: the sampler's record and the groups still waiting.
  stage_data = lambda: {**sampler.get_state(), 'partial_rollouts': buffer.get_state()}
  start = 0
  if ck.latest_step() is not None:
    target = state_lib.abstract_state(sh, lambda: state_lib.create_state(
        *state_lib.split_variables(nn.unbox(task.init(rng))), opt, rng))
    state, meta, data_state = ck.restore(target)
    start = int(meta['step'])
    sampler.set_state({k_: v for k_, v in (data_state or {}).items() if k_ != 'partial_rollouts'})
    buffer.set_state((data_state or {}).get('partial_rollouts'))
    logging.info('stage %s: resumed at iteration %d', stage.name, start)
  else:
    prev = loop_lib._prev_params(config, workdir, stage)
    state, _ = loop_lib._init_state(task, opt, sh, rng, prev)

  patches = stage.patches_per_row if rl.model == 'kimi_vl' else 0
  problems_per_iter = stage.global_batch // k
  stage_dir = os.path.join(workdir, stage.name)
  writer = MetricsWriter(stage_dir, total_steps=stage.steps, tensorboard=config.metrics.tensorboard,
                         progress=config.metrics.progress, prefix='')
  t0, last, eval_results = time.time(), {}, {}
  tokens_seen = int(meta.get('tokens_seen', 0)) if start else 0
  meta_of = lambda i, complete=False: {'stage': stage.name, 'step': i, 'complete': complete,
                                       'tokens_seen': tokens_seen}
  try:
    for it in range(start, stage.steps):
      key = jax.random.fold_in(rng, it)
      if budget:
        idx, roll, decoded = _partial_rollout(
            buffer, lambda n: sampler.sample(n, it, stage.steps), pool, k, problems_per_iter,
            tok, image_cfg, stage.seq_len, max_new, budget, patches, stop_id, state, decode,
            key, mesh)
      else:
        idx = sampler.sample(problems_per_iter, it, stage.steps)
        problems = [pool.records[i] for i in idx]
        prompts, rows = rollout_lib.prompt_rows(problems, k, tok, image_cfg, stage.seq_len,
                                                max_new, patches)
        new = _decode(decode, state, rows, key, mesh)
        roll = rollout_lib.collect(problems, k, prompts, new, tok, stop_id)
        decoded = len(prompts)
      carry = {'decode_rows': float(decoded), 'waiting_groups': float(len(buffer.groups))}
      if roll is None:
        # Every group in flight still has unfinished samples: nothing to score or train on.
        row = {**carry, 'completed_groups': 0.0}
      else:
        active = it >= int(rl.length_penalty_warmup)
        reward = np.asarray(rewards_lib.shaped_rewards(
            jnp.asarray(roll.correct), jnp.asarray(roll.lengths),
            float(rl.length_penalty_weight), active))
        adv = reward - reward.mean(axis=1, keepdims=True)
        host = rollout_lib.training_rows(roll, stage.seq_len, patches, stage.global_batch)
        batch = shard_lib.make_global_batch_from_full(host, mesh)
        with shard_lib.activation_context(mesh):
          ref = shard_lib.gather_to_host(ref_logp(state.params, state.extra, batch))
        host['rl_ref_logp'] = ref.astype(np.float32)
        host['rl_advantage'] = np.zeros((stage.global_batch,), np.float32)
        host['rl_advantage'][:adv.size] = adv.reshape(-1)
        batch = shard_lib.make_global_batch_from_full(host, mesh)
        tokens_seen += tasks_lib.host_batch_tokens(host) * updates   # host: the whole batch
        for _ in range(updates):
          state, metrics = train_step(state, batch)
        state = state.replace(opt_state=reinit(state.params))      # pi_{i+1}: fresh optimizer
        sampler.update(np.repeat(idx, k), roll.correct.reshape(-1))
        m = {k_: float(v) for k_, v in shard_lib.gather_to_host(metrics).items() if np.ndim(v) == 0}
        if m['nonfinite_run'] >= t.max_consecutive_nonfinite:
          raise loop_lib.NonFiniteError(
              f'stage {stage.name}: {int(m["nonfinite_run"])} consecutive non-finite updates '
              f'ending in iteration {it + 1}; parameters were not updated by them; last '
              f'checkpoint: {ck.latest_step()}')
        last = {'loss': m['loss'], 'reward': float(reward.mean()),
                'accuracy': float(roll.correct.mean()),
                'response_tokens': float(roll.lengths.mean()),
                'finished': float(roll.finished.mean()),
                'log_ratio': m.get('rl_log_ratio', 0.0), 'grad_norm': m['grad_norm'],
                'length_penalty_on': float(active), 'completed_groups': float(len(idx))}
        row = {**last, **carry}
      writer.write(it + 1, row)
      done = it + 1
      if evaluator is not None and stage.block.eval_every and done % stage.block.eval_every == 0 \
          and done < stage.steps:
        res = evaluator(config, base_stage, base, state, mesh)
        writer.write(done, {f'eval/{n}': v for n, v in res.items()})
      stop = done < stage.steps and preempt.stop_now()
      if (t.checkpoint_every and done % t.checkpoint_every == 0 and done < stage.steps) or stop:
        # Orbax writes the JSON items once; the sampler state is the same on every process.
        ck.save(done, state, meta_of(done), stage_data())
        if stop:
          ck.wait()
          return {'interrupted': True, 'step': done}
    eval_results = loop_lib.final_eval(evaluator, config, base_stage, base, state, mesh, writer)
    summary = {'stage': stage.name, 'steps': stage.steps, 'final_loss': last.get('loss'),
               'final_reward': last.get('reward'), 'final_accuracy': last.get('accuracy'),
               'tokens_seen': tokens_seen, 'wall_s': time.time() - t0, 'seq_len': stage.seq_len,
               'skipped_steps': int(shard_lib.gather_to_host(state.skipped_total)),
               'eval': {n: float(v) for n, v in eval_results.items()}}
    loop_lib.save_final(ck, stage.steps, state, meta_of(stage.steps, complete=True), summary,
                        stage_data())
  finally:
    writer.close()
    ck.close()
  loop_lib.stage_report(stage_dir, stage.name, summary)
  return summary


def _decode(decode, state, rows, key, mesh) -> np.ndarray:
  """Sampled tokens [rows, new] of the decoder rows (every process holds all rows and gets
  all sampled tokens back: the host side of an iteration is the same on every process)."""
  rows = _pad_rows(rows, -(-rows['tokens'].shape[0] // _dp(mesh)) * _dp(mesh))
  with shard_lib.activation_context(mesh):
    new = decode(state.params, state.extra, shard_lib.make_global_batch_from_full(rows, mesh), key)
  return shard_lib.gather_to_host(new)


def _partial_rollout(buffer, sample_fresh, pool, k, problems_per_iter, tok, image_cfg, seq_len,
                     max_new, budget, patches, stop_id, state, decode, key, mesh):
  """One iteration of partial rollouts (``rl/partial.py``): decodes ``budget`` more tokens of
  every waiting sample, then of fresh problems' samples in the rows left; returns (pool indices
  [G], Rollout of the G groups whose k responses all ended, or None when none did, decoded
  rows)."""
  groups = partial_lib.plan_iteration(buffer, problems_per_iter * k, k, sample_fresh)
  slots = partial_lib.decode_slots(groups)
  # A prompt leaves room for a whole response and one more budget (a continued response
  # has fewer than max_new tokens and gets up to budget more).
  limit = seq_len - max_new - budget
  base = {g.problem: evaluate._prompt(pool.records[g.problem], tok, image_cfg, limit)
          for g in groups}
  prompts = [(list(base[g.problem][0]) + g.responses[j], base[g.problem][1]) for g, j in slots]
  new = _decode(decode, state, rollout_lib.decoder_rows(prompts, budget, seq_len, patches),
                key, mesh)
  partial_lib.advance(slots, new[:len(slots)], stop_id, max_new)
  buffer.put(groups)
  completed = [g for g in groups if g.complete]
  if not completed:
    return np.zeros((0,), np.int64), None, len(slots)
  roll = rollout_lib.score([pool.records[g.problem] for g in completed], k,
                           [base[g.problem] for g in completed for _ in range(k)],
                           [r for g in completed for r in g.responses], tok, stop_id)
  return np.asarray([g.problem for g in completed], np.int64), roll, len(slots)


def _pad_rows(rows: dict, batch: int) -> dict:
  """Decoder rows padded to ``batch`` (a multiple of the data-parallel size) by repeating row 0."""
  n = rows['tokens'].shape[0]
  if n == batch:
    return rows
  return {key: np.concatenate([v, np.repeat(v[:1], batch - n, axis=0)]) for key, v in rows.items()}
