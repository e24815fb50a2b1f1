"""Expert backends agree with the dense oracle (forward and gradients); capacity drops; EP == 1 device."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from kimi_vl_jax.ops import moe_dispatch as md
from kimi_vl_jax.ops import moe_ep

T, K, E, D, F = 48, 3, 8, 16, 8


def _problem(seed=0, skew=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  x_td = jax.random.normal(ks[0], (T, D))
  if skew:   # most tokens pick expert 0 first: stresses per-expert capacity
    idx_tk = jnp.stack([jnp.zeros((T,), jnp.int32), jnp.full((T,), 1, jnp.int32),
                        jax.random.randint(ks[1], (T,), 2, E)], axis=1)
  else:
    idx_tk = jax.vmap(lambda k: jax.random.permutation(k, E)[:K])(
        jax.random.split(ks[1], T)).astype(jnp.int32)
  idx_tk = idx_tk.at[3].set(E).at[7].set(E)     # two unrouted (padding) tokens
  w_tk = jax.random.uniform(ks[2], (T, K))
  weights = (jax.random.normal(ks[3], (E, D, F)) * 0.3, jax.random.normal(ks[4], (E, D, F)) * 0.3,
             jax.random.normal(ks[5], (E, F, D)) * 0.3)
  return x_td, idx_tk, w_tk, weights


def _value_and_grads(backend, cf, x_td, idx_tk, w_tk, weights, expected_load=None):
  def loss(x, w, wg, wu, wd):
    y, dropped = md.expert_ffn(x, idx_tk, w, wg, wu, wd, backend=backend, capacity_factor=cf,
                               expected_load=expected_load)
    return jnp.sum(y * jnp.sin(y)), (y, dropped)
  (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4),
                                                        has_aux=True))(x_td, w_tk, *weights)
  return y, dropped, grads


def _numpy_reference(x_td, idx_tk, w_tk, weights, keep_tk=None):
  wg, wu, wd = (np.asarray(w, np.float64) for w in weights)
  x = np.asarray(x_td, np.float64)
  y = np.zeros_like(x)
  for t in range(T):
    for k in range(K):
      e = int(idx_tk[t, k])
      if e >= E or (keep_tk is not None and not keep_tk[t, k]):
        continue
      g, u = x[t] @ wg[e], x[t] @ wu[e]
      y[t] += float(w_tk[t, k]) * ((g / (1 + np.exp(-g)) * u) @ wd[e])
  return y


@pytest.mark.parametrize('skew', [False, True])
def test_backends_match_dense_forward_and_grads(skew):
  x_td, idx_tk, w_tk, weights = _problem(skew=skew)
  y_ref = _numpy_reference(x_td, idx_tk, w_tk, weights)
  y_dense, _, g_dense = _value_and_grads('dense', 0.0, x_td, idx_tk, w_tk, weights)
  np.testing.assert_allclose(y_dense, y_ref, atol=1e-4, rtol=1e-4)
  # capacity 0 = dropless (a ladder rung, or the closing bound of the ladder when the expected
  # load is set so low that no other rung fits); capacity factor E (C = T * K) never drops.
  for backend, cf, load in [('ragged', 0.0, None), ('capacity', 0.0, None),
                            ('capacity', 0.0, 2.0), ('capacity', float(E), None)]:
    y, dropped, grads = _value_and_grads(backend, cf, x_td, idx_tk, w_tk, weights,
                                         expected_load=load)
    assert int(dropped) == 0, (backend, cf)
    np.testing.assert_allclose(y, y_dense, atol=1e-5, rtol=1e-5, err_msg=f'{backend} {cf}')
    for g, g_ref in zip(grads, g_dense):
      np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4, err_msg=f'{backend} {cf}')


def test_capacity_factor_threshold_for_no_drops():
  x_td, idx_tk, w_tk, weights = _problem(seed=1, skew=True)
  idx = np.asarray(idx_tk)
  counts = np.bincount(idx[idx < E], minlength=E)
  # Smallest factor with C = ceil(cf * T * K / E) >= the busiest expert's load.
  cf_min = counts.max() * E / (T * K)
  assert md.capacity_per_expert(T, K, E, cf_min) == counts.max()
  cf_below = (counts.max() - 1) * E / (T * K)
  assert md.capacity_per_expert(T, K, E, cf_below) == counts.max() - 1
  for cf in (0.5, cf_below):
    c = md.capacity_per_expert(T, K, E, cf)
    y, dropped, _ = _value_and_grads('capacity', cf, x_td, idx_tk, w_tk, weights)
    expected = int(np.maximum(counts - c, 0).sum())
    assert int(dropped) == expected > 0
    # Dropped = the assignments past C in token order; output equals the reference without them.
    rank = np.zeros_like(idx)
    seen = np.zeros(E + 1, int)
    for t in range(T):
      for k in range(K):
        rank[t, k] = seen[idx[t, k]]
        seen[idx[t, k]] += 1
    y_ref = _numpy_reference(x_td, idx_tk, w_tk, weights, keep_tk=rank < c)
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
  for cf in (cf_min, 2 * cf_min):
    _, dropped, _ = _value_and_grads('capacity', cf, x_td, idx_tk, w_tk, weights)
    assert int(dropped) == 0


def test_group_ladders_end_in_a_bound_that_always_fits():
  # 64 experts -> a hot group (the 8 busiest) and cold groups whose busiest are the 9th and 33rd.
  assert md.group_starts(64) == (0, 8, 32, 64) and md.group_starts(16) == (0, 2, 16)
  assert md.group_starts(32) == (0, 4, 16, 32) and md.group_starts(8) == (0, 8)
  ladders = md.group_capacities(2048, 2048 * 6, 64, 192.0)
  assert [caps[-1] for caps in ladders] == [2048, 2048 * 6 // 9, 2048 * 6 // 33]
  assert all(list(caps) == sorted(set(caps)) for caps in ladders)
  assert min(ladders[0]) == 192 and 144 in ladders[1]


@pytest.mark.parametrize('num_experts,expected_load', [(E, None), (E, 2.0), (32, None)])
def test_dropless_any_routing_all_tokens_to_three_experts(num_experts, expected_load):
  # The busiest experts get every token: past every ladder rung but the closing bound.
  # 32 experts -> a hot group and two cold ones; the three busy experts land in the hot group.
  x_td, _, w_tk, _ = _problem()
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  weights = (jax.random.normal(ks[0], (num_experts, D, F)) * 0.3,
             jax.random.normal(ks[1], (num_experts, D, F)) * 0.3,
             jax.random.normal(ks[2], (num_experts, F, D)) * 0.3)
  idx_tk = jnp.stack([jnp.full((T,), 5, jnp.int32), jnp.full((T,), 2, jnp.int32),
                      jnp.full((T,), 7, jnp.int32)], axis=1)
  y_ref, _, g_ref = _value_and_grads('dense', 0.0, x_td, idx_tk, w_tk, weights)
  y, dropped, grads = _value_and_grads('capacity', 0.0, x_td, idx_tk, w_tk, weights,
                                       expected_load=expected_load)
  assert int(dropped) == 0
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, g_ref):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_dropless_grouped_matches_dense_on_skewed_routing():
  # 32 experts (hot group of 4 + two cold groups) with a skewed router: groups differ in capacity.
  e = 32
  ks = jax.random.split(jax.random.PRNGKey(7), 6)
  x_td = jax.random.normal(ks[0], (T, D))
  logits = 2.0 * jax.random.normal(ks[1], (e,)) + jax.random.normal(ks[2], (T, e))
  idx_tk = jax.lax.top_k(logits, K)[1].astype(jnp.int32).at[4].set(e)
  w_tk = jax.random.uniform(ks[3], (T, K))
  weights = (jax.random.normal(ks[4], (e, D, F)) * 0.3, jax.random.normal(ks[5], (e, D, F)) * 0.3,
             jax.random.normal(ks[3], (e, F, D)) * 0.3)
  counts = np.sort(np.bincount(np.asarray(idx_tk)[np.asarray(idx_tk) < e], minlength=e))[::-1]
  assert counts[0] > 2 * counts[4] > 0          # groups really differ in load
  y_ref, _, g_ref = _value_and_grads('dense', 0.0, x_td, idx_tk, w_tk, weights)
  y, dropped, grads = _value_and_grads('capacity', 0.0, x_td, idx_tk, w_tk, weights)
  assert int(dropped) == 0
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, g_ref):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_gather_rows_vjp_is_the_transpose():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  idx = jnp.array([4, 0, 9, 0, 2, 4], jnp.int32)                  # 9: out of range -> zeros
  inv = jnp.array([[1, 3], [6, 6], [4, 6], [6, 6], [0, 5]], jnp.int32)
  cot = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
  out, vjp = jax.vjp(lambda a: md.gather_rows(a, idx, inv), x)
  ref_out, ref_vjp = jax.vjp(lambda a: jnp.take(a, idx, axis=0, mode='fill', fill_value=0), x)
  chex.assert_trees_all_close(out, ref_out)
  chex.assert_trees_all_close(vjp(cot), ref_vjp(cot), atol=1e-6)


def test_auto_backend_and_bad_names():
  assert md.resolve_backend('auto') == ('capacity' if jax.default_backend() == 'cpu' else 'ragged')
  with pytest.raises(ValueError, match='moe_backend'):
    md.resolve_backend('sparse')
  with pytest.raises(ValueError, match='moe_capacity_factor'):
    md.capacity_per_expert(T, K, E, -1.0)


@pytest.mark.parametrize('backend,cf', [('capacity', 0.0), ('ragged', 0.0), ('capacity', 8.0)])
def test_expert_parallel_matches_single_device(backend, cf):
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4, 1), ('data', 'fsdp', 'expert', 'tensor'))
  x_td, idx_tk, w_tk, weights = _problem(seed=2)
  b, s = 8, T // 8

  def loss(fn, x, w, wg, wu, wd):
    y, dropped = fn(x, w, wg, wu, wd)
    return jnp.sum(y * jnp.sin(y)), (y, dropped)

  def single(x, w, wg, wu, wd):
    return md.expert_ffn(x, idx_tk, w, wg, wu, wd, backend='dense')

  def parallel(x, w, wg, wu, wd):
    y, dropped = moe_ep.expert_parallel_ffn(
        x.reshape(b, s, D), idx_tk.reshape(b, s, K), w.reshape(b, s, K), wg, wu, wd,
        backend=backend, capacity_factor=cf)
    return y.reshape(T, D), dropped

  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3, 4),
                                               has_aux=True))
  (_, (y_ref, _)), g_ref = grad(single)(x_td, w_tk, *weights)
  assert moe_ep.expert_parallel_size() == 1
  with jax.set_mesh(mesh):
    assert moe_ep.expert_parallel_size() == 4
    (_, (y, dropped)), g = grad(parallel)(x_td, w_tk, *weights)
  assert int(dropped) == 0
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


def test_expert_parallel_send_capacity_drops_are_counted():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 1, 8, 1), ('data', 'fsdp', 'expert', 'tensor'))
  x_td, _, w_tk, weights = _problem()
  idx_tk = jnp.zeros((T, K), jnp.int32).at[:, 1].set(1).at[:, 2].set(2)  # all to device 0..2
  b, s = 8, T // 8
  with jax.set_mesh(mesh):
    y, dropped = jax.jit(lambda x, w, *ws: moe_ep.expert_parallel_ffn(
        x.reshape(b, s, D), idx_tk.reshape(b, s, K), w.reshape(b, s, K), *ws,
        backend='capacity', capacity_factor=1.0))(x_td, w_tk, *weights)
  # Per device: 6 tokens x 3 assignments, Cs = ceil(18 / 8) = 3 rows per destination device,
  # each of devices 0, 1, 2 is sent 6 -> 3 dropped each: 9 per source device, 72 in all.
  assert int(dropped) == 72
  with pytest.raises(ValueError, match='ambient mesh'):
    moe_ep.expert_parallel_ffn(x_td[None], idx_tk[None], w_tk[None], *weights)
