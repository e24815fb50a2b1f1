"""rules.py is THE table: every logical name a registered model component uses is in it.

Flax maps a logical name missing from the rules to None, so a typo ('experts ' or
'mlp_dim') would silently replicate a tensor; this test turns that into a failure.
"""
import flax.linen as nn
import jax

from kimi_vl_jax.config import base_config
from kimi_vl_jax.models.abstract import abstract_components
from kimi_vl_jax.parallel.rules import LOGICAL_AXES


def _logical_names(variables):
  boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return {name for box in boxes if isinstance(box, nn.LogicallyPartitioned)
          for name in box.names if name is not None}


def test_every_component_uses_only_names_from_the_table():
  components = abstract_components(base_config('tiny').model)
  assert components, 'no model components registered'
  for comp, (variables, _) in components.items():
    unknown = _logical_names(variables) - set(LOGICAL_AXES)
    assert not unknown, f'{comp} uses logical names missing from rules.py: {sorted(unknown)}'


def test_every_component_annotates_its_weight_matrices():
  """A >= 2-d parameter without logical names would be replicated on every device."""
  for comp, (variables, _) in abstract_components(base_config('tiny').model).items():
    flat = jax.tree_util.tree_flatten_with_path(
        variables.get('params', {}), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    bare = [jax.tree_util.keystr(path) for path, leaf in flat
            if not isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.shape) >= 2]
    assert not bare, f'{comp}: unannotated matrices {bare}'
