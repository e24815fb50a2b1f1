"""The RL task on the tiny LM: sequence log-probs of the response tokens, and the loss the
train step minimizes (mean over real rows of the per-sequence mirror-descent loss)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.config import base_config
from kimi_vl_jax.rl import objective
from kimi_vl_jax.rl.task import rl_task, sequence_logp
from kimi_vl_jax.train import tasks


def _batch(b=4, s=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 512, (b, s)).astype(np.int32)
  prompt = [3, 5, 4, 6]
  loss_mask = np.zeros((b, s), np.int32)
  seg = np.zeros((b, s), np.int32)
  for i in range(b):
    end = s - i                                # rows of different lengths, padded after
    seg[i, :end] = 1
    loss_mask[i, prompt[i]:end] = 1            # the response: after the prompt
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
  return {'tokens': jnp.asarray(tokens), 'segment_ids': jnp.asarray(seg),
          'positions': jnp.asarray(pos), 'loss_mask': jnp.asarray(loss_mask),
          'source_ids': jnp.zeros((b, s), jnp.int32),
          'rl_advantage': jnp.asarray([0.5, -0.5, 1.0, 0.0]),
          'rl_ref_logp': jnp.asarray([-30.0, -20.0, -25.0, -10.0]),
          'rl_weight': jnp.asarray([1.0, 1.0, 1.0, 0.0])}     # the last row is padding


@pytest.fixture(scope='module')
def tiny_lm():
  """(config, the tiny LM task, its params, its other variables): one jitted init for the
  module's tests."""
  c = base_config('tiny')
  base = tasks.lm_task(c.model, c.train)
  variables = nn.unbox(jax.jit(base.init)(jax.random.PRNGKey(0)))
  return c, base, variables['params'], {k: v for k, v in variables.items() if k != 'params'}


@pytest.mark.parametrize('vocab_chunk', [0, 96])
def test_sequence_logp_sums_the_response_tokens(tiny_lm, vocab_chunk):   # full logits; vocab slices
  c, base, params, extra = tiny_lm
  batch = _batch()
  got = jax.jit(lambda p: sequence_logp(base, p, extra, batch, vocab_chunk=vocab_chunk)[0])(params)
  logits, _ = jax.jit(base.model.apply)({'params': params, **extra}, batch['tokens'],
                                        batch['segment_ids'], batch['positions'])
  logp_tok = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  want = []
  for i in range(4):
    m = np.asarray(batch['loss_mask'][i])
    # Token t (t >= 1) in the response is predicted at position t - 1.
    want.append(sum(float(logp_tok[i, t - 1, int(batch['tokens'][i, t])])
                    for t in range(1, 12) if m[t]))
  chex.assert_trees_all_close(got, jnp.asarray(want), rtol=1e-5, atol=1e-4)


def test_rl_loss_is_the_mean_per_sequence_loss_over_real_rows(tiny_lm):
  c, base, params, extra = tiny_lm
  task = rl_task(base, c.train, tau=0.3)
  batch = _batch()

  def via_task(p):
    obj, aux = task.loss(p, extra, batch, None)
    return obj / aux['sums']['denom']

  def direct(p):
    logp, _ = sequence_logp(base, p, extra, batch)
    per = objective.per_sequence_loss(logp, batch['rl_ref_logp'], batch['rl_advantage'], 0.3)
    return jnp.sum(per[:3]) / 3.0

  v1, g1 = jax.jit(jax.value_and_grad(via_task))(params)
  v2, g2 = jax.jit(jax.value_and_grad(direct))(params)
  chex.assert_trees_all_close((v1, g1), (v2, g2), rtol=1e-5, atol=1e-6)
  # The advantage and reference are constants: only logp carries gradient.
  g_adv = jax.jit(jax.grad(
      lambda a: task.loss(params, extra, {**batch, 'rl_advantage': a}, None)[0]))(
          batch['rl_advantage'])
  assert not np.any(np.asarray(g_adv))


def test_mirror_descent_raises_the_reward_of_a_sampled_policy(tiny_lm):
  """Iterations of sample -> score -> update -> reset on the tiny LM, with the reward 'the
  response token is in the lower half of the vocabulary': the policy's reward rises."""
  import optax
  from kimi_vl_jax.rl import rollout  # noqa: F401  (the host side is tested in test_rollout)
  from kimi_vl_jax.train import evaluate, state as state_lib, step as step_lib
  c, base, params, extra = tiny_lm
  task = rl_task(base, c.train, tau=0.1)
  tx = optax.adam(1e-2)
  state = state_lib.create_state(params, extra, tx, jax.random.PRNGKey(1))
  step = jax.jit(step_lib.make_train_step(task, tx, step_lib.StepConfig(grad_clip_norm=1.0)))
  decode = jax.jit(evaluate.make_decoder(base, 1, None, temperature=1.0))
  ref_logp = jax.jit(lambda p, e, b: sequence_logp(base, p, e, b)[0])
  vocab, k, b = c.model.lm.vocab_size, 16, 32           # 2 prompts x 16 samples
  prompts = np.array([[5, 6, 7, 0], [8, 9, 10, 11]], np.int32)
  rows = {'tokens': jnp.asarray(np.repeat(prompts, k, 0)),
          'lens': jnp.asarray(np.repeat([3, 4], k).astype(np.int32))}

  def reward_of(state, key):
    new = np.asarray(decode(state.params, state.extra, rows, key))[:, 0]
    return (new < vocab // 2).astype(np.float32), new

  before = np.mean([reward_of(state, jax.random.PRNGKey(100 + i))[0].mean() for i in range(4)])
  for it in range(12):
    r, new = reward_of(state, jax.random.PRNGKey(it))
    lens = np.asarray(rows['lens'])
    tokens = np.zeros((b, 5), np.int32)
    tokens[:, :4] = np.asarray(rows['tokens'])
    tokens[np.arange(b), lens] = new
    seg = (np.arange(5)[None] <= lens[:, None]).astype(np.int32)
    loss_mask = (np.arange(5)[None] == lens[:, None]).astype(np.int32)
    batch = {'tokens': jnp.asarray(tokens), 'segment_ids': jnp.asarray(seg),
             'positions': jnp.asarray(np.broadcast_to(np.arange(5, dtype=np.int32), (b, 5))),
             'loss_mask': jnp.asarray(loss_mask), 'source_ids': jnp.zeros((b, 5), jnp.int32),
             'rl_weight': jnp.ones((b,))}
    batch['rl_ref_logp'] = ref_logp(state.params, state.extra, batch)
    r_pk = r.reshape(2, k)
    batch['rl_advantage'] = jnp.asarray((r_pk - r_pk.mean(1, keepdims=True)).reshape(-1))
    for _ in range(2):
      state, _ = step(state, batch)
    state = state.replace(opt_state=tx.init(state.params))
  after = np.mean([reward_of(state, jax.random.PRNGKey(100 + i))[0].mean() for i in range(4)])
  assert after > before + 0.2, (before, after)
