"""bench.optim helpers: the generated-text batches are deterministic byte tokens."""
import numpy as np

from kimi_vl_jax.bench import optim as bench_optim


def test_text_batches_are_deterministic_bytes_and_splits_differ():
  a = bench_optim.text_batches('train', 2, 3, 16)
  b = bench_optim.text_batches('train', 2, 3, 16)
  ev = bench_optim.text_batches('eval', 2, 3, 16)
  assert a.shape == (2, 3, 17) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert a.min() >= 0 and a.max() < 256
  assert not np.array_equal(a, ev)


def test_optim_cfg_keeps_lr_one_for_the_sweep():
  c = bench_optim.optim_cfg('muon', 30, 'float32')
  assert (c.name, c.lr, c.warmup_steps, c.schedule, c.ns_dtype) == ('muon', 1.0, 3, 'cosine',
                                                                    'float32')


def test_newton_schulz_flops_counts_each_matrix_of_a_stack_on_its_wide_side():
  import numpy as np
  params = {'w': np.zeros((4, 8)), 'experts': {'w_edf': np.zeros((3, 8, 16))},
            'norm': {'scale': np.zeros((8,))}}
  routes = bench_optim.routes_lib.route_params(params)
  assert routes['experts']['w_edf'].treatment == 'muon'
  per_iter_2d = 4 * 4 * 4 * 8 + 2 * 4 ** 3         # m=4, n=8
  per_iter_e = 4 * 8 * 8 * 16 + 2 * 8 ** 3          # m=8, n=16, 3 matrices
  assert bench_optim.newton_schulz_flops(params, 5) == 5 * (per_iter_2d + 3 * per_iter_e)


def test_time_steps_starts_every_call_from_the_same_state_and_alternates():
  import jax.numpy as jnp
  calls = []

  def make(name):
    def step(x, y, batch, lr):
      calls.append((name, float(x), float(y)))
      return x + 1, y + lr     # a step that advances its state
    return step

  states = {'adamw': (jnp.float32(0), jnp.float32(5)), 'muon': (jnp.float32(10), jnp.float32(5))}
  times = bench_optim.time_steps({'adamw': make('adamw'), 'muon': make('muon')}, states,
                                 (None, 1.0), reps=3, warmup=1)
  assert [c[0] for c in calls] == ['adamw', 'muon'] * 4
  assert {c for c in calls if c[0] == 'adamw'} == {('adamw', 0.0, 5.0)}
  assert {c for c in calls if c[0] == 'muon'} == {('muon', 10.0, 5.0)}
  assert all(len(v) == 3 and min(v) >= 0 for v in times.values())
