"""The route table: treatments, axes, frozen patterns, and the printed report."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kimi_vl_jax.config import base_config
from kimi_vl_jax.models import abstract
from kimi_vl_jax.optim import routes


class _FakeLM(nn.Module):
  """A scanned stack of Dense layers with logical names, like the LM registers."""

  @nn.compact
  def __call__(self, x):
    emb = self.param('embedding', nn.with_logical_partitioning(
        nn.initializers.normal(), ('vocab', 'embed')), (16, 8))
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(), ('layers', 'embed', 'mlp')), (3, 8, 24))
    scale = self.param('norm_scale', nn.with_logical_partitioning(
        nn.initializers.ones, ('norm',)), (8,))
    return emb[x] * scale @ kernel[0]


@pytest.fixture
def fake_component():
  def build(model_cfg):
    variables = jax.eval_shape(lambda: _FakeLM().init(jax.random.key(0), jnp.zeros((2,), jnp.int32)))
    return variables, abstract.ComponentSpec()
  abstract._BUILDERS['fake_lm_for_routes_test'] = build
  yield
  del abstract._BUILDERS['fake_lm_for_routes_test']


def test_report_lists_registered_params(fake_component):
  text = routes.routes_report(base_config('tiny').model)
  lines = {l.split()[0]: l for l in text.splitlines() if l and not l.startswith(('==', 'path', 'params'))}
  assert 'adamw' in lines['embedding'] and 'muon' in lines['kernel']
  assert '8x24' in lines['kernel'] and '0:layers' in lines['kernel']
  assert 'adamw' in lines['norm_scale']
  frozen = routes.routes_report(base_config('tiny').model, trainable=['norm'])
  assert 'frozen' in [l for l in frozen.splitlines() if 'kernel' in l][0]


def test_explicit_axes_and_errors():
  r = routes.route_leaf('x/w', (6, 4, 5), None, routes=(('.*', routes.MuonAxes((-3, -2), (-1,))),))
  assert (r.reduction, r.output, r.batch, r.matrix_shape) == ((0, 1), (2,), (), (24, 5))
  assert routes.route_leaf('x/kernel', (7,)).treatment == 'adamw'         # not a matrix
  assert routes.route_leaf('a/kernel', (2, 3, 4)).batch == (0,)          # unnamed: leading = batch
  with pytest.raises(ValueError, match='invalid Muon axes'):
    routes.route_leaf('x/w', (6, 4), None, routes=(('.*', routes.MuonAxes((0,), (0,))),))
  with pytest.raises(ValueError, match=r'not a valid regex'):
    routes.route_leaf('x/w', (6, 4), None, trainable=['('])
