"""Logical annotations -> NamedShardings: parameters and batches land where rules.py says,
on 8 simulated CPU devices, for several meshes (checked on real arrays, per device)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_vl_jax.parallel import sharding
from kimi_vl_jax.parallel.mesh import build_mesh
from kimi_vl_jax.parallel.rules import LOGICAL_AXES, LOGICAL_AXIS_RULES

VOCAB, EMBED, MLP, EXPERTS, EXPERT_MLP, LAYERS, HEADS, KV, NORM = 32, 16, 24, 8, 8, 2, 4, 6, 3


def _iota(key, shape, dtype=jnp.float32):
  """Every element distinct and known (no RNG: cheap to compile, and a shard's contents
  show exactly which slice of the global array it holds)."""
  del key
  return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape)


def _boxed(axes):
  return nn.with_logical_partitioning(_iota, axes)


class ToyModel(nn.Module):
  """A miniature of the real model's parameter kinds, each annotated like the real ones."""

  @nn.compact
  def __call__(self, tokens_bs):
    emb_ve = self.param('embedding', _boxed(('vocab', 'embed')), (VOCAB, EMBED))
    w_in_ef = self.param('w_in', _boxed(('embed', 'mlp')), (EMBED, MLP))
    w_out_fe = self.param('w_out', _boxed(('mlp', 'embed')), (MLP, EMBED))
    w_edf = self.param('experts', _boxed(('experts', 'embed', 'expert_mlp')),
                       (EXPERTS, EMBED, EXPERT_MLP))
    w_q_lehk = self.param('q_proj', _boxed(('layers', 'embed', 'heads', 'kv')),
                          (LAYERS, EMBED, HEADS, KV))
    scale_n = self.param('norm', _boxed(('norm',)), (NORM,))
    bias_f = self.param('bias', _iota, (MLP,))  # unannotated: replicated
    x_bse = emb_ve[tokens_bs]
    x_bse = nn.with_logical_constraint(x_bse, ('batch', 'length', 'act_embed'))
    h_bsf = jax.nn.relu(x_bse @ w_in_ef + bias_f)
    y_bse = h_bsf @ w_out_fe + jnp.einsum('bse,def->bsf', x_bse, w_edf).sum(-1, keepdims=True)
    y_bse = y_bse + jnp.einsum('bse,lehk->bs', x_bse, w_q_lehk)[..., None] * scale_n.sum()
    return nn.with_logical_constraint(y_bse, ('batch', 'length', 'act_embed'))


TOKENS = np.arange(16 * 4).reshape(16, 4) % VOCAB

# mesh sizes -> {param: (expected PartitionSpec after fitting, expected per-device shard shape)}
CASES = {
    'data8': (dict(data=8, fsdp=1, expert=1, tensor=1), {
        'embedding': (P('tensor', 'fsdp'), (VOCAB, EMBED)),
        'w_in': (P('fsdp', 'tensor'), (EMBED, MLP)),
        'w_out': (P('tensor', 'fsdp'), (MLP, EMBED)),
        'experts': (P('expert', 'fsdp', 'tensor'), (EXPERTS, EMBED, EXPERT_MLP)),
        'q_proj': (P(None, 'fsdp', 'tensor', None), (LAYERS, EMBED, HEADS, KV)),
        'norm': (P(None), (NORM,)),
        'bias': (P(), (MLP,)),
    }, 16 // 8),
    'data2_fsdp2_tensor2': (dict(data=2, fsdp=2, expert=1, tensor=2), {
        'embedding': (P('tensor', 'fsdp'), (VOCAB // 2, EMBED // 2)),
        'w_in': (P('fsdp', 'tensor'), (EMBED // 2, MLP // 2)),
        'w_out': (P('tensor', 'fsdp'), (MLP // 2, EMBED // 2)),
        'experts': (P('expert', 'fsdp', 'tensor'), (EXPERTS, EMBED // 2, EXPERT_MLP // 2)),
        'q_proj': (P(None, 'fsdp', 'tensor', None), (LAYERS, EMBED // 2, HEADS // 2, KV)),
        'norm': (P(None), (NORM,)),
        'bias': (P(), (MLP,)),
    }, 16 // 4),
    'expert4_fsdp2': (dict(data=1, fsdp=2, expert=4, tensor=1), {
        'embedding': (P('tensor', 'fsdp'), (VOCAB, EMBED // 2)),
        'w_in': (P('fsdp', 'tensor'), (EMBED // 2, MLP)),
        'w_out': (P('tensor', 'fsdp'), (MLP, EMBED // 2)),
        'experts': (P('expert', 'fsdp', 'tensor'), (EXPERTS // 4, EMBED // 2, EXPERT_MLP)),
        'q_proj': (P(None, 'fsdp', 'tensor', None), (LAYERS, EMBED // 2, HEADS, KV)),
        'norm': (P(None), (NORM,)),
        'bias': (P(), (MLP,)),
    }, 16 // 8),
    'tensor8_uneven': (dict(data=1, fsdp=1, expert=1, tensor=8), {
        # HEADS=4 and KV do not split 8 ways: fit_spec_to_shape replicates those dims.
        'embedding': (P('tensor', 'fsdp'), (VOCAB // 8, EMBED)),
        'w_in': (P('fsdp', 'tensor'), (EMBED, MLP // 8)),
        'w_out': (P('tensor', 'fsdp'), (MLP // 8, EMBED)),
        'experts': (P('expert', 'fsdp', 'tensor'), (EXPERTS, EMBED, EXPERT_MLP // 8)),
        'q_proj': (P(None, 'fsdp', None, None), (LAYERS, EMBED, HEADS, KV)),
        'norm': (P(None), (NORM,)),
        'bias': (P(), (MLP,)),
    }, 16),
}


@pytest.fixture(scope='module', autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, 'tests run with 8 simulated CPU devices (see tests/conftest.py)'


def _padded(spec, ndim):
  """P() and P(None, None) mean the same for a 2-d array; compare in full length."""
  return tuple(spec) + (None,) * (ndim - len(spec))


def _mesh(sizes):
  return build_mesh(ml_collections.ConfigDict(sizes))


@pytest.mark.parametrize('case', list(CASES))
def test_params_land_where_the_rules_say(case):
  sizes, expected, _ = CASES[case]
  mesh = _mesh(sizes)
  model = ToyModel()
  init = lambda key: model.init(key, jnp.asarray(TOKENS))
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.fitted_param_shardings(abstract, mesh)
  params = jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(jax.random.key(0))
  assert set(params['params']) == set(expected)
  for name, (spec, shard_shape) in expected.items():
    array = params['params'][name]
    assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == mesh
    assert _padded(array.sharding.spec, array.ndim) == _padded(spec, array.ndim), (
        name, array.sharding.spec)
    assert len(array.addressable_shards) == 8
    full = np.arange(np.prod(array.shape), dtype=np.float32).reshape(array.shape)
    for shard in array.addressable_shards:
      assert shard.data.shape == shard_shape, (name, shard.device, shard.data.shape)
      # Each device holds exactly its slice of the (known) global array.
      np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


@pytest.mark.parametrize('case', list(CASES))
def test_batches_land_on_the_data_parallel_axes(case):
  sizes, _, rows_per_device = CASES[case]
  mesh = _mesh(sizes)
  patches = np.random.default_rng(0).normal(size=(16, 5, 12)).astype(np.float32)
  batch = sharding.make_global_batch({'tokens': TOKENS.astype(np.int32), 'patches': patches}, mesh)
  assert batch['tokens'].sharding.spec == P(('data', 'fsdp', 'expert'), None)
  assert batch['patches'].sharding.spec == P(('data', 'fsdp', 'expert'), None, None)
  for name, host in (('tokens', TOKENS), ('patches', patches)):
    for shard in batch[name].addressable_shards:
      assert shard.data.shape == (rows_per_device,) + host.shape[1:]
      np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
  # Devices that differ only along 'tensor' hold the same rows; along data/fsdp/expert they differ.
  by_device = {s.device: s.index[0] for s in batch['tokens'].addressable_shards}
  grid = mesh.devices
  for idx in np.ndindex(grid.shape[:3]):
    rows = {(by_device[d].start, by_device[d].stop) for d in grid[idx].flat}
    assert len(rows) == 1
  distinct = {(r.start, r.stop) for r in by_device.values()}
  assert len(distinct) == 16 // rows_per_device


def test_step_with_logical_constraints_keeps_the_batch_sharded():
  sizes, _, rows_per_device = CASES['data2_fsdp2_tensor2']
  mesh = _mesh(sizes)
  model = ToyModel()
  abstract = jax.eval_shape(lambda k: model.init(k, jnp.asarray(TOKENS)), jax.random.key(0))
  p_shardings = sharding.fitted_param_shardings(abstract, mesh)
  params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.asarray(TOKENS))),
                   out_shardings=p_shardings)(jax.random.key(1))
  tokens = sharding.make_global_batch(TOKENS.astype(np.int32), mesh)

  @jax.jit
  def forward(variables, tokens_bs):
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      return model.apply(variables, tokens_bs)

  with jax.set_mesh(mesh):
    y = forward(params, tokens)
  # The compiler may drop size-1 axes (expert=1) from the spec; compare what it means.
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(('data', 'fsdp', 'expert'))), 3)
  assert all(s.data.shape == (rows_per_device, 4, EMBED) for s in y.addressable_shards)
  ref = jax.jit(model.apply)(jax.device_get(params), TOKENS)  # one device, no constraints
  chex.assert_trees_all_close(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('spec,shape,sizes,expected', [
    (P('fsdp', 'tensor'), (3, 8), dict(fsdp=2, tensor=2), P(None, 'tensor')),
    (P(('data', 'fsdp')), (6,), dict(data=2, fsdp=2), P('data')),
    (P(('data', 'fsdp')), (8,), dict(data=2, fsdp=2), P(('data', 'fsdp'))),
    (P(('data', 'fsdp')), (2,), dict(data=2, fsdp=2), P('data')),
    (P(('data', 'fsdp')), (3,), dict(data=2, fsdp=2), P(None)),
    (P('tensor'), (8, 5), dict(tensor=4), P('tensor', None)),  # short spec padded
    (P(None, 'expert'), (5, 4), dict(expert=4), P(None, 'expert')),
])
def test_fit_spec_to_shape(spec, shape, sizes, expected):
  full = dict(data=1, fsdp=1, expert=1, tensor=1)
  full.update(sizes)
  full = {k: v for k, v in full.items()}
  n = int(np.prod(list(full.values())))
  mesh = build_mesh(ml_collections.ConfigDict(full), devices=jax.devices()[:n])
  assert sharding.fit_spec_to_shape(spec, shape, mesh) == expected


def test_logical_to_spec_follows_the_table():
  assert sharding.logical_to_spec(('batch', 'length', 'act_embed')) == P(
      ('data', 'fsdp', 'expert'), None, None)
  assert sharding.logical_to_spec(('experts', 'embed', 'expert_mlp')) == P('expert', 'fsdp', 'tensor')
  assert sharding.logical_to_spec(('vision_embed', 'vision_mlp')) == P('fsdp', 'tensor')
  # Rule order is priority: 'batch' takes 'expert' first, so an expert activation axis
  # next to a batch axis stays unsplit.
  assert sharding.logical_to_spec(('batch', 'act_experts')) == P(('data', 'fsdp', 'expert'), None)
  assert len(set(LOGICAL_AXES)) == len(LOGICAL_AXES), 'a logical name is listed twice'
  mesh_axes = {'data', 'fsdp', 'expert', 'tensor'}
  for name, target in LOGICAL_AXIS_RULES:
    targets = () if target is None else ((target,) if isinstance(target, str) else target)
    assert set(targets) <= mesh_axes, (name, target)


def test_batch_shardings_tree():
  mesh = _mesh(dict(data=2, fsdp=2, expert=2, tensor=1))
  tree = {'a': np.zeros((8, 3)), 'b': jax.ShapeDtypeStruct((8,), jnp.int32)}
  out = sharding.batch_shardings(tree, mesh)
  assert out['a'].spec == P(('data', 'fsdp', 'expert'), None)
  assert out['b'].spec == P(('data', 'fsdp', 'expert'))


def test_a_repeated_logical_name_shards_only_its_first_dim():
  """rules.py labels both (H, W) dims of a position table 'vision_pos'; Flax rejects repeats."""
  assert sharding.logical_to_spec(('vision_pos', 'vision_pos', 'vision_embed')) == P(
      None, None, 'fsdp')
  assert sharding.logical_to_spec(('embed', 'embed')) == P('fsdp', None)
  mesh = _mesh(dict(data=1, fsdp=4, expert=1, tensor=2))
  table = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 8, 16), jnp.float32),
                                  ('vision_pos', 'vision_pos', 'vision_embed'))
  mesh_named = nn.Partitioned(jax.ShapeDtypeStruct((8, 4), jnp.float32), ('tensor', None))
  out = sharding.fitted_param_shardings(
      {'params': {'pos': table, 'raw': mesh_named, 'plain': jnp.zeros((3,))}}, mesh)['params']
  assert out['pos'].spec == P(None, None, 'fsdp')
  assert out['raw'].spec == P('tensor', None)
  assert _padded(out['plain'].spec, 1) == (None,)


@pytest.mark.parametrize('case', list(CASES))
def test_a_full_host_batch_becomes_the_same_global_batch(case):
  """Every process holding the whole batch (the RL rollouts) gives what per-process slices
  give; on one process the slice is the whole batch, so the two must agree exactly."""
  sizes, _, _ = CASES[case]
  mesh = _mesh(sizes)
  patches = np.random.default_rng(1).normal(size=(16, 5, 12)).astype(np.float32)
  host = {'tokens': TOKENS.astype(np.int32), 'patches': patches,
          'weight': np.linspace(0, 1, 16, dtype=np.float32)}
  full = sharding.make_global_batch_from_full(host, mesh)
  ref = sharding.make_global_batch(host, mesh)
  for name, x in host.items():
    assert full[name].shape == x.shape and full[name].dtype == x.dtype
    assert full[name].sharding == ref[name].sharding, name
    got = {s.device: np.asarray(s.data) for s in full[name].addressable_shards}
    for s in ref[name].addressable_shards:
      np.testing.assert_array_equal(got[s.device], np.asarray(s.data))
      np.testing.assert_array_equal(got[s.device], x[s.index])


def test_a_full_host_batch_follows_any_device_order():
  """The rows a device gets come from its place in the mesh, not from the device list."""
  devices = np.asarray(jax.devices()[::-1][:8]).reshape(4, 2, 1, 1)   # a permuted mesh
  mesh = jax.sharding.Mesh(devices, ('data', 'fsdp', 'expert', 'tensor'))
  x = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  out = sharding.make_global_batch_from_full({'x': x}, mesh)['x']
  for s in out.addressable_shards:
    np.testing.assert_array_equal(np.asarray(s.data), x[s.index])
  np.testing.assert_array_equal(sharding.gather_to_host(out), x)


def test_gather_to_host_on_one_process_is_device_get():
  mesh = _mesh(dict(data=4, fsdp=2, expert=1, tensor=1))
  x = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
  tree = {'sharded': sharding.make_global_batch_from_full(x, mesh),
          'scalar': jnp.float32(2.5), 'host': np.ones((2,), np.int32)}
  out = sharding.gather_to_host(tree)
  np.testing.assert_array_equal(out['sharded'], x)
  assert isinstance(out['sharded'], np.ndarray) and out['scalar'] == 2.5
  assert out['scalar'].shape == () and out['host'].dtype == np.int32
