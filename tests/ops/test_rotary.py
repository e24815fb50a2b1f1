"""Interleaved rope == transformers' apply_rotary_pos_emb_interleave up to its de-interleave."""
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.ops.rotary import apply_rope_interleaved, rope_inv_freq

torch = pytest.importorskip('torch')


def test_matches_transformers_interleave():
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
  rs = np.random.RandomState(0)
  b, s, h, r, theta = 2, 7, 3, 8, 800000.0
  q = rs.randn(b, s, h, r).astype(np.float32)
  pos = np.stack([np.arange(s), np.arange(s)[::-1] + 3]).astype(np.int32)
  ours = np.asarray(apply_rope_interleaved(jnp.asarray(q), jnp.asarray(pos), theta))
  inv = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float) / r))
  freqs = torch.as_tensor(pos)[..., None].float() * inv
  emb = torch.cat([freqs, freqs], -1)
  qt = torch.as_tensor(q).transpose(1, 2)                       # [B, H, S, R]
  ref, _ = m.apply_rotary_pos_emb_interleave(qt, qt, emb.cos(), emb.sin())
  ref = ref.transpose(1, 2).numpy()                             # evens then odds
  deinterleaved = np.concatenate([ours[..., 0::2], ours[..., 1::2]], axis=-1)
  np.testing.assert_allclose(deinterleaved, ref, atol=1e-5)


def test_rotation_properties():
  x = jnp.asarray(np.random.RandomState(1).randn(1, 5, 2, 16), jnp.float32)
  pos = jnp.arange(5)[None]
  y = apply_rope_interleaved(x, pos, 10000.0)
  # Norm of every pair is preserved; position 0 is the identity; dtype is kept.
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-7)
  assert apply_rope_interleaved(x.astype(jnp.bfloat16), pos, 1e4).dtype == jnp.bfloat16
  # Relative: <rope(q, m), rope(k, n)> depends only on m - n.
  q, k = x[:, :1], x[:, 1:2]
  dot = lambda m, n: float(jnp.sum(apply_rope_interleaved(q, jnp.array([[m]]), 1e4)  # noqa: E731
                                   * apply_rope_interleaved(k, jnp.array([[n]]), 1e4)))
  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)
  with pytest.raises(ValueError, match='even'):
    rope_inv_freq(7, 1e4)
