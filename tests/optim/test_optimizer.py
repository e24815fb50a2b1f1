"""build_optimizer on one device: 10 steps against optax.contrib.muon pieces; frozen leaves."""
import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape

from kimi_vl_jax.config import base_config
from kimi_vl_jax.optim import muon as muon_math
from kimi_vl_jax.optim import Route, build_optimizer, optimizer_metrics, route_params
from kimi_vl_jax.optim.schedule import make_schedule

STEPS = 10


def optim_cfg(**overrides):
  c = base_config('tiny').optim
  c.ns_dtype = 'float32'   # compared with an fp32 optax reference to 1e-5
  c.lr = 2e-2
  c.warmup_steps = 2
  c.weight_decay = 0.1
  c.update(overrides)
  return c


def reference(cfg, params_boxed, total_steps):
  """Muon from optax.contrib pieces + plain optax.adamw, with our routing (SPEC §4.3).

  optax's scale_by_muon uses bias-corrected EMA Nesterov momentum; the sum form of SPEC
  §4.1 is ``optax.trace(nesterov=True)`` followed by scale_by_muon with beta=0 (no
  momentum, no bias correction), which then only normalizes and runs Newton-Schulz.
  """
  routes = route_params(params_boxed)
  is_route = lambda x: isinstance(x, Route)
  labels = jax.tree.map(lambda r: r.treatment, routes, is_leaf=is_route)
  by_path = {r.path: r for r in jax.tree.leaves(routes, is_leaf=is_route)}

  def dim_nums(updates):   # the masked (muon-only) tree -> MuonDimensionNumbers per leaf
    def one(path, _):
      r = by_path['/'.join(str(k.key) for k in path)]
      return MuonDimensionNumbers(r.reduction, r.output)
    return jax.tree_util.tree_map_with_path(one, updates)

  schedule = make_schedule(cfg, total_steps)
  muon = optax.chain(
      optax.trace(decay=cfg.momentum, nesterov=True),
      scale_by_muon(ns_steps=cfg.ns_steps, beta=0.0, nesterov=False,
                    weight_dimension_numbers=dim_nums),
      scale_by_shape(dim_nums, consistent_rms=0.2),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.scale_by_learning_rate(schedule))
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  return optax.multi_transform({'muon': muon, 'adamw': adamw}, labels)


def run_steps(tx, params, grads_fn, steps=STEPS):
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    updates, state = tx.update(grads_fn(params, i), state, params)
    return optax.apply_updates(params, updates), state, updates

  history = []
  for i in range(steps):
    params, state, updates = step(params, state, i)
    history.append(updates)
  return params, state, history


def test_routes_of_tiny_tree(tiny):
  routes = {r.path: r for r in jax.tree.leaves(route_params(tiny.params()),
                                               is_leaf=lambda x: isinstance(x, Route))}
  assert routes['dense/kernel'].treatment == 'muon'
  assert routes['dense/bias'].treatment == 'adamw'
  assert routes['embed_tokens/embedding'].treatment == 'adamw'
  assert routes['lm_head/kernel'].treatment == 'adamw'
  assert routes['layers/input_norm/scale'].treatment == 'adamw'
  mlp = routes['layers/mlp/kernel']
  assert (mlp.batch, mlp.reduction, mlp.output) == ((0,), (1,), (2,))
  q = routes['layers/q_proj/kernel']   # embed -> (heads, kv): one matrix, never per head
  assert (q.batch, q.reduction, q.output, q.matrix_shape) == ((0,), (1,), (2, 3), (32, 32))
  o = routes['layers/o_proj/kernel']   # (heads, kv) -> embed
  assert (o.batch, o.reduction, o.output) == ((0,), (1, 2), (3,))
  assert routes['moe/experts/wi'].batch == (0,)
  assert routes['moe/gate/kernel'].batch == ()   # its 'experts' axis is the output, not a stack


@pytest.mark.parametrize('schedule', ['cosine'])
def test_ten_steps_match_optax_reference(schedule, tiny):
  cfg = optim_cfg(schedule=schedule)
  boxed = tiny.params()
  params = nn.unbox(boxed)
  ours = build_optimizer(cfg, boxed, total_steps=STEPS)
  ref = reference(cfg, boxed, STEPS)
  p_ours, state, hist_ours = run_steps(ours, params, tiny.grads)
  p_ref, _, hist_ref = run_steps(ref, params, tiny.grads)
  for u_ours, u_ref in zip(hist_ours, hist_ref):
    chex.assert_trees_all_close(u_ours, u_ref, atol=1e-5, rtol=0)
  chex.assert_trees_all_close(p_ours, p_ref, atol=1e-5, rtol=0)
  # The params really moved (a test that can fail): Muon's steps are ~lr * 0.2 per entry.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p_ours, params)
  assert min(jax.tree.leaves(moved)) > 1e-3
  metrics = optimizer_metrics(tiny.grads(p_ours, 0), p_ours, state, ours)
  assert 0.1 < float(metrics['update_rms/muon']) < 0.3, metrics
  assert float(metrics['grad_norm']) > 0 and float(metrics['weight_norm']) > 0


def test_newton_schulz_orthogonalizes_and_bf16_is_close():
  x = jax.random.normal(jax.random.key(0), (3, 48, 80))
  o32 = muon_math.newton_schulz(x, 5, jnp.float32)
  # Singular values land in NS's band around 1 (Keller Jordan's coefficients: ~0.7..1.2).
  sv = np.linalg.svd(np.asarray(o32), compute_uv=False)
  assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
  # Tall inputs are handled through the transpose: NS(X^T) == NS(X)^T.
  o_t = muon_math.newton_schulz(jnp.swapaxes(x, 1, 2), 5, jnp.float32)
  np.testing.assert_allclose(np.swapaxes(np.asarray(o_t), 1, 2), o32, atol=1e-5)
  o16 = muon_math.newton_schulz(x, 5, jnp.bfloat16)
  err = float(jnp.max(jnp.abs(o16 - o32)))
  assert 0 < err < 0.1, err   # bf16 rounding only; entries are ~0.1
  rel = float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32))
  assert rel < 0.03, rel


def _dots(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _dots(sub)


def test_bf16_newton_schulz_multiplies_bf16_and_accumulates_fp32():
  # bf16 x bf16 -> fp32 products (what accelerators do, and ~4x fp32's speed on CPUs with
  # AMX); a bf16-output dot would round every partial sum and run slower on CPU.
  x = jax.random.normal(jax.random.key(0), (2, 16, 24))
  dots = list(_dots(jax.make_jaxpr(lambda x: muon_math.newton_schulz(x, 5, jnp.bfloat16))(x).jaxpr))
  # X X^T, S^2, poly(S) X per loop body (one body per platform branch).
  assert dots and len(dots) % 3 == 0, len(dots)
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


@pytest.mark.parametrize('steps', [1, 2, 5])
@pytest.mark.parametrize('shape', [(2, 48, 24), (2, 24, 48)])
def test_bf16_newton_schulz_compiles_for_any_step_count(steps, shape):
  # With one step XLA drops the loop; a tall matrix's transpose folded into that dot used to
  # leave a bf16 x bf16 -> f32 dot XLA:CPU cannot run ("Unsupported element type for
  # DotThunk"), so config.optim.ns_steps=1 crashed inside the compiled step.
  x = jax.random.normal(jax.random.key(1), shape)
  o16 = jax.jit(lambda x: muon_math.newton_schulz(x, steps, jnp.bfloat16))(x)
  o32 = muon_math.newton_schulz(x, steps, jnp.float32)
  chex.assert_shape(o16, shape)
  rel = float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32))
  assert rel < 0.03, rel

def test_default_ns_dtype_is_bf16():
  assert base_config('tiny').optim.ns_dtype == 'bfloat16'


def test_frozen_params_have_no_state_and_do_not_move(tiny):
  boxed = tiny.params()
  params = nn.unbox(boxed)
  # Train only the MoE block and the norms (as a stage that freezes most of the model).
  tx = build_optimizer(optim_cfg(), boxed, trainable=[r'^moe/', r'norm'], total_steps=STEPS)
  new_params, state, _ = run_steps(tx, params, tiny.grads, 3)
  for path in (('dense', 'kernel'), ('embed_tokens', 'embedding'), ('layers', 'mlp', 'kernel')):
    old, new = params, new_params
    mu, nu = state.mu, state.nu
    for k in path:
      old, new, mu, nu = old[k], new[k], mu[k], nu[k]
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    assert isinstance(mu, optax.MaskedNode) and isinstance(nu, optax.MaskedNode)
  assert not np.allclose(params['moe']['experts']['wi'], new_params['moe']['experts']['wi'])
  # Muon leaves (gate, experts) hold a momentum; AdamW leaves (the two norms) two moments.
  n_expected = (params['moe']['gate']['kernel'].size + params['moe']['experts']['wi'].size
                + params['moe']['experts']['wo'].size
                + 2 * params['final_norm']['scale'].size
                + 2 * params['layers']['input_norm']['scale'].size)
  n_state = sum(x.size for x in jax.tree.leaves((state.mu, state.nu)))
  assert n_state == n_expected


def test_adamw_baseline_and_schedules(tiny):
  boxed = tiny.params()
  tx = build_optimizer(optim_cfg(name='adamw'), boxed, total_steps=STEPS)
  assert all(isinstance(m, jax.Array) for m in jax.tree.leaves(tx.init(nn.unbox(boxed)).nu))
  for name in ('cosine', 'linear', 'constant'):
    s = make_schedule(optim_cfg(schedule=name, warmup_steps=2, end_lr_ratio=0.1), 10)
    assert float(s(0)) == 0.0 and abs(float(s(2)) - 2e-2) < 1e-9
    end = float(s(10))
    assert abs(end - (2e-2 if name == 'constant' else 2e-3)) < 1e-8, (name, end)
  with pytest.raises(ValueError, match='decay_steps'):
    make_schedule(optim_cfg(), None)


def test_update_rms_is_the_rms_of_the_directions(tiny):
  """update_rms is computed from NS's output (not from the scaled direction); it must still
  equal the RMS of each group's pre-lr direction, recovered here from the update."""
  boxed = tiny.params()
  params = nn.unbox(boxed)
  cfg = optim_cfg(schedule='constant', warmup_steps=0, weight_decay=0.0)
  tx = build_optimizer(cfg, boxed, total_steps=STEPS)
  updates, state = jax.jit(tx.update)(tiny.grads(params, 0), tx.init(params), params)
  routes = jax.tree.leaves(route_params(boxed), is_leaf=lambda x: isinstance(x, Route))
  for group in ('muon', 'adamw'):
    d = [np.asarray(u, np.float64) / -cfg.lr for u, r in zip(jax.tree.leaves(updates), routes)
         if r.treatment == group]
    expected = np.sqrt(sum((x ** 2).sum() for x in d) / sum(x.size for x in d))
    np.testing.assert_allclose(float(state.update_rms[group]), expected, rtol=1e-5)

