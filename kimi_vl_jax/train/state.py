"""TrainState: everything a step reads and writes, as one pytree (what checkpoints hold).

- ``params``: the trainable collection (fp32 master weights by default).
- ``extra``: other variable collections that the step updates without gradients (e.g. the MoE
  router's ``e_score_correction_bias`` in collection 'router').
- ``opt_state``: the optimizer's state.
- ``rng``: the step's PRNG key (folded with the step number, so a resumed run draws the same keys).
- ``nonfinite_run``: consecutive steps whose loss or gradients were non-finite (update skipped).
- ``skipped_total``: all skipped steps of the stage.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_vl_jax.parallel import sharding as shard_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  extra: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_run: jax.Array
  skipped_total: jax.Array


def split_variables(variables: dict) -> tuple[Any, dict]:
  """{'params': p, 'router': r, ...} -> (p, {'router': r, ...})."""
  variables = dict(variables)
  params = variables.pop('params')
  return params, variables


def create_state(params, extra, tx: optax.GradientTransformation, rng) -> TrainState:
  """A fresh state at step 0 (call under jit to place it)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                    opt_state=tx.init(params), rng=rng,
                    nonfinite_run=jnp.zeros((), jnp.int32), skipped_total=jnp.zeros((), jnp.int32))


def abstract_variables(init_fn: Callable, *args):
  """Boxed abstract variables of ``init_fn(*args)`` (shapes + logical names, no allocation),
  with repeated logical names of one tensor replicated after their first use (flax rejects a
  name twice in one tensor, e.g. the (H, W) axes of MoonViT's position table, both 'vision_pos';
  a mesh axis can shard only one dimension anyway)."""
  def dedupe(box):
    if not isinstance(box, nn.LogicallyPartitioned):
      return box
    seen, names = set(), []
    for n in box.names:
      names.append(None if n is not None and n in seen else n)
      if n is not None:
        seen.add(n)
    return box.replace(names=tuple(names))

  return jax.tree.map(dedupe, jax.eval_shape(init_fn, *args),
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def state_shardings(boxed_abstract_variables, tx: optax.GradientTransformation, mesh: Mesh):
  """NamedShardings for the TrainState of a model whose abstract variables are given.

  Variables follow their logical annotations (``parallel/sharding.py``); the optimizer state's
  shardings are what XLA propagates from the parameters through ``tx.init`` (read from a compiled,
  not executed, init), so optimizer authors need not annotate their state.
  """
  var_sh = shard_lib.fitted_param_shardings(boxed_abstract_variables, mesh)
  abstract = nn.unbox(boxed_abstract_variables)
  params_abs, extra_abs = split_variables(abstract)
  params_sh, extra_sh = split_variables(var_sh)
  params_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           params_abs, params_sh)
  opt_sh = jax.jit(tx.init).lower(params_in).compile().output_shardings
  opt_sh = jax.tree.map(lambda s: _as_named(s, mesh), opt_sh)
  replicated = NamedSharding(mesh, P())
  return TrainState(step=replicated, params=params_sh, extra=extra_sh, opt_state=opt_sh,
                    rng=replicated, nonfinite_run=replicated, skipped_total=replicated)


def _as_named(s, mesh: Mesh) -> NamedSharding:
  if isinstance(s, NamedSharding):
    return s
  # GSPMD may return a positional sharding for fully replicated scalars.
  return NamedSharding(mesh, P())


def abstract_state(shardings: TrainState, init_state_fn: Callable) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the state, for restoring onto a (new) mesh."""
  shapes = jax.eval_shape(init_state_fn)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
