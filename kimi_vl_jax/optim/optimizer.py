"""``build_optimizer``: Muon for matrices + AdamW for the rest, as one optax transformation.

    opt = build_optimizer(config.optim, params, mesh=mesh, trainable=('^vision/',),
                          total_steps=config.train.steps)
    state = jax.jit(opt.init, out_shardings=opt.state_shardings)(params)   # cheap re-init
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)

``params`` given to ``build_optimizer`` may be boxed (``nn.LogicallyPartitioned``, e.g. the
abstract output of ``jax.eval_shape(init)``: shardings come from the logical rules),
unboxed arrays / ShapeDtypeStructs (shardings from their ``.sharding``), or plain shapes
(replicated). ``init``/``update`` take UNBOXED trees of the same structure.

State (``MuonAdamWState``): ``mu`` holds Muon momentum and Adam first moments, ``nu`` Adam
second moments; frozen leaves (and ``nu`` of Muon leaves) are ``optax.MaskedNode()``, which
has no arrays, so frozen parameters allocate nothing. With a mesh every buffer is sharded
per ``zero1.py``. Both groups share the schedule lr and decoupled weight decay
``-lr * (direction + wd * W)``; frozen leaves get an exact zero update.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_vl_jax.optim import muon as muon_math
from kimi_vl_jax.optim import schedule as schedule_lib
from kimi_vl_jax.optim import zero1
from kimi_vl_jax.optim.routes import ADAMW, ROUTES, Route, route_params
from kimi_vl_jax.parallel.sharding import fit_spec_to_shape, fitted_param_shardings

GROUPS = ('muon', 'adamw')
ADAMW_ONLY = (('.*', ADAMW),)   # the AdamW baseline: one route for everything
_MASKED = optax.MaskedNode()


class MuonAdamWState(NamedTuple):
  count: jax.Array          # int32 []: updates applied so far
  mu: Any                   # params-shaped: Muon momentum / Adam first moment (fp32)
  nu: Any                   # params-shaped: Adam second moment (fp32)
  update_rms: dict          # {'muon', 'adamw'}: RMS of the last pre-lr direction per group


class Optimizer(optax.GradientTransformation):
  """An optax GradientTransformation that also carries its plan and state shardings."""
  plan: Any
  state_shardings: Any
  schedule: Any
  schedule_params: Any      # the schedule's numbers (``schedule.schedule_params``)


def _is_plan(x) -> bool:
  return isinstance(x, zero1.LeafPlan)


def _param_specs(params, mesh: Mesh, routes) -> list:
  """Canonical parameter specs, one per leaf, fitted to the shapes."""
  leaves_r = jax.tree.leaves(routes, is_leaf=lambda x: isinstance(x, Route))
  has_box = any(isinstance(x, nn.LogicallyPartitioned)
                for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
  if has_box:
    specs = [s.spec for s in jax.tree.leaves(fitted_param_shardings(params, mesh),
                                             is_leaf=lambda x: isinstance(x, NamedSharding))]
  else:
    specs = []
    for leaf in jax.tree.leaves(params):
      sharding = getattr(leaf, 'sharding', None)
      specs.append(sharding.spec if isinstance(sharding, NamedSharding) else P())
  # Size-1 mesh axes shard nothing; dropping them keeps the ZeRO-1 plans minimal.
  return [tuple(tuple(a for a in axes if mesh.shape[a] > 1)
                for axes in zero1.canon(fit_spec_to_shape(s, r.shape, mesh), len(r.shape)))
          for s, r in zip(specs, leaves_r)]


def plan_optimizer(params, mesh: Optional[Mesh] = None,
                   trainable: Optional[Sequence[str]] = None, routes_table=ROUTES) -> Any:
  """A params-shaped tree of ``zero1.LeafPlan`` (routes + shardings)."""
  routes = route_params(params, trainable, routes_table)
  leaves_r, treedef = jax.tree.flatten(routes, is_leaf=lambda x: isinstance(x, Route))
  if mesh is None:
    plans = [zero1.LeafPlan(r, (), (), 'none') for r in leaves_r]
  else:
    specs = _param_specs(params, mesh, routes)
    plans = [zero1.plan_leaf(r, pp, mesh) for r, pp in zip(leaves_r, specs)]
  return jax.tree.unflatten(treedef, plans)


def _dtype(name: str):
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f'config.optim.ns_dtype: must be float32 or bfloat16, got {name!r}')
  return jnp.dtype(name)


def build_optimizer(optim_cfg, params, mesh: Optional[Mesh] = None,
                    trainable: Optional[Sequence[str]] = None,
                    total_steps: Optional[int] = None) -> Optimizer:
  """Muon + AdamW (+ frozen) per the route table; ``optim_cfg`` is ``config.optim``.

  ``optim_cfg.name == 'adamw'`` sends every trainable leaf to AdamW (the baseline).
  ``trainable``: regexes over '/'-joined param paths; None = ``optim_cfg.trainable`` if
  present, else everything trains. ``total_steps``: decay horizon when
  ``optim_cfg.decay_steps`` is 0.
  """
  if optim_cfg.name not in ('muon', 'adamw'):
    raise ValueError(f'config.optim.name: must be muon or adamw, got {optim_cfg.name!r}')
  if trainable is None:
    trainable = optim_cfg.get('trainable', None) or None
  sched_params = schedule_lib.schedule_params(optim_cfg, total_steps)
  plan = plan_optimizer(params, mesh, trainable,
                        ADAMW_ONLY if optim_cfg.name == 'adamw' else ROUTES)
  plans, treedef = jax.tree.flatten(plan, is_leaf=_is_plan)
  mom, wd = float(optim_cfg.momentum), float(optim_cfg.weight_decay)
  b1, b2, eps = float(optim_cfg.b1), float(optim_cfg.b2), float(optim_cfg.eps)
  ns_steps, ns_dtype = int(optim_cfg.ns_steps), _dtype(optim_cfg.ns_dtype)

  def state_spec(p: zero1.LeafPlan):
    return NamedSharding(mesh, p.state_spec) if mesh is not None else None

  def init(params):
    leaves = treedef.flatten_up_to(params)
    mu, nu = [], []
    for p, x in zip(plans, leaves):
      if isinstance(x, nn.LogicallyPartitioned):
        raise TypeError(f'{p.route.path}: pass unboxed params to init (nn.unbox)')
      zeros = lambda: zero1.constrain(jnp.zeros(x.shape, jnp.float32), mesh, p.state_spec)
      t = p.route.treatment
      mu.append(_MASKED if t == 'frozen' else zeros())
      nu.append(zeros() if t == 'adamw' else _MASKED)
    return MuonAdamWState(jnp.zeros([], jnp.int32), treedef.unflatten(mu), treedef.unflatten(nu),
                          {g: jnp.zeros([], jnp.float32) for g in GROUPS})

  def update(grads, state, params=None, schedule_params=None):
    """``schedule_params`` (``schedule.schedule_params``, as arrays) replaces the schedule
    built from ``optim_cfg``: the lr becomes data, not a constant of the compiled program."""
    if params is None and wd:
      raise ValueError('build_optimizer: update needs params for weight decay')
    g_leaves = treedef.flatten_up_to(grads)
    w_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(plans)
    mu_leaves = treedef.flatten_up_to(state.mu)
    nu_leaves = treedef.flatten_up_to(state.nu)
    count_inc = optax.safe_increment(state.count)
    lr = schedule_lib.lr_at(state.count,
                            sched_params if schedule_params is None else schedule_params)
    sq = {g: jnp.zeros([], jnp.float32) for g in GROUPS}
    n_el = {g: 0 for g in GROUPS}
    out_u, out_mu, out_nu = [], [], []
    for p, g, w, m, v in zip(plans, g_leaves, w_leaves, mu_leaves, nu_leaves):
      t = p.route.treatment
      if t == 'frozen':
        out_u.append(jnp.zeros_like(g))
        out_mu.append(_MASKED)
        out_nu.append(_MASKED)
        continue
      if t == 'muon':
        r = p.route
        if mesh is None:
          n, m = muon_math.nesterov_momentum(g, m, mom)
          o = muon_math.orthogonalized(n, r.reduction, r.output, r.batch, ns_steps, ns_dtype)
        else:
          o, m = zero1.muon_leaf_update(g, m, p, mesh, momentum=mom, ns_steps=ns_steps,
                                        ns_dtype=ns_dtype)
        scale = muon_math.rms_scale(r.matrix_shape)
        d = o * scale
        # The RMS sum reads NS's output, not d: d then has one consumer (the update below)
        # and fuses into it instead of being written out as a full-size array.
        sq[t] = sq[t] + scale * scale * jnp.sum(jnp.square(o))
        out_nu.append(_MASKED)
      else:
        g_s = zero1.constrain(g, mesh, p.state_spec)
        d, m, v = muon_math.adam_direction(g_s, m, v, count_inc, b1, b2, eps)
        d = zero1.constrain(d, mesh, p.param_spec)
        sq[t] = sq[t] + jnp.sum(jnp.square(d))
        out_nu.append(v)
      out_mu.append(m)
      n_el[t] += int(np.prod(p.route.shape))
      step = d + wd * w.astype(jnp.float32) if wd else d
      out_u.append((-lr * step).astype(g.dtype))
    # Element counts as floats: at release scale they pass 2^31, and a Python int that large
    # cannot enter a traced int32 division (OverflowError at trace time).
    rms = {k: jnp.sqrt(sq[k] / float(max(n_el[k], 1))) for k in GROUPS}
    new_state = MuonAdamWState(count_inc, treedef.unflatten(out_mu), treedef.unflatten(out_nu), rms)
    return treedef.unflatten(out_u), new_state

  opt = Optimizer(init, update)
  opt.plan = plan
  opt.schedule = functools.partial(schedule_lib.lr_at, params=sched_params)
  opt.schedule_params = sched_params
  opt.state_shardings = None
  if mesh is not None:
    replicated = NamedSharding(mesh, P())
    opt.state_shardings = MuonAdamWState(
        replicated,
        treedef.unflatten([_MASKED if p.route.treatment == 'frozen' else state_spec(p)
                           for p in plans]),
        treedef.unflatten([state_spec(p) if p.route.treatment == 'adamw' else _MASKED
                           for p in plans]),
        {g: replicated for g in GROUPS})
  return opt


def optimizer_metrics(grads, params, state: MuonAdamWState, opt: Optimizer) -> dict:
  """Scalars to log: global and per-group grad / weight norms, per-group update RMS, lr.

  ``update_rms/muon`` is the RMS of 0.2 sqrt(max(A, B)) * NS(.) (about 0.2 by design);
  ``update_rms/adamw`` that of AdamW's m_hat / (sqrt(v_hat) + eps); both before lr and wd.
  ``state`` is the state AFTER the update whose RMS is logged.
  """
  plans, treedef = jax.tree.flatten(opt.plan, is_leaf=_is_plan)
  out = {}
  sq_g = {g: 0.0 for g in GROUPS + ('frozen',)}
  sq_w = dict(sq_g)
  for p, g, w in zip(plans, treedef.flatten_up_to(grads), treedef.flatten_up_to(params)):
    t = p.route.treatment
    sq_g[t] = sq_g[t] + jnp.sum(jnp.square(g.astype(jnp.float32)))
    sq_w[t] = sq_w[t] + jnp.sum(jnp.square(w.astype(jnp.float32)))
  out['grad_norm'] = jnp.sqrt(sq_g['muon'] + sq_g['adamw'])
  out['weight_norm'] = jnp.sqrt(sq_w['muon'] + sq_w['adamw'] + sq_w['frozen'])
  for k in GROUPS:
    out[f'grad_norm/{k}'] = jnp.sqrt(sq_g[k])
    out[f'weight_norm/{k}'] = jnp.sqrt(sq_w[k])
    out[f'update_rms/{k}'] = state.update_rms[k]
  out['lr'] = opt.schedule(jnp.maximum(state.count - 1, 0))
  return out
