"""Shared helpers of the trainer tests: a stand-in LM task and a sharded state on a sub-mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.train import losses, state as state_lib, step as step_lib


class _TinyLM(nn.Module):
  """A stand-in LM (embed -> dense -> lm_head) with logical annotations."""
  vocab: int = 32
  width: int = 16

  @nn.compact
  def __call__(self, tokens_bs):
    init = nn.initializers.normal(0.1)
    x = nn.Embed(self.vocab, self.width, embedding_init=nn.with_logical_partitioning(init, ('vocab', 'embed')),
                 name='embed')(tokens_bs)
    x = nn.tanh(nn.Dense(self.width, kernel_init=nn.with_logical_partitioning(init, ('embed', 'mlp')),
                         name='body')(x))
    return nn.Dense(self.vocab, kernel_init=nn.with_logical_partitioning(init, ('embed', 'vocab')),
                    name='lm_head')(x)


def _task(poison=False, vocab=32, width=16):
  model = _TinyLM(vocab, width)

  def init(rng):
    return model.init(rng, jnp.zeros((1, 8), jnp.int32))

  def loss(params, extra, batch, rng):
    logits = model.apply({'params': params, **extra}, batch['tokens'])
    if poison:
      logits = logits * jnp.where(batch['tokens'][0, 0] == 0, jnp.nan, 1.0)
    t, w = losses.shift_targets(batch['tokens'], batch['loss_mask'], batch['segment_ids'])
    s = losses.weighted_sums(losses.cross_entropy_from_logits(logits, t), w, None, 0)
    return s['loss_sum'], {'sums': {'denom': s['weight_sum']}}

  return step_lib.Task('tiny', init, loss)


def _mesh(devices=8):
  return mesh_lib.build_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, expert=1, tensor=1)),
                             jax.devices()[:devices])


def _setup(task, tx, cfg, trainable=None, devices=8):
  mesh = _mesh(devices)
  abstract = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  sh = state_lib.state_shardings(abstract, tx, mesh)

  def make():
    params, extra = state_lib.split_variables(nn.unbox(task.init(jax.random.PRNGKey(0))))
    return state_lib.create_state(params, extra, tx, jax.random.PRNGKey(1))

  st = jax.jit(make, out_shardings=sh)()
  return mesh, sh, st


def _batch(seed, b=8, s=8):
  rng = np.random.default_rng(seed)
  return {'tokens': rng.integers(1, 32, (b, s)).astype(np.int32),
          'segment_ids': np.ones((b, s), np.int32), 'loss_mask': np.ones((b, s), np.int32)}



class Toy:
  task = staticmethod(_task)
  mesh = staticmethod(_mesh)
  setup = staticmethod(_setup)
  batch = staticmethod(_batch)


@pytest.fixture
def toy():
  return Toy
