"""Losses: chunked CE == full-logits CE (values and grads), masks, per-source sums."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.train import losses


def test_chunked_matches_full_logits_values_and_grads():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  h = jax.random.normal(k[0], (2, 5, 8))
  w = jax.random.normal(k[1], (8, 37))  # 37 is not a multiple of the chunk: exercises padding
  t = jax.random.randint(k[2], (2, 5), 0, 37)

  def full(h, w):
    return jnp.sum(losses.cross_entropy_from_logits(h @ w, t, soft_cap=5.0))

  def chunked(h, w):
    return jnp.sum(losses.chunked_cross_entropy(h, w, t, chunk_size=16, soft_cap=5.0))

  chex.assert_trees_all_close(jax.jit(chunked)(h, w), jax.jit(full)(h, w), rtol=1e-5)
  grad = lambda f: jax.jit(jax.grad(f, (0, 1)))
  chex.assert_trees_all_close(grad(chunked)(h, w), grad(full)(h, w), rtol=1e-4, atol=1e-5)


def test_shift_targets_respects_segments_and_loss_mask():
  tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  mask = jnp.array([[0, 0, 1, 0, 1, 0]])   # e.g. SFT: only answer tokens are targets
  targets, weights = losses.shift_targets(tokens, mask, seg)
  np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0, 0]])
  # pos0 -> 6 (mask 0), pos1 -> 7 (mask 1), pos2 -> 8 crosses a segment, pos3 -> 9 (mask 1).
  np.testing.assert_array_equal(weights, [[0, 1, 0, 1, 0, 0]])


def test_per_source_sums():
  nll = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  w = jnp.array([[1.0, 1.0, 0.0, 1.0]])
  src = jnp.array([[0, 1, 1, 1]])
  out = losses.weighted_sums(nll, w, src, 2)
  np.testing.assert_allclose(out['source_loss_sum'], [1.0, 6.0])
  np.testing.assert_allclose(out['source_weight_sum'], [1.0, 2.0])
  np.testing.assert_allclose(out['loss_sum'], 7.0)


def test_token_chunks_match_full_logits_values_and_grads():
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  h = jax.random.normal(k[0], (2, 11, 8))   # 11 tokens in slices of 4: the last one is padded
  w = jax.random.normal(k[1], (8, 37))
  t = jax.random.randint(k[2], (2, 11), 0, 37)

  def full(h, w):
    return losses.cross_entropy_from_logits(h @ w, t, soft_cap=5.0)

  def sliced(h, w):
    return losses.chunked_cross_entropy(h, w, t, chunk_size=16, token_chunk=4, soft_cap=5.0)

  got = jax.jit(sliced)(h, w)
  chex.assert_shape(got, (2, 11))
  chex.assert_trees_all_close(got, jax.jit(full)(h, w), rtol=1e-5, atol=1e-6)
  weights = jnp.arange(22.0).reshape(2, 11)   # distinct per-token weights: grads see positions
  grad = lambda f: jax.jit(jax.grad(lambda h, w: jnp.sum(f(h, w) * weights), (0, 1)))
  chex.assert_trees_all_close(grad(sliced)(h, w), grad(full)(h, w), rtol=1e-4, atol=1e-5)


def test_token_chunks_bound_the_logits_block():
  """Forward+backward temporaries shrink with the sequence slice (no [B, S, chunk] logits)."""
  h = jnp.zeros((1, 4096, 64))
  w = jnp.zeros((64, 2048))
  t = jnp.zeros((1, 4096), jnp.int32)

  def temp_bytes(token_chunk):
    f = lambda h, w: jnp.sum(losses.chunked_cross_entropy(h, w, t, chunk_size=1024,
                                                         token_chunk=token_chunk))
    return jax.jit(jax.grad(f, (0, 1))).lower(h, w).compile().memory_analysis().temp_size_in_bytes

  whole, sliced = temp_bytes(0), temp_bytes(256)
  assert whole >= 4096 * 1024 * 4          # one [1, S, 1024] fp32 logits block at least
  assert sliced < whole / 4, (sliced, whole)
