"""One process of test_multiprocess.py's RL stage run (run as a script: ``worker WORKDIR OUT``).

Environment (set by the test, as a launcher would): KVJ_COORDINATOR, KVJ_NUM_PROCESSES,
KVJ_PROCESS_ID, KVJ_CPU_COLLECTIVES=gloo and XLA_FLAGS with 4 host devices per process; without
KVJ_COORDINATOR it runs the same stage in one process (the test's reference run).

Runs test_loop's tiny RL stage (2 iterations, a checkpoint after each) and writes OUT (JSON):
each iteration's host-side rollout (the problems' prompt ids, sampled tokens, verdicts,
lengths) and every value the loop gathered from the devices (``sharding.gather_to_host``:
sampled tokens, reference log-probs, metrics) and the final checkpoint's step and optimizer
state as ``restore_raw`` reads them; every process must write the same ones. In a
multi-process run it then builds a stage's state from given previous-stage parameters on an
FSDP mesh (``_init_from_previous``) and records what it got.
"""
import json
import os
import sys

def _init_from_previous(workdir, gather):
  """The hand-over between stages on an FSDP mesh, where each process holds only part of
  every sharded tensor: a joint-pretraining checkpoint (its parameters the init's + 1) is read
  back as cooldown reads its previous stage (``loop._prev_params``, Orbax ``restore_raw``), and
  cooldown's state is built from it (``loop._init_state``) once with every tensor given (no
  random init runs) and once with ``lm_head`` missing (random init, then the given tensors
  copied over it). Returns what every process saw, gathered."""
  import jax
  import numpy as np
  from kimi_vl_jax.config import base_config
  from kimi_vl_jax.parallel import mesh as mesh_lib
  from kimi_vl_jax.train import checkpoint as ckpt_lib, loop, stages as stages_lib
  c = base_config('tiny')
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.train.global_batch, c.train.seq_len = 8, 32
  c.data.sources = 'text=generated:text@1'
  c.data.max_patches_per_row = 0
  for name in c.stages:
    c.stages[name].enabled = name in ('joint_pretrain', 'cooldown')
    c.stages[name].task, c.stages[name].steps = 'lm', 1
  mesh = mesh_lib.build_mesh(c.mesh)
  prep = loop.prepare_stage(c, stages_lib.resolve(c, 'cooldown'), mesh)
  fresh, _ = loop._init_state(prep.task, prep.opt, prep.shardings, prep.rng, None)
  split = [not x.is_fully_addressable and not x.is_fully_replicated
           for x in jax.tree.leaves(fresh.params)]
  ck = ckpt_lib.StageCheckpoints(workdir, 'joint_pretrain')
  ck.save(1, fresh.replace(params=jax.tree.map(lambda x: x + 1.0, fresh.params)),
          {'step': 1, 'complete': True})
  ck.close()
  fresh_params = gather(fresh.params)
  given = jax.tree.map(lambda x: x + 1.0, fresh_params)
  params, extra = loop._prev_params(c, workdir, stages_lib.resolve(c, 'cooldown'))
  out = {'leaves': len(split), 'split_across_processes': sum(split)}
  for name, params in (('all', params), ('partial', {k: v for k, v in params.items()
                                                     if k != 'lm_head'})):
    st, copied = loop._init_state(prep.task, prep.opt, prep.shardings, prep.rng, (params, extra))
    got = gather(st.params)
    out[name] = {
        'copied': len(copied),
        'given_equal': all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves({k: got[k] for k in params}),
            jax.tree.leaves({k: given[k] for k in params}))),
        'lm_head_fresh': bool(np.array_equal(got['lm_head']['kernel'],
                                             fresh_params['lm_head']['kernel']))}
  return out


if __name__ == '__main__':
  workdir, out_path = sys.argv[1], sys.argv[2]
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from kimi_vl_jax.parallel import distributed
  distributed.initialize()     # before anything touches a backend
  import jax
  import numpy as np
  from test_loop import _rl_config   # the config of the single-process RL tests

  from kimi_vl_jax.config import validate
  from kimi_vl_jax.parallel import sharding as shard_lib
  from kimi_vl_jax.rl import rollout as rollout_lib
  from kimi_vl_jax.train import checkpoint as ckpt_lib, loop

  gathered, rollouts = [], []
  real_gather, real_collect = shard_lib.gather_to_host, rollout_lib.collect

  def gather(tree):
    out = real_gather(tree)
    gathered.append(jax.tree.map(lambda x: np.asarray(x).tolist(), out))
    return out

  def collect(problems, k, prompts, new_tokens, tok, stop_id):
    roll = real_collect(problems, k, prompts, new_tokens, tok, stop_id)
    rollouts.append({'prompt_ids': [list(map(int, ids)) for ids, _ in prompts],
                     'tokens': np.asarray(new_tokens).tolist(),
                     'correct': roll.correct.tolist(), 'lengths': roll.lengths.tolist()})
    return roll

  shard_lib.gather_to_host, rollout_lib.collect = gather, collect
  config = _rl_config(iterations=2)
  config.train.checkpoint_every = 1
  # The stage's final evals run in every process too: greedy decoding (the 'needle' set pointed
  # at short text-only arithmetic problems, which the tiny LM's rows hold) and caption perplexity.
  from kimi_vl_jax.train import evaluate
  evaluate.EXACT_MATCH_SETS['needle'] = ('math', ('arithmetic',))
  config.stages.rl.eval = ('needle', 'caption_ppl')
  config.train.eval_examples = 4
  validate(config, num_devices=jax.device_count())
  rc = loop.run_experiment(config, workdir)
  # The final state read back as the next stage would. Every process reads (Orbax synchronizes
  # them); in a multi-process job the arrays come back sharded as saved, so they are gathered.
  ck = ckpt_lib.StageCheckpoints(workdir, 'rl')
  raw = real_gather(ck.restore_raw())
  ck.close()
  final = {'step': int(raw['step']),
           'opt_state_zero': all(bool(np.all(x == 0)) for x in jax.tree.leaves(raw['opt_state']))}
  handover = _init_from_previous(workdir + '_stages', real_gather) if jax.process_count() > 1 \
      else None
  with open(out_path, 'w') as f:
    json.dump({'rc': rc, 'process': jax.process_index(), 'count': jax.process_count(),
               'devices': jax.device_count(), 'rollouts': rollouts, 'gathered': gathered,
               'final': final, 'init_from_previous': handover}, f)
