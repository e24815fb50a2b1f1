"""Tasks on the real tiny LM: the vocabulary-chunked loss (hidden states + lm_head kernel, no
full logits; also split over the sequence) equals the full-logits loss in value and gradients; greedy decoding from hidden
states picks the full logits' argmax."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.config import base_config
from kimi_vl_jax.train import evaluate, tasks


def test_chunked_vocab_loss_matches_full_logits_on_the_lm():
  c = base_config('tiny')
  rng = np.random.default_rng(0)
  b, s = 2, 16
  batch = {'tokens': jnp.asarray(rng.integers(1, 512, (b, s)), jnp.int32),
           'segment_ids': jnp.asarray(np.repeat([[1] * 10 + [2] * 6], b, 0), jnp.int32),
           'positions': jnp.asarray(np.repeat([list(range(10)) + list(range(6))], b, 0), jnp.int32),
           'loss_mask': jnp.ones((b, s), jnp.int32), 'source_ids': jnp.zeros((b, s), jnp.int32)}
  out = []
  # The chunk settings change only the loss: one init serves all three tasks (and greedy).
  variables = nn.unbox(jax.jit(tasks.lm_task(c.model, c.train).init)(jax.random.PRNGKey(0)))
  params, extra = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  # Full logits; vocabulary slices; vocabulary and sequence slices (16 tokens in slices of 6).
  for chunk, token_chunk in ((0, 0), (96, 0), (96, 6)):
    c.train.loss_vocab_chunk, c.train.loss_token_chunk = chunk, token_chunk
    task = tasks.lm_task(c.model, c.train, ('a',))

    def f(p):
      obj, aux = task.loss(p, extra, batch, None)
      return obj / aux['sums']['denom']

    out.append(jax.jit(jax.value_and_grad(f))(params))
  chex.assert_trees_all_close(out[0], out[1], rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(out[0], out[2], rtol=2e-5, atol=2e-6)

  # Greedy next token from hidden states == argmax of the full logits at the last prompt token.
  task = tasks.lm_task(c.model, c.train)
  lens = jnp.array([5, 9], jnp.int32)
  toks = batch['tokens']
  new = jax.jit(evaluate.make_greedy(task, 1))(variables['params'], {'router': variables['router']},
                                                {'tokens': toks, 'lens': lens})
  full_logits = jax.jit(task.model.apply)
  for i in range(b):
    n = int(lens[i])
    logits, _ = full_logits(variables, toks[i:i + 1, :n], jnp.ones((1, n), jnp.int32),
                            jnp.arange(n)[None])
    assert int(new[i, 0]) == int(jnp.argmax(logits[0, -1]))


def test_vit_pretrain_caption_loss_per_source():
  """Per-source caption sums: each source's mean equals the caption loss of its rows alone
  (the caption NLL of a row does not depend on the other rows; SigLIP does and is not split)."""
  c = base_config('tiny')
  rng = np.random.default_rng(0)
  b, p, t = 4, 16, 6
  task = tasks.vit_pretrain_task(c.model, num_patches=p, caption_len=t, source_names=('a', 'b'))
  assert task.source_names == ('a', 'b')
  variables = nn.unbox(jax.jit(task.init)(jax.random.PRNGKey(0)))
  params = variables.pop('params')
  loss = jax.jit(task.loss)   # compiled for the whole batch and for the two-row subsets
  grid = np.full((b, p), 4, np.int32)
  batch = {'patches': rng.normal(size=(b, p, 588)).astype(np.float32),
           'patch_segment_ids': np.ones((b, p), np.int32),
           'patch_rows': np.tile(np.repeat(np.arange(4), 4), (b, 1)).astype(np.int32),
           'patch_cols': np.tile(np.tile(np.arange(4), 4), (b, 1)).astype(np.int32),
           'patch_grid_h': grid, 'patch_grid_w': grid,
           'caption': rng.integers(3, 512, (b, t)).astype(np.int32),
           'caption_mask': np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 3 + [0] * 3],
                                    np.int32),
           'source_ids': np.array([0, 1, 1, 0], np.int32)}
  _, aux = loss(params, variables, batch, None)
  per_source = aux['sums']['source_loss_sum'] / aux['sums']['source_weight_sum']
  # Next-token targets per row: caption length - 1.
  np.testing.assert_array_equal(aux['sums']['source_weight_sum'], [5 + 2, 3 + 4])
  for k, rows in enumerate(([0, 3], [1, 2])):
    sub = {key: v[rows] for key, v in batch.items()}
    _, aux_k = loss(params, variables, sub, None)
    np.testing.assert_allclose(per_source[k], aux_k['means']['caption'], rtol=1e-5)
  np.testing.assert_allclose(aux['sums']['source_loss_sum'].sum() / 14, aux['means']['caption'],
                             rtol=1e-5)
