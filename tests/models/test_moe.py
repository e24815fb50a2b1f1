"""MoEBlock: parity with transformers' DeepseekV3MoE, padding, bias update, balance loss, layout."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from ml_collections import FrozenConfigDict

from kimi_vl_jax.config.presets import get_preset
from kimi_vl_jax.models.moe import MoEBlock, route, update_router_bias

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _cfg(**overrides):
  lm = get_preset('tiny').lm
  lm.update(dict(hidden_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                 topk_group=2, moe_intermediate_size=16, n_shared_experts=2,
                 routed_scaling_factor=2.5, moe_backend='capacity'))
  lm.update(overrides)
  return FrozenConfigDict(lm)


def _init(cfg, b=2, s=24, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, s, cfg.hidden_size))
  seg = jnp.ones((b, s), jnp.int32)
  variables = nn.unbox(MoEBlock(cfg).init(jax.random.PRNGKey(seed), x, seg))
  # Non-zero correction bias and a gate scaled up so routing is not a coin toss.
  variables['router']['gate']['e_score_correction_bias'] = 0.05 * jax.random.normal(
      jax.random.PRNGKey(seed + 2), (cfg.n_routed_experts,))
  variables['params']['gate']['kernel'] = variables['params']['gate']['kernel'] * 20
  return variables, x, seg


def _torch_moe(cfg, variables):
  hf_cfg = transformers.DeepseekV3Config(
      hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
      n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
      num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
      topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
      norm_topk_prob=cfg.norm_topk_prob, hidden_act='silu')
  moe = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(hf_cfg).float()
  p = jax.tree.map(lambda a: torch.tensor(np.asarray(a, np.float32)), variables['params'])
  ex = p['experts']
  with torch.no_grad():
    moe.gate.weight.copy_(p['gate']['kernel'].T)
    moe.gate.e_score_correction_bias.copy_(
        torch.tensor(np.asarray(variables['router']['gate']['e_score_correction_bias'])))
    moe.experts.gate_up_proj.copy_(torch.cat([ex['gate_proj'], ex['up_proj']], -1).transpose(1, 2))
    moe.experts.down_proj.copy_(ex['down_proj'].transpose(1, 2))
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      getattr(moe.shared_experts, name).weight.copy_(p['shared_experts'][name]['kernel'].T)
  return moe


@pytest.mark.parametrize('backend', ['capacity', 'dense'])
def test_matches_transformers_deepseek_v3_moe(backend):
  cfg = _cfg(moe_backend=backend)
  variables, x, seg = _init(cfg)
  y, aux = jax.jit(MoEBlock(cfg).apply)(variables, x, seg)
  moe = _torch_moe(cfg, variables)
  with torch.no_grad():
    y_ref = moe(torch.tensor(np.asarray(x))).numpy()
    _, w_ref, idx_ref = moe.gate(torch.tensor(np.asarray(x)))
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  # The router on its own: same expert sets (group-limited) and the same weights.
  _, idx, w = route(x.reshape(-1, cfg.hidden_size), variables['params']['gate']['kernel'],
                    variables['router']['gate']['e_score_correction_bias'],
                    top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
                    routed_scaling_factor=cfg.routed_scaling_factor)
  order = np.argsort(np.asarray(idx), -1)
  order_ref = np.argsort(idx_ref.numpy(), -1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1),
                                np.take_along_axis(idx_ref.numpy(), order_ref, -1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                             np.take_along_axis(w_ref.numpy(), order_ref, -1), atol=1e-6)
  # Group limit is active: every token's experts span at most topk_group groups.
  groups = np.asarray(idx) // (cfg.n_routed_experts // cfg.n_group)
  assert max(len(set(row)) for row in groups) <= cfg.topk_group
  assert float(aux['load_e'].sum()) == x.shape[0] * x.shape[1] * cfg.num_experts_per_tok


def test_padding_is_not_routed_and_does_not_leak():
  cfg = _cfg()
  variables, x, _ = _init(cfg)
  seg = jnp.array([[1] * 14 + [2] * 6 + [0] * 4, [1] * 9 + [0] * 15], jnp.int32)
  apply = jax.jit(MoEBlock(cfg).apply)
  y, aux = apply(variables, x, seg)
  valid = np.asarray(seg) > 0
  assert float(aux['load_e'].sum()) == valid.sum() * cfg.num_experts_per_tok
  # Changing padding tokens changes neither the load nor any non-padding output.
  x2 = jnp.where(seg[..., None] > 0, x, 100.0 * jax.random.normal(jax.random.PRNGKey(9), x.shape))
  y2, aux2 = apply(variables, x2, seg)
  np.testing.assert_array_equal(aux['load_e'], aux2['load_e'])
  np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y2)[valid], atol=1e-6)
  assert int(aux['dropped']) == 0


def test_bias_update_moves_load_toward_balance():
  cfg = _cfg(n_group=1, topk_group=1, num_experts_per_tok=2)
  variables, x, seg = _init(cfg, b=4, s=64)
  # Skew the router: a large positive offset on expert 0's and 1's logits for every token.
  kernel = variables['params']['gate']['kernel']
  x = x.at[..., 0].set(3.0)
  variables['params']['gate']['kernel'] = kernel.at[0, :2].set(2.0).at[0, 2:].set(-1.0)
  variables['router']['gate']['e_score_correction_bias'] = jnp.zeros((cfg.n_routed_experts,))
  apply = jax.jit(MoEBlock(cfg).apply)
  router = {'router': variables['router']}
  imbalance = []
  for _ in range(40):
    _, aux = apply({'params': variables['params'], **router}, x, seg)
    load = np.asarray(aux['load_e'])
    imbalance.append(load.max() / load.mean())
    router = update_router_bias(router, aux['load_e'][None], rate=0.05)
  assert imbalance[0] > 3.0
  assert imbalance[-1] < 0.5 * imbalance[0], imbalance
  assert min(imbalance[-5:]) < 1.5, imbalance


def test_update_router_bias_layouts():
  bias_le = jnp.zeros((3, 4))
  load_le = jnp.array([[1., 2., 3., 6.], [3., 3., 3., 3.], [0., 0., 0., 8.]])
  out = update_router_bias({'layers': {'gate': {'e_score_correction_bias': bias_le}}}, load_le, 0.1)
  np.testing.assert_allclose(out['layers']['gate']['e_score_correction_bias'],
                             [[.1, .1, 0, -.1], [0, 0, 0, 0], [.1, .1, .1, -.1]])
  # Unscanned layers: one [E] leaf per layer, load given as a matching tree.
  tree = {'a': jnp.zeros(4), 'b': jnp.zeros(4)}
  out = update_router_bias(tree, {'a': load_le[0], 'b': load_le[2]}, 0.1)
  np.testing.assert_allclose(out['b'], [.1, .1, .1, -.1])
  # Unscanned layers with one array: rows go in layer order (layers_2 before layers_10).
  tree = {f'layers_{i}': {'b': jnp.zeros(4)} for i in (1, 2, 10)}
  out = update_router_bias(tree, load_le, 0.1)
  np.testing.assert_allclose(out['layers_10']['b'], [.1, .1, .1, -.1])
  np.testing.assert_allclose(out['layers_2']['b'], [0, 0, 0, 0])
  with pytest.raises(ValueError, match='does not match'):
    update_router_bias({'x': bias_le}, jnp.zeros((2, 4)), 0.1)


def test_sequence_balance_loss_matches_numpy():
  alpha = 0.01
  cfg = _cfg(seq_balance_loss_alpha=alpha)
  variables, x, _ = _init(cfg)
  seg = jnp.array([[1] * 10 + [2] * 10 + [0] * 4, [1] * 24], jnp.int32)
  _, aux = jax.jit(MoEBlock(cfg).apply)(variables, x, seg)
  scores, idx, _ = route(x.reshape(-1, cfg.hidden_size), variables['params']['gate']['kernel'],
                         variables['router']['gate']['e_score_correction_bias'],
                         top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
                         topk_group=cfg.topk_group,
                         routed_scaling_factor=cfg.routed_scaling_factor)
  scores, idx = np.asarray(scores).reshape(2, 24, -1), np.asarray(idx).reshape(2, 24, -1)
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  losses = []
  for row, sid in [(0, 1), (0, 2), (1, 1)]:
    mask = np.asarray(seg[row]) == sid
    s_te, i_tk = scores[row][mask], idx[row][mask]
    f = np.bincount(i_tk.ravel(), minlength=e) * e / (k * mask.sum())
    p = (s_te / s_te.sum(-1, keepdims=True)).mean(0)
    losses.append((f * p).sum())
  np.testing.assert_allclose(aux['balance_loss'], alpha * np.mean(losses), rtol=1e-5)
  # The loss trains the router (through the scores), not the selection.
  grad = jax.jit(jax.grad(lambda p: MoEBlock(cfg).apply({**variables, 'params': p}, x, seg)[1][
      'balance_loss']))(variables['params'])
  assert float(jnp.abs(grad['gate']['kernel']).max()) > 0


def test_variable_layout_and_logical_axes():
  cfg = _cfg()
  x = jnp.zeros((1, 4, cfg.hidden_size))
  boxed = jax.eval_shape(MoEBlock(cfg).init, jax.random.PRNGKey(0), x, jnp.ones((1, 4), jnp.int32))
  axes = jax.tree.map(lambda b: b.names, boxed,
                      is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
  assert axes['params']['experts']['gate_proj'] == ('experts', 'embed', 'expert_mlp')
  assert axes['params']['experts']['down_proj'] == ('experts', 'expert_mlp', 'embed')
  assert axes['params']['gate']['kernel'] == ('embed', 'experts')
  assert axes['router']['gate']['e_score_correction_bias'] == ('experts',)
  shapes = jax.tree.map(lambda a: a.shape, nn.unbox(boxed))
  assert shapes['params']['experts']['up_proj'] == (e, d, f)
  assert shapes['params']['shared_experts']['gate_proj']['kernel'] == (d, 2 * f)
  assert shapes['router']['gate']['e_score_correction_bias'] == (e,)


def test_block_under_expert_parallel_mesh_matches_single_device():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  cfg = _cfg(seq_balance_loss_alpha=1e-3)
  variables, x, _ = _init(cfg, b=8, s=8)
  seg = jnp.ones((8, 8), jnp.int32).at[2, 5:].set(0)

  def loss(p, block):
    y, aux = block.apply({**variables, 'params': p}, x, seg)
    return jnp.sum(y ** 2) + aux['balance_loss'], (y, aux)

  grad = jax.jit(jax.value_and_grad(lambda p: loss(p, MoEBlock(cfg)), has_aux=True))
  (_, (y_ref, aux_ref)), g_ref = grad(variables['params'])
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4, 1), ('data', 'fsdp', 'expert', 'tensor'))
  with jax.set_mesh(mesh):
    (_, (y, aux)), g = grad(variables['params'])
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_array_equal(aux['load_e'], aux_ref['load_e'])
  np.testing.assert_allclose(aux['balance_loss'], aux_ref['balance_loss'], rtol=1e-5)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5), g, g_ref)


def _sort_sizes(compiled_text: str) -> set:
  """Element counts of the keys of every sort in an HLO module."""
  import re
  return {int(n) for n in re.findall(r'= \(s32\[(\d+)\]\S*[^=]*? sort\(', compiled_text)}


@pytest.mark.parametrize('axes', [(8, 1), (2, 4)])
def test_block_under_data_parallel_mesh_dispatches_local_tokens(axes):
  """data x fsdp mesh, no 'expert' axis: every device sorts and runs only its own tokens
  (GSPMD left the single-device dispatch unpartitioned: every device computed all tokens),
  and outputs, load statistics and gradients equal one device's."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  cfg = _cfg(seq_balance_loss_alpha=1e-3)
  b, s = 8, 8
  variables, x, _ = _init(cfg, b=b, s=s)
  seg = jnp.ones((b, s), jnp.int32).at[2, 5:].set(0)

  def loss(p):
    y, aux = MoEBlock(cfg).apply({**variables, 'params': p}, x, seg)
    return jnp.sum(y ** 2) + aux['balance_loss'], (y, aux)

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, (y_ref, aux_ref)), g_ref = grad(variables['params'])
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(*axes, 1, 1), ('data', 'fsdp', 'expert', 'tensor'))
  with jax.set_mesh(mesh):
    (_, (y, aux)), g = grad(variables['params'])
    sorts = _sort_sizes(grad.lower(variables['params']).compile().as_text())
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_array_equal(aux['load_e'], aux_ref['load_e'])
  assert int(aux['dropped']) == 0
  np.testing.assert_allclose(aux['balance_loss'], aux_ref['balance_loss'], rtol=1e-5)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5), g, g_ref)
  k = cfg.num_experts_per_tok
  assert b * s * k // 8 in sorts and b * s * k not in sorts, sorts   # local assignments only
  assert b * s * k in _sort_sizes(grad.lower(variables['params']).compile().as_text())


def test_data_parallel_capacity_drops_per_device_and_falls_back_when_batch_does_not_split():
  from kimi_vl_jax.ops import moe_ep
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1, 1), ('data', 'fsdp', 'expert', 'tensor'))
  # Capacity C = ceil(1.0 * 8 tokens * 3 / 8 experts) = 3 per expert and device; all tokens
  # pick experts 0, 1, 2: 8 - 3 = 5 drops per expert and device, 15 per device, 120 in all.
  cfg = _cfg(moe_capacity_factor=1.0)
  variables, x, _ = _init(cfg, b=8, s=8)
  d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
  ws = [jnp.ones((e, d, f)) * 0.1, jnp.ones((e, d, f)) * 0.1, jnp.ones((e, f, d)) * 0.1]
  idx = jnp.broadcast_to(jnp.array([0, 1, 2], jnp.int32), (8, 8, 3))
  w = jnp.ones((8, 8, 3)) / 3
  with jax.set_mesh(mesh):
    assert moe_ep.data_parallel_shards(8) == 8
    assert moe_ep.data_parallel_shards(12) == 1      # does not split: one global dispatch
    y, dropped = jax.jit(lambda *a: moe_ep.data_parallel_ffn(
        *a, backend='capacity', capacity_factor=1.0))(x, idx, w, *ws)
  assert int(dropped) == 120
  with jax.set_mesh(mesh), pytest.raises(ValueError, match='batch 4 is not divisible by the 8'):
    moe_ep.data_parallel_ffn(x[:4], idx[:4], w[:4], *ws)
  assert moe_ep.data_parallel_shards(8) == 1          # no ambient mesh
  # A batch the mesh cannot split runs the single-device dispatch and still matches.
  cfg = _cfg()
  variables, x, seg = _init(cfg, b=3, s=8)
  y_ref, _ = MoEBlock(cfg).apply(variables, x, seg)
  with jax.set_mesh(mesh):
    y, _ = jax.jit(lambda v, x: MoEBlock(cfg).apply(v, x, seg))(variables, x)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)


@pytest.mark.parametrize('mesh_shape', [None, (1, 2, 4, 1)], ids=['one_device', 'expert_parallel'])
def test_sequence_slices_match_whole_rows(mesh_shape):
  """moe_token_chunk routes slices of the sequence one at a time (10 tokens in slices of 4: the
  last is padded): outputs, statistics and gradients equal routing whole rows."""
  if mesh_shape and jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  cfg = _cfg(seq_balance_loss_alpha=1e-3)
  variables, x, _ = _init(cfg, b=8, s=10)
  seg = jnp.ones((8, 10), jnp.int32).at[2, 5:].set(0)

  def grad_fn(cfg):
    def loss(p):
      y, aux = MoEBlock(cfg).apply({**variables, 'params': p}, x, seg)
      return jnp.sum(y ** 2) + aux['balance_loss'], (y, aux)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  whole, sliced = grad_fn(cfg), grad_fn(_cfg(seq_balance_loss_alpha=1e-3, moe_token_chunk=4))
  (_, (y_ref, aux_ref)), g_ref = whole(variables['params'])
  mesh = (Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ('data', 'fsdp', 'expert', 'tensor'))
          if mesh_shape else None)
  with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
    (_, (y, aux)), g = sliced(variables['params'])
    text = sliced.lower(variables['params']).as_text()
  assert 'while' in text or 'scan' in text        # the slices really are a loop
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_array_equal(aux['load_e'], aux_ref['load_e'])
  assert int(aux['dropped']) == 0
  np.testing.assert_allclose(aux['balance_loss'], aux_ref['balance_loss'], rtol=1e-5)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5), g, g_ref)


def test_sequence_slices_count_drops_per_slice():
  """Capacities apply per slice and the drops of all slices are summed."""
  from kimi_vl_jax.models.moe import routed_in_slices
  from kimi_vl_jax.ops import moe_dispatch
  cfg = _cfg(moe_capacity_factor=1.0)
  d, f, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, 3
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, d))
  ws = [jnp.ones((e, d, f)) * 0.1, jnp.ones((e, d, f)) * 0.1, jnp.ones((e, f, d)) * 0.1]
  # Every token picks experts 0, 1, 2: a call of T tokens has capacity ceil(T * 3 / 8) per
  # expert, so T - ceil(3T / 8) drops per picked expert.
  idx = jnp.broadcast_to(jnp.array([0, 1, 2], jnp.int32), (1, 16, k))
  w = jnp.ones((1, 16, k)) / 3

  def routed(x, idx, w):
    bb, ss, _ = x.shape
    y, dropped = moe_dispatch.expert_ffn(x.reshape(-1, d), idx.reshape(-1, k), w.reshape(-1, k),
                                         *ws, backend='capacity', capacity_factor=1.0)
    return y.reshape(bb, ss, d), dropped

  _, whole = routed(x, idx, w)
  _, sliced = jax.jit(lambda *a: routed_in_slices(routed, *a, token_chunk=5, num_experts=e))(x, idx, w)
  assert int(whole) == 3 * (16 - 6)                   # one call of 16 tokens: capacity 6
  # Slices of 5, 5, 5 tokens (capacity 2: 3 drops per expert) and 1 token (no drops).
  assert int(sliced) == 3 * 3 * (5 - 2)
