"""describe: counts and shardings from abstract shapes only, for a fake component (exact
numbers) and for the registered model components on the tiny and A3B presets."""
import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from kimi_vl_jax import describe as describe_lib
from kimi_vl_jax.config import base_config
from kimi_vl_jax.models import abstract
from kimi_vl_jax.models.abstract import ComponentSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeMoE(nn.Module):
  """embed [64, 8] + a routed stack [4 experts, 8, 32] + a norm [8]."""

  @nn.compact
  def __call__(self, x):
    self.param('embed', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab', 'embed')),
               (64, 8))
    with_experts = nn.with_logical_partitioning(nn.initializers.zeros,
                                                ('experts', 'embed', 'expert_mlp'))
    self.param('experts_w', with_experts, (4, 8, 32))
    self.param('norm', nn.initializers.ones, (8,))  # unannotated: replicated
    return x


def _fake_builder(model_cfg):
  del model_cfg
  variables = jax.eval_shape(lambda: FakeMoE().init(jax.random.key(0), jnp.zeros(1)))
  return variables, ComponentSpec(routed_expert_key='experts_w', active_fraction=0.25)


@pytest.fixture
def fake_registered():
  """Registers the fake through the real ``register`` hook and removes it afterwards."""
  abstract.register('fake_moe')(_fake_builder)
  yield
  abstract._BUILDERS.pop('fake_moe', None)


def test_fake_component_counts_and_shardings(fake_registered, monkeypatch):
  # Only the fake: real components are covered below.
  monkeypatch.setattr(describe_lib, 'abstract_components',
                      lambda model_cfg: {'fake_moe': abstract._BUILDERS['fake_moe'](model_cfg)})
  c = base_config('tiny')
  c.mesh.update(dict(data=1, fsdp=2, expert=4, tensor=1))
  lines = []
  result = describe_lib.describe(c, print_fn=lines.append)
  expert = 4 * 8 * 32
  assert result['fake_moe']['total'] == 64 * 8 + expert + 8
  assert result['fake_moe']['active'] == 64 * 8 + expert * 0.25 + 8
  assert result['all'] == {'total': 64 * 8 + expert + 8, 'active': 64 * 8 + expert * 0.25 + 8}
  text = '\n'.join(lines)
  assert lines[0].startswith('model preset: tiny   mesh: data=1 x fsdp=2 x expert=4 x tensor=1 '
                             '(8 devices)')
  assert '== fake_moe: total 1.54K (1,544), active per token 776' in text
  # The largest tensor first, with its logical axes, mesh spec and per-device shard.
  rows = describe_lib.largest_tensors(_fake_builder(None)[0],
                                      dict(data=1, fsdp=2, expert=4, tensor=1))
  assert [r['name'] for r in rows] == ['params/experts_w', 'params/embed', 'params/norm']
  assert rows[0]['spec'] == P('expert', 'fsdp', 'tensor') and rows[0]['shard'] == (1, 4, 32)
  assert rows[1]['spec'] == P('tensor', 'fsdp') and rows[1]['shard'] == (64, 4)
  assert rows[2]['spec'] == P() and rows[2]['shard'] == (8,)
  assert "params/experts_w" in text and "P('expert', 'fsdp', 'tensor')" in text


def test_register_hook_reaches_abstract_components(fake_registered):
  components = abstract.abstract_components(base_config('tiny').model)
  assert 'fake_moe' in components
  variables, spec = components['fake_moe']
  assert spec.active_fraction == 0.25
  leaf = variables['params']['experts_w']
  assert isinstance(leaf, nn.LogicallyPartitioned)
  assert isinstance(leaf.value, jax.ShapeDtypeStruct)  # abstract: nothing allocated


def _count_leaves(variables):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(variables['params'])))


def test_tiny_preset_with_the_registered_components():
  c = base_config('tiny')
  lines = []
  result = describe_lib.describe(c, print_fn=lines.append)
  components = abstract.abstract_components(c.model)
  assert {'lm', 'vision', 'projector'} <= set(result)
  for name, (variables, _) in components.items():
    assert result[name]['total'] == _count_leaves(variables), name
  assert result['lm']['active'] < result['lm']['total']  # routed experts count 2 of 8
  assert result['vision']['active'] == result['vision']['total']
  assert result['all']['total'] == sum(result[n]['total'] for n in components)
  assert any('(8 devices)' in l for l in lines)


def _a3b_config():
  spec = importlib.util.spec_from_file_location('a3b', os.path.join(REPO, 'experiments',
                                                                    'kimi_vl_a3b.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_a3b_counts_match_the_spec():
  """SPEC §3.4: LM ~15.96B total, ~2.9B active; MoonViT ~412M (+ its 64x64 table); projector ~30.7M."""
  lines = []
  result = describe_lib.describe(_a3b_config(), print_fn=lines.append)
  assert result['lm']['total'] == pytest.approx(15.96e9, rel=0.005)
  assert 2.8e9 <= result['lm']['active'] <= 3.0e9
  assert 405e6 <= result['vision']['total'] <= 420e6
  assert result['projector']['total'] == pytest.approx(30.7e6, rel=0.01)
  assert lines[0].startswith('model preset: kimi_vl_a3b   mesh: data=1 x fsdp=16 x expert=8 x '
                             'tensor=1 (128 devices)')
  # A routed expert stack splits over expert x fsdp on the pod mesh.
  down = [l for l in lines if 'experts/down_proj' in l]
  assert down and "P(None, 'expert', 'tensor', 'fsdp')" in down[0] and '(26, 8, 1408, 128)' in down[0]


def test_free_axis_mesh_the_host_cannot_hold_is_described_at_its_smallest():
  """expert=8 with fsdp=-1 (the fine-tuning recipe) on a host of fewer devices: describe uses
  the smallest mesh the fixed axes allow instead of failing on this host's device count."""
  c = base_config('tiny')
  c.mesh.update(dict(data=3, fsdp=-1, expert=1, tensor=1))   # 3 does not divide 8 devices
  lines = []
  describe_lib.describe(c, print_fn=lines.append)
  assert 'data=3 x fsdp=1' in lines[0] and '(3 devices; this host has 8' in lines[0], lines[0]
