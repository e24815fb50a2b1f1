"""MoeLM behaviour: scan == unrolled, remat policies agree, segments isolated, padding inert."""
import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from ml_collections import FrozenConfigDict

from kimi_vl_jax.config.presets import get_preset
from kimi_vl_jax.convert import hf_lm
from kimi_vl_jax.models.abstract import abstract_components
from kimi_vl_jax.models.lm import MoeLM

B, S = 2, 16


def _cfg(**kw):
  cfg = get_preset('tiny').lm
  cfg.attention_backend = 'xla'
  cfg.attention_block_size = 8
  cfg.initializer_range = 0.2     # large enough that routing and logits are not trivial
  cfg.update(kw)
  return cfg


def _batch(seed=0):
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, 512, size=(B, S)).astype(np.int32)
  seg = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 11 + [0] * 5], np.int32)
  pos = np.array([list(range(5)) + list(range(7)) + list(range(4)),
                  list(range(11)) + [0] * 5], np.int32)
  return tokens, seg, pos


def random_variables(model, seed=0):
  """Random variables with init's structure, without compiling init (slow on a busy CPU)."""
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *_batch()))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  rs = np.random.RandomState(seed)
  out = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    if 'scale' in name:            # norm gains around 1
      out.append(1.0 + 0.2 * rs.randn(*leaf.shape))
    elif 'e_score_correction_bias' in name:
      out.append(0.05 * rs.randn(*leaf.shape))
    else:
      out.append(0.2 * rs.randn(*leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, leaf.dtype) for x, (_, leaf)
                                                in zip(out, leaves)])


@pytest.fixture(scope='module')
def scanned():
  cfg = _cfg()
  model = MoeLM(FrozenConfigDict(cfg))
  return cfg, model, random_variables(model), jax.jit(model.apply)


def test_scan_equals_unrolled(scanned):
  cfg, _, variables, apply = scanned
  flat = hf_lm.hf_from_params(variables, cfg)
  cfg_u = _cfg(scan_layers=False)
  vars_u = hf_lm.params_from_hf(flat, cfg_u)
  assert 'layers_1' in vars_u['params']['moe_layers']
  batch = _batch()
  a, aux_a = apply(variables, *batch)
  b, aux_b = jax.jit(MoeLM(FrozenConfigDict(cfg_u)).apply)(vars_u, *batch)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  np.testing.assert_array_equal(aux_a['load_le'], aux_b['load_le'])


def _scan_unrolls(fn, *args) -> set:
  """The ``unroll`` of every scan in ``fn``'s jaxpr (nested jaxprs included)."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'scan':
        found.add(eqn.params['unroll'])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_scan_unroll_keeps_the_params_and_the_function(scanned):
  """scan_unroll lays the layers out straight: same stacked params, same values and grads."""
  cfg, _, variables, apply = scanned
  model_u = MoeLM(FrozenConfigDict(_cfg(scan_unroll=4)))   # >= the 2-layer MoE stack: clipped
  batch = _batch()
  chex.assert_trees_all_equal_shapes(
      nn.unbox(jax.eval_shape(model_u.init, jax.random.PRNGKey(0), *batch)), variables)

  def loss(model, params):
    logits, _ = model.apply({'params': params, 'router': variables['router']}, *batch)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (batch[1] > 0))

  model = MoeLM(FrozenConfigDict(cfg))
  assert _scan_unrolls(lambda p: loss(model, p), variables['params']) == {1}
  assert _scan_unrolls(lambda p: loss(model_u, p), variables['params']) == {1, 2}  # dense: 1 layer
  want_l, want_g = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(variables['params'])
  got_l, got_g = jax.jit(jax.value_and_grad(lambda p: loss(model_u, p)))(variables['params'])
  np.testing.assert_allclose(got_l, want_l, rtol=1e-6)
  chex.assert_trees_all_close(got_g, want_g, atol=1e-6, rtol=1e-5)


def test_remat_policies_identical(scanned):
  # Two layers (1 dense + 1 MoE) keep the three gradient compiles short.
  model0 = MoeLM(FrozenConfigDict(_cfg(num_hidden_layers=2)))
  variables = random_variables(model0, seed=1)
  tokens, seg, pos = _batch()

  def loss_and_grad(policy):
    model = MoeLM(FrozenConfigDict(_cfg(num_hidden_layers=2, remat_policy=policy)))

    def loss(params):
      logits, _ = model.apply({'params': params, 'router': variables['router']}, tokens, seg, pos)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (seg > 0))

    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  ref_l, ref_g = loss_and_grad('none')
  for policy in ('full', 'save_dots'):
    l, g = loss_and_grad(policy)
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    chex.assert_trees_all_close(g, ref_g, atol=1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match='remat_policy'):
    MoeLM(FrozenConfigDict(_cfg(remat_policy='some'))).apply(variables, tokens, seg, pos)


def test_segments_isolated_and_padding_inert(scanned):
  cfg, _, variables, apply = scanned
  tokens, seg, pos = _batch()
  ref, aux = apply(variables, tokens, seg, pos)
  # Change every token of segment 2 in row 0 and every padding token of row 1.
  t2 = tokens.copy()
  t2[0, 5:12] = (t2[0, 5:12] + 17) % 512
  t2[1, 11:] = (t2[1, 11:] + 29) % 512
  out, aux2 = apply(variables, t2, seg, pos)
  keep = seg.copy()
  keep[0, 5:12] = 0            # segment 2 itself changes; padding rows are don't-care
  np.testing.assert_allclose(np.asarray(out)[keep > 0], np.asarray(ref)[keep > 0], atol=1e-6)
  assert float(np.abs(np.asarray(out)[0, 5:12] - np.asarray(ref)[0, 5:12]).max()) > 1e-3
  # Router load counts only non-padding tokens (27 of them), top-2 each, per MoE layer.
  np.testing.assert_allclose(np.asarray(aux['load_le']).sum(-1), 27 * cfg.num_experts_per_tok)


def test_inputs_embeds_and_soft_cap(scanned):
  cfg, model, variables, apply = scanned
  tokens, seg, pos = _batch()
  ref, _ = apply(variables, tokens, seg, pos)
  emb = model.apply(variables, jnp.asarray(tokens), method=MoeLM.embed)
  chex.assert_shape(emb, (B, S, cfg.hidden_size))
  # inputs_embeds + soft cap in one compile: cap(logits from embeds) == cap(logits from tokens).
  capped_model = MoeLM(FrozenConfigDict(_cfg(logits_soft_cap=0.5)))
  capped, _ = jax.jit(lambda v, e: capped_model.apply(v, tokens, seg, pos, inputs_embeds_bsd=e))(
      variables, emb)
  np.testing.assert_allclose(np.asarray(capped), 0.5 * np.tanh(np.asarray(ref) / 0.5), atol=1e-6)
  assert float(jnp.abs(capped).max()) <= 0.5
  with pytest.raises(ValueError, match='segment_ids'):
    model.apply(variables, tokens, seg[:, :4], pos)


def test_describe_counts_a3b():
  variables, spec = abstract_components(get_preset('kimi_vl_a3b'))['lm']
  from kimi_vl_jax.describe import count_params
  counts = count_params(variables, spec)
  assert abs(counts['total'] / 1e9 - 15.96) < 0.01, counts['total']
  assert 2.8 < counts['active'] / 1e9 < 2.95, counts['active']


def test_sharded_forward_matches_single_device(scanned):
  # Params sharded by their logical names (fsdp 2 x tensor 4), batch over fsdp, the
  # activation constraints active: same logits as one device.
  from jax.sharding import Mesh
  from kimi_vl_jax.parallel import sharding as shard_lib
  from kimi_vl_jax.parallel.rules import LOGICAL_AXIS_RULES
  cfg, model, variables, apply = scanned
  tokens, seg, pos = _batch()
  ref, _ = apply(variables, tokens, seg, pos)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 2, 1, 4), ('data', 'fsdp', 'expert', 'tensor'))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *_batch())
  shardings = shard_lib.fitted_param_shardings(abstract, mesh)
  sharded_vars = jax.device_put(variables, shardings)
  batch = [jax.device_put(x, shard_lib.batch_sharding(mesh, 2)) for x in (tokens, seg, pos)]
  assert sharded_vars['params']['lm_head']['kernel'].sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    out, _ = jax.jit(model.apply)(sharded_vars, *batch)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
