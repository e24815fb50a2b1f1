"""The attention op: xla (blockwise) vs the naive oracle, masks, padding, gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.ops.attention import attention, resolve_backend


def _inputs(seed, b, s, h, dk, dv, skv=None):
  skv = s if skv is None else skv
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, s, h, dk), jnp.float32)
  k = jax.random.normal(ks[1], (b, skv, h, dk), jnp.float32)
  v = jax.random.normal(ks[2], (b, skv, h, dv), jnp.float32)
  return q, k, v


def _packed(lengths_per_row, s):
  """Segment ids and per-segment positions for rows packed with the given lengths (rest padding)."""
  seg = np.zeros((len(lengths_per_row), s), np.int32)
  pos = np.zeros((len(lengths_per_row), s), np.int32)
  for r, lengths in enumerate(lengths_per_row):
    i = 0
    for n, length in enumerate(lengths):
      seg[r, i:i + length] = n + 1
      pos[r, i:i + length] = np.arange(length)
      i += length
  return jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize('causal', [True, False])
def test_xla_matches_naive_packed_padded_odd(causal):
  # Odd length (37) not a multiple of the block (8), v head dim != qk head dim,
  # two packed rows with padding tails.
  s = 37
  q, k, v = _inputs(0, 2, s, 3, 12, 5)
  seg, pos = _packed([[10, 20, 3], [1, 30]], s)
  kw = dict(causal=causal, positions_q_bs=pos, positions_kv_bs=pos)
  ref = attention(q, k, v, seg, backend='naive', **kw)
  out = attention(q, k, v, seg, backend='xla', block_size=8, **kw)
  chex.assert_shape(out, (2, s, 3, 5))
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  # Padding queries output exact zeros.
  assert float(jnp.abs(out[0, 33:]).max()) == 0.0
  assert float(jnp.abs(out[1, 31:]).max()) == 0.0


def test_index_causal_default_and_single_block():
  q, k, v = _inputs(1, 1, 16, 2, 8, 8)
  seg = jnp.ones((1, 16), jnp.int32)
  ref = attention(q, k, v, seg, causal=True, backend='naive')
  out = attention(q, k, v, seg, causal=True, backend='xla', block_size=512)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  # Causal really masks: row 0 attends only key 0.
  np.testing.assert_allclose(out[0, 0], v[0, 0], atol=1e-6)


def test_no_attention_across_segments():
  s = 24
  q, k, v = _inputs(2, 1, s, 2, 8, 8)
  seg, pos = _packed([[8, 9, 7]], s)
  kw = dict(causal=False, backend='xla', block_size=8, positions_q_bs=pos, positions_kv_bs=pos)
  out = attention(q, k, v, seg, **kw)
  # Perturb keys/values of segment 2 only; segments 1 and 3 must be bit-for-bit unchanged.
  bump = (seg == 2)[:, :, None, None]
  out2 = attention(q, k + 3.0 * bump, v - 5.0 * bump, seg, **kw)
  np.testing.assert_array_equal(out[seg != 2], out2[seg != 2])
  assert float(jnp.abs(out[seg == 2] - out2[seg == 2]).max()) > 1e-2


def test_cross_attention_decode_shape():
  # One new query per row against a longer cache (decode), causal by explicit positions.
  q, k, v = _inputs(3, 2, 1, 2, 8, 4, skv=19)
  seg_q = jnp.ones((2, 1), jnp.int32)
  seg_kv = jnp.asarray(np.where(np.arange(19)[None] < np.array([[12], [19]]), 1, 0), jnp.int32)
  pos_q = jnp.asarray([[11], [18]], jnp.int32)
  pos_kv = jnp.broadcast_to(jnp.arange(19, dtype=jnp.int32), (2, 19))
  kw = dict(causal=True, positions_q_bs=pos_q, positions_kv_bs=pos_kv)
  ref = attention(q, k, v, seg_q, seg_kv, backend='naive', **kw)
  out = attention(q, k, v, seg_q, seg_kv, backend='xla', block_size=4, **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_gradients_match_naive():
  s = 29
  q, k, v = _inputs(4, 2, s, 2, 10, 6)
  seg, pos = _packed([[12, 15], [29]], s)
  w = jax.random.normal(jax.random.PRNGKey(9), (2, s, 2, 6))

  def loss(backend, q, k, v):
    o = attention(q, k, v, seg, causal=True, backend=backend, block_size=8,
                  positions_q_bs=pos, positions_kv_bs=pos)
    return jnp.sum(o * w)

  g_ref = jax.grad(lambda *a: loss('naive', *a), argnums=(0, 1, 2))(q, k, v)
  g_out = jax.jit(jax.grad(lambda *a: loss('xla', *a), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_out, g_ref):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)
  # Padding gets zero gradient (row 0 has 2 padding slots).
  assert float(jnp.abs(g_out[1][0, 27:]).max()) == 0.0


def test_block_diagonal_non_causal_vision_style():
  # Many images of different sizes packed in one row, non-causal, block size not dividing them.
  s = 50
  q, k, v = _inputs(5, 1, s, 4, 6, 6)
  seg, _ = _packed([[4, 16, 9, 20]], s)
  ref = attention(q, k, v, seg, causal=False, backend='naive')
  out = jax.jit(lambda q, k, v: attention(q, k, v, seg, causal=False, backend='xla',
                                          block_size=16))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('groups', [2, 4])
def test_xla_head_groups_match_naive_with_gradients(groups):
  # Vision-style rows in passes over slices of the heads: same outputs and gradients.
  s = 50
  q, k, v = _inputs(7, 1, s, 4, 6, 5)
  seg, _ = _packed([[4, 16, 9, 20]], s)
  w = jax.random.normal(jax.random.PRNGKey(8), (1, s, 4, 5))

  def loss(backend, q, k, v, head_groups=1):
    o = attention(q, k, v, seg, causal=False, backend=backend, block_size=16,
                  head_groups=head_groups)
    return jnp.sum(o * w), o

  (_, ref), g_ref = jax.value_and_grad(lambda *a: loss('naive', *a), argnums=(0, 1, 2),
                                       has_aux=True)(q, k, v)
  (_, out), g_out = jax.jit(jax.value_and_grad(lambda *a: loss('xla', *a, head_groups=groups),
                                               argnums=(0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  for a, b in zip(g_out, g_ref):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_memory_linear_in_length():
  # Compiled temp memory of fwd+bwd grows ~linearly (naive would grow 4x per doubling).
  def temp_bytes(s):
    q = jax.ShapeDtypeStruct((1, s, 2, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def f(q, k, v, seg):
      return jnp.sum(attention(q, k, v, seg, causal=True, backend='xla', block_size=128))

    c = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, q, q, seg).compile()
    return c.memory_analysis().temp_size_in_bytes

  ratio = temp_bytes(4096) / temp_bytes(2048)
  assert ratio < 2.5, ratio


def test_bad_inputs_and_auto():
  q, k, v = _inputs(6, 1, 8, 2, 4, 4)
  seg = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match='backend'):
    attention(q, k, v, seg, causal=True, backend='flash')
  with pytest.raises(ValueError, match='segment ids'):
    attention(q, k, v, seg[:, :4], causal=True)
  with pytest.raises(ValueError, match='head_groups=3 must divide the 2 heads'):
    attention(q, k, v, seg, causal=True, head_groups=3)
  assert resolve_backend('auto') in ('xla', 'cudnn', 'splash')
  if jax.default_backend() == 'cpu':
    assert resolve_backend('auto') == 'xla'


def test_splash_interpret_matches_naive():
  # The TPU splash kernel run in Pallas interpret mode on CPU: packed segments + padding tail.
  from kimi_vl_jax.ops.attention import _splash
  s = 256
  q, k, v = _inputs(7, 1, s, 2, 128, 128)
  seg, _ = _packed([[100, 120]], s)
  ref = attention(q, k, v, seg, causal=True, backend='naive')
  out = _splash(q, k, v, seg, seg, True, 128 ** -0.5, 128, interpret=True)
  valid = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5, rtol=1e-5)


def test_splash_blocks_pad_to_lanes():
  from kimi_vl_jax.ops.attention import splash_blocks
  assert splash_blocks(4, 512) == (128, 128)        # a model's init example
  assert splash_blocks(100, 128) == (128, 128)
  assert splash_blocks(640, 512) == (512, 1024)
  assert splash_blocks(8192, 512) == (512, 8192)
  assert splash_blocks(256, 64) == (128, 256)        # a CPU-tuned block size rounds up


@pytest.mark.parametrize('causal', [True, False])
def test_splash_interpret_pads_odd_lengths(causal):
  # 100 tokens (not a multiple of the 128-lane block), two rows with packed segments and a
  # padding tail; values and gradients against the oracle.
  from kimi_vl_jax.ops.attention import _splash
  s = 100
  q, k, v = _inputs(9, 2, s, 2, 128, 128)
  seg, _ = _packed([[40, 50], [100]], s)
  valid = (np.asarray(seg) > 0)[:, :, None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v), 0.0) ** 2)

  splash = lambda q, k, v: _splash(q, k, v, seg, seg, causal, 128 ** -0.5, 512, interpret=True)
  naive = lambda q, k, v: attention(q, k, v, seg, causal=causal, backend='naive')
  out, ref = splash(q, k, v), naive(q, k, v)
  chex.assert_shape(out, (2, s, 2, 128))
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=1e-5, rtol=1e-5)
  g = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(naive), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_runs_per_device_under_a_mesh():
  # Mosaic kernels cannot be partitioned by XLA: under an ambient mesh the kernel must run in
  # shard_map (batch over the batch axes, heads over 'tensor'), and still equal the oracle.
  from jax.sharding import Mesh
  from kimi_vl_jax.ops.attention import _splash_sharded
  from kimi_vl_jax.parallel.sharding import activation_context
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 2, 2), ('data', 'fsdp', 'expert', 'tensor'))
  s = 128
  q, k, v = _inputs(10, 4, s, 2, 128, 128)
  seg, _ = _packed([[60, 68], [128], [30, 30, 30], [100]], s)
  fn = lambda q, k, v, seg: _splash_sharded(q, k, v, seg, seg, True, 128 ** -0.5, 128,
                                            interpret=True)
  with activation_context(mesh):
    prims = {e.primitive.name for e in jax.make_jaxpr(fn)(q, k, v, seg).jaxpr.eqns}
    out = jax.jit(fn)(q, k, v, seg)
  assert 'shard_map' in prims, prims
  ref = attention(q, k, v, seg, causal=True, backend='naive')
  valid = (np.asarray(seg) > 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=1e-5, rtol=1e-5)


def test_splash_backend_attends_to_a_cache_by_position():
  # Prefill against a KV cache: queries and keys are different arrays with their own
  # positions. Splash's mask is by index, so the op uses the xla backend there (on CPU a
  # non-interpret splash call would fail to lower, so this also shows splash was not used).
  q, k, v = _inputs(11, 1, 8, 2, 16, 16, skv=24)
  seg_q = jnp.ones((1, 8), jnp.int32)
  seg_kv = jnp.asarray(np.r_[np.ones(20), np.zeros(4)][None].astype(np.int32))
  pos_q = jnp.arange(12, 20, dtype=jnp.int32)[None]
  pos_kv = jnp.arange(24, dtype=jnp.int32)[None]
  kw = dict(causal=True, positions_q_bs=pos_q, positions_kv_bs=pos_kv)
  out = attention(q, k, v, seg_q, seg_kv, backend='splash', **kw)
  ref = attention(q, k, v, seg_q, seg_kv, backend='naive', **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')
def test_cudnn_matches_naive_on_gpu():
  s = 128
  q, k, v = _inputs(8, 2, s, 4, 64, 32)
  seg, pos = _packed([[50, 60], [128]], s)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  kw = dict(causal=True, positions_q_bs=pos, positions_kv_bs=pos)
  ref = attention(q, k, v, seg, backend='naive', **kw).astype(jnp.float32)
  out = attention(q, k, v, seg, backend='cudnn', **kw).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=3e-2, rtol=3e-2)


def test_xla_under_layer_scan_keeps_tile_masks_inside_the_loop():
  # The segment ids are loop-invariant inside a scan over layers; JAX's scan partial eval
  # would hoist every tile's mask out of the loop and materialize [nq, nk, B, H, bq, bk]
  # arrays (0.4 GB per layer for the vision benchmark, ~1.4x its step time) unless the op
  # ties the ids to q. No array outside the loop may be that large.
  s, h, d, layers = 512, 2, 16, 2
  q, _, _ = _inputs(0, 1, s, h, d, d)
  seg, pos = _packed([[200, 150, 100]], s)
  w = jnp.stack([jnp.eye(d)] * layers)

  def loss(w, x):
    def layer(x, w_l):
      o = attention(x @ w_l, x, x, seg, causal=False, backend='xla', block_size=64,
                    positions_q_bs=pos, positions_kv_bs=pos)
      return x + o, None
    y, _ = jax.lax.scan(layer, x, w)
    return jnp.sum(y * y)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(w, q).jaxpr
  biggest = max(int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars)
  tiles = (s // 64) ** 2 * h * 64 * 64          # the hoisted mask would be this large
  assert biggest < tiles // 4, biggest
  # And the result is still right.
  ref = jax.grad(lambda w, x: jnp.sum(jax.lax.scan(
      lambda x, w_l: (x + attention(x @ w_l, x, x, seg, causal=False, backend='naive'), None),
      x, w)[0] ** 2))(w, q)
  got = jax.grad(loss)(w, q)
  # Sums over 512 positions x 2 layers: compare relative to the gradient's scale.
  assert float(jnp.max(jnp.abs(got - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize('causal', [False, True])
def test_xla_tile_spans_cover_only_interacting_tiles(causal):
  # Three segments of 32, 32 and 64 tokens in 16-token tiles, then a tile of padding: each
  # query tile visits only the key tiles of its own segment (and not the causal future);
  # the padding tile visits none. Attention work follows the interacting pairs, not nq x nk.
  from kimi_vl_jax.ops.attention import _ids_to_blocks, _tile_spans
  seg, pos = _packed([[32, 32, 64]], 144)
  blocks = [_ids_to_blocks(x, 9, 16) for x in (seg, seg, pos, pos)]
  k_lo, k_hi, q_lo, q_hi = (np.asarray(x) for x in _tile_spans(*blocks, causal))
  np.testing.assert_array_equal(k_lo, [0, 0, 2, 2, 4, 4, 4, 4, 9])
  np.testing.assert_array_equal(q_hi, [1, 1, 3, 3, 7, 7, 7, 7, -1])
  if causal:
    np.testing.assert_array_equal(k_hi, [0, 1, 2, 3, 4, 5, 6, 7, -1])
    np.testing.assert_array_equal(q_lo, [0, 1, 2, 3, 4, 5, 6, 7, 9])
  else:
    np.testing.assert_array_equal(k_hi, [1, 1, 3, 3, 7, 7, 7, 7, -1])
    np.testing.assert_array_equal(q_lo, [0, 0, 2, 2, 4, 4, 4, 4, 9])


def test_xla_under_vmap_with_per_example_spans():
  # Under vmap each example has its own tile spans (batched while-loop bounds): values and
  # gradients still equal the naive oracle example by example.
  ks = jax.random.split(jax.random.PRNGKey(9), 3)
  q, k, v = (jax.random.normal(kk, (2, 1, 64, 2, 8)) for kk in ks)
  seg = np.zeros((2, 1, 64), np.int32)
  seg[0, 0, :40], seg[0, 0, 40:50], seg[1, 0, 10:] = 1, 2, 3
  seg = jnp.asarray(seg)
  xla = lambda q, k, v, s: attention(q, k, v, s, causal=True, backend='xla', block_size=16)
  naive = lambda q, k, v, s: attention(q, k, v, s, causal=True, backend='naive')
  np.testing.assert_allclose(jax.vmap(xla)(q, k, v, seg), jax.vmap(naive)(q, k, v, seg),
                             atol=2e-5, rtol=2e-5)
  loss = lambda f: lambda q, k, v, s: jnp.sum(f(q, k, v, s) ** 2)
  got = jax.vmap(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v, seg)
  want = jax.vmap(jax.grad(loss(naive), argnums=(0, 1, 2)))(q, k, v, seg)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize('causal', [True, False])
def test_xla_traces_inside_shard_map(causal):
  # Per-device attention (e.g. heads or rows split by shard_map, check_vma on): the tile loops'
  # carries must vary like the inputs or the loops do not trace.
  if jax.device_count() < 4:
    pytest.skip('needs 4 (simulated) devices')
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('rows', 'heads'))
  q, k, v = _inputs(9, 4, 96, 4, 16, 8)
  seg, pos = _packed([[40, 56], [96], [10, 20, 30], [64]], 96)
  f = lambda q, k, v, seg, pos: attention(q, k, v, seg, causal=causal, backend='xla',
                                          block_size=32, positions_q_bs=pos, positions_kv_bs=pos)
  qkv_spec, id_spec = P('rows', None, 'heads'), P('rows')
  sharded = jax.shard_map(f, mesh=mesh, in_specs=(qkv_spec,) * 3 + (id_spec,) * 2,
                          out_specs=qkv_spec)
  loss = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg, pos))))
  out, ref = jax.jit(sharded)(q, k, v, seg, pos), f(q, k, v, seg, pos)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, r, atol=1e-5)
