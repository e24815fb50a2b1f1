"""One jitted train step: loss, gradients (optionally accumulated over microbatches), global-norm
clipping, optimizer update, router-bias update and metrics, with explicit in/out shardings.

A ``Task`` says what is trained: ``init(rng) -> variables`` and
``loss(params, extra, batch, rng) -> (objective_sum, aux)`` where ``aux['sums']`` are added over
microbatches (must contain ``denom``, the normalizer of ``objective_sum``, e.g. the number of
target tokens) and ``aux['means']`` are averaged. Dividing the summed objective by the summed
denominator once makes accumulation over M microbatches equal to one big batch.

A term that couples every example of the batch (SigLIP's contrastive loss: each image against
every caption) is not a sum over microbatches. A task declares it as ``Task.coupled``
(``CoupledLoss``), and with M > 1 the step splits it off as GradCache does (Gao et al. 2021):
1. a forward pass over each microbatch collects the per-example embeddings the term reads
   (only what they need is computed: the rest of the forward is dead code to XLA);
2. the term on the whole batch's embeddings, differentiated with respect to the parameters it
   reads directly and to each embedding;
3. forward+backward over each microbatch of its local objective plus
   ``<stop_gradient(d term / d embedding), embedding>``, which carries the term's gradient
   into the towers.
Gradients and loss then equal one big batch's, at the cost of one more forward pass.

Per-stage numbers as data: ``step(state, batch, hparams)`` with ``hparams = step_hparams(...)``
takes the lr schedule's numbers and the router-bias rate as arguments instead of compiling them
in, so stages that differ only in those numbers (joint pretraining and cooldown; long-context
and SFT at one context length) run one program, compiled once and then read from the
persistent compilation cache. Without ``hparams`` they come from ``StepConfig`` and the
optimizer's own schedule.

Non-finite loss or gradients: parameters, optimizer state and router stay as they were, the step
counts as skipped, and ``nonfinite_run`` grows; the loop raises after N in a row. So a state never
holds NaNs, and neither does a checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_vl_jax.optim.schedule import lr_at
from kimi_vl_jax.parallel import sharding as shard_lib
from kimi_vl_jax.train import losses
from kimi_vl_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class CoupledLoss:
  """A task's objective split into a per-example part and a whole-batch part (module docstring).

  ``split(params, extra, batch, rng) -> (local_objective_sum, aux, embeddings)``: ``aux`` as
  ``Task.loss`` returns it; ``embeddings`` a pytree of float per-example arrays ``[B, ...]``.
  ``objective(params, embeddings, sums) -> (objective_sum, means)``: the coupled term on the
  embeddings of a whole batch, with that batch's summed ``aux['sums']``.
  ``Task.loss`` must equal ``local + objective(...)`` on any one batch (tested per task).
  """
  split: Callable[..., tuple[jax.Array, dict, Any]]
  objective: Callable[..., tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Task:
  """What a stage trains (see the module docstring)."""
  name: str
  init: Callable[[jax.Array], dict]
  loss: Callable[..., tuple[jax.Array, dict]]
  source_names: tuple[str, ...] = ()
  model: Any = None           # the Flax module, for evaluation / generation
  model_config: Any = None
  coupled: Optional[CoupledLoss] = None   # a whole-batch term (module docstring)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  microbatches: int = 1
  grad_clip_norm: float = 1.0          # 0 = off
  router_bias_rate: float = 0.0        # u of b += u * sign(mean_load - load); 0 = frozen bias
  param_cast_dtype: str = 'none'       # 'bfloat16': forward/backward in bf16 from fp32 masters


def step_hparams(tx, cfg: StepConfig) -> dict:
  """The runtime numbers of a step (module docstring): float32 host scalars."""
  return {'schedule': dict(tx.schedule_params),
          'router_bias_rate': np.float32(cfg.router_bias_rate)}


def _cast(tree, dtype_name: str):
  if dtype_name in ('none', '', None):
    return tree
  dtype = jnp.dtype(dtype_name)
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _split_micro(batch, m: int):
  """[B, ...] -> [M, B/M, ...] taking rows i*M + j into microbatch j, so every data shard
  contributes equally to each microbatch (no resharding of the batch axis)."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _masked(tree, mask, fill_fn):
  if mask is None:
    return tree
  return jax.tree.map(lambda x, keep: x if keep else fill_fn(x), tree, mask)


def make_train_step(task: Task, tx: optax.GradientTransformation, cfg: StepConfig,
                    trainable: Optional[Any] = None,
                    lr_fn: Optional[Callable[[jax.Array], jax.Array]] = None):
  """Returns ``step(state, batch) -> (state, metrics)`` (pure; jit it with ``jit_train_step``).

  Args:
    trainable: optional pytree of python bools matching ``params``; False leaves get no gradient
      (stop_gradient in the forward, zero update), e.g. the LM in the alignment stage.
    lr_fn: schedule, only for the ``lr`` metric.
  """

  def loss_of(params, extra, batch, rng):
    params = _masked(params, trainable, jax.lax.stop_gradient)
    obj, aux = task.loss(_cast(params, cfg.param_cast_dtype), extra, batch, rng)
    return obj.astype(jnp.float32), aux

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def coupled_accumulate(params, extra, batch, rng):
    """(grads, objective, sums, means) of M microbatches with ``task.coupled`` over the whole
    batch (module docstring, steps 1-3)."""
    m = cfg.microbatches
    micro = _split_micro(batch, m)
    rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(m))
    prep = lambda p: _cast(_masked(p, trainable, jax.lax.stop_gradient), cfg.param_cast_dtype)
    split = lambda p, mb, r: task.coupled.split(prep(p), extra, mb, r)

    def embed(_, xs):                                       # 1: embeddings [M, B/M, ...]
      mb, r = xs
      _, aux, emb = split(params, mb, r)
      return None, (emb, aux['sums'])

    _, (emb_m, sums_m) = jax.lax.scan(embed, None, (micro, rngs))
    # Only the sums the term reads are kept from this pass (XLA drops the rest, e.g. the caption
    # decoder behind per-source sums); the step reports pass 3's.
    sums1 = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums_m)

    def coupled_of(p, emb_m):                               # 2: the whole batch's term
      flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), emb_m)
      obj, means = task.coupled.objective(prep(p), flat, sums1)
      return obj.astype(jnp.float32), means

    (c_obj, c_means), (c_grads, d_emb_m) = jax.value_and_grad(
        coupled_of, argnums=(0, 1), has_aux=True)(params, emb_m)

    def surrogate(p, mb, d_emb, r):                         # 3: local + <dL/demb, emb>
      local, aux, emb = split(p, mb, r)
      pull = sum(jnp.vdot(jax.lax.stop_gradient(d).astype(jnp.float32), e.astype(jnp.float32))
                 for d, e in zip(jax.tree.leaves(d_emb), jax.tree.leaves(emb)))
      return local.astype(jnp.float32) + pull, (local.astype(jnp.float32), aux)

    def body(carry, xs):
      g_acc, obj_acc, sums_acc, means_acc = carry
      mb, d_emb, r = xs
      (_, (local, aux)), g = jax.value_and_grad(surrogate, has_aux=True)(params, mb, d_emb, r)
      add = lambda u, v: jax.tree.map(jnp.add, u, v)
      return (add(g_acc, g), obj_acc + local, add(sums_acc, aux['sums']),
              add(means_acc, aux.get('means', {}))), None

    aux0 = jax.eval_shape(lambda: split(params, jax.tree.map(lambda x: x[0], micro), rngs[0])[1])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
    (grads, obj, sums, means), _ = jax.lax.scan(
        body, (c_grads, c_obj, zeros(aux0['sums']), zeros(aux0.get('means', {}))),
        (micro, d_emb_m, rngs))
    means = {**jax.tree.map(lambda x: x / m, means), **c_means}
    return grads, obj, sums, means

  def step(state: TrainState, batch, hparams=None) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    if cfg.microbatches == 1:
      (obj, aux), grads = grad_fn(state.params, state.extra, batch, rng)
      sums, means = aux['sums'], aux.get('means', {})
    elif task.coupled is not None:
      grads, obj, sums, means = coupled_accumulate(state.params, state.extra, batch, rng)
    else:
      micro = _split_micro(batch, cfg.microbatches)

      def body(carry, xs):
        g_acc, obj_acc, sums_acc, means_acc = carry
        mb, i = xs
        (o, a), g = grad_fn(state.params, state.extra, mb, jax.random.fold_in(rng, i))
        add = lambda u, v: jax.tree.map(jnp.add, u, v)
        return (add(g_acc, g), obj_acc + o, add(sums_acc, a['sums']),
                add(means_acc, a.get('means', {}))), None

      shapes = jax.eval_shape(grad_fn, state.params, state.extra,
                              jax.tree.map(lambda x: x[0], micro), rng)
      (_, aux0), g0 = shapes
      zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
      init = (zeros(g0), jnp.zeros((), jnp.float32), zeros(aux0['sums']), zeros(aux0.get('means', {})))
      (grads, obj, sums, means), _ = jax.lax.scan(
          body, init, (micro, jnp.arange(cfg.microbatches)))
      means = jax.tree.map(lambda x: x / cfg.microbatches, means)

    denom = jnp.maximum(sums['denom'].astype(jnp.float32), 1e-9)
    loss = obj / denom
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) / denom, grads)
    grads = _masked(grads, trainable, jnp.zeros_like)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if cfg.grad_clip_norm > 0:
      scale = jnp.minimum(1.0, cfg.grad_clip_norm / jnp.maximum(grad_norm, 1e-12))
      grads = jax.tree.map(lambda g: g * scale, grads)
    # A non-finite gradient would poison the optimizer moments even if discarded afterwards in
    # a data-dependent way; feed zeros and drop the whole result instead.
    grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    if hparams is None:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                     schedule_params=hparams['schedule'])
    updates = _masked(updates, trainable, jnp.zeros_like)
    params = optax.apply_updates(state.params, updates)

    extra = state.extra
    rate = cfg.router_bias_rate if hparams is None else hparams['router_bias_rate']
    if 'router' in extra and 'load_le' in sums and (hparams is not None or rate > 0):
      from kimi_vl_jax.models.moe import update_router_bias   # a rate of 0 leaves it as is
      extra = dict(extra, router=update_router_bias(extra['router'], sums['load_le'], rate))

    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        extra=keep(extra, state.extra),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        skipped_total=state.skipped_total + jnp.where(finite, 0, 1))

    n_upd = sum(x.size for x in jax.tree.leaves(updates))
    sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in jax.tree.leaves(updates))
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'update_rms': jnp.sqrt(sq / float(max(n_upd, 1))),   # float: counts pass 2^31
        'skipped': (~finite).astype(jnp.int32),
        'nonfinite_run': new_state.nonfinite_run,
        'target_tokens': sums['denom'],
        **{k: v for k, v in means.items()},
    }
    if hparams is not None:
      metrics['lr'] = lr_at(state.step, hparams['schedule'])
    elif lr_fn is not None:
      metrics['lr'] = lr_fn(state.step)
    if 'source_loss_sum' in sums and sums['source_loss_sum'].shape[0]:
      metrics['source_loss'] = sums['source_loss_sum'] / jnp.maximum(sums['source_weight_sum'], 1.0)
      metrics['source_tokens'] = sums['source_weight_sum']
    if 'load_le' in sums:
      metrics.update(losses.expert_load_stats(sums['load_le']))
    if 'dropped' in sums:
      metrics['dropped_tokens'] = sums['dropped']
    return new_state, metrics

  return step


def train_step_jit(step_fn, state_sh: TrainState, batch_sh, mesh: Mesh, hparams: bool):
  """``jax.jit`` of ``step_fn(state, batch[, hparams])`` with explicit in/out shardings (the
  state donated, hparams and metrics replicated). ``jit_train_step`` and the ahead-of-time
  compile (``aot.py``) both build the step here."""
  replicated = NamedSharding(mesh, P())
  extra = (replicated,) if hparams else ()
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh) + extra,
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))


def jit_train_step(step_fn, state_sh: TrainState, batch_example, mesh: Mesh, hparams=None):
  """``train_step_jit`` for a host batch like ``batch_example``. With ``hparams``
  (``step_hparams``) the result is still called as ``fn(state, batch)``: the numbers are placed
  once (replicated) and passed on every call."""
  batch_sh = shard_lib.batch_shardings(batch_example, mesh)
  jitted = train_step_jit(step_fn, state_sh, batch_sh, mesh, hparams is not None)
  if hparams is None:
    return jitted
  return _WithHparams(jitted, jax.device_put(hparams, NamedSharding(mesh, P())))


class _WithHparams:
  """``fn(state, batch)`` for a jitted ``step(state, batch, hparams)`` with fixed hparams."""

  def __init__(self, jitted, hparams):
    self.jitted, self.hparams = jitted, hparams

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.hparams)

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, self.hparams)
