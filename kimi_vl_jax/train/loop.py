"""The curriculum loop: stages in order, each resumed from its own checkpoints or started from the
previous stage's last one; progress/ETA, JSONL + TensorBoard metrics, profiler window, evals,
stage reports; SIGTERM saves and exits cleanly.

Per stage: ``<workdir>/checkpoints/<stage>/`` (Orbax) and ``<workdir>/<stage>/`` (metrics.jsonl,
tb/, curves.png, report.md). The run writes ``<workdir>/report.{json,md}``.

Data: a source (``train/data.py``) gives ``next() -> dict`` of process-local host arrays and a
JSON ``get_state()`` saved in every checkpoint, so a resumed stage sees exactly the batches an
uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from kimi_vl_jax.data import special_tokens
from kimi_vl_jax.metrics.writer import MetricsWriter
from kimi_vl_jax.parallel import mesh as mesh_lib, sharding as shard_lib
from kimi_vl_jax.train import checkpoint as ckpt_lib, flops, report, stages as stages_lib
from kimi_vl_jax.train import state as state_lib, step as step_lib, tasks as tasks_lib


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the message names the step and data position."""


class _Preemption:
  """SIGTERM -> save the stage and exit 0 after a step every process agrees on.

  The loop asks ``stop_now()`` after every step (every process at the same points). In one
  process a Python handler sets a flag that it reads. In a multi-process job the notice can
  reach the processes at different steps, and a process that starts saving (an Orbax barrier)
  while another runs the next step's collectives would leave both waiting for good. There JAX's
  preemption sync service (started by ``jax.distributed.initialize``, which catches SIGTERM
  itself) passes the notice to every process and names the first step all of them can still
  reach; ``stop_now()`` is true on every process at that step
  (``multihost_utils.reached_preemption_sync_point``).
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._multi = False
    self._points = 0   # stop_now() calls so far: the same count on every process

  def __enter__(self):
    self._multi = jax.process_count() > 1 and _preemption_service_running()
    if jax.process_count() > 1 and not self._multi:
      logging.warning('JAX preemption sync service is off (jax_enable_preemption_service): each '
                      'process acts on SIGTERM alone, and a notice reaching the processes at '
                      'different steps can leave the save waiting for good')
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def stop_now(self) -> bool:
    """Whether to save and exit here. In a multi-process job every process must call this at
    the same points of the loop (it is cheap: no collective unless a notice arrived)."""
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils
      self._points += 1
      self.requested = bool(multihost_utils.reached_preemption_sync_point(self._points))
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _preemption_service_running() -> bool:
  """Whether ``jax.distributed`` started its preemption sync service (it does unless
  ``jax_enable_preemption_service`` is off). Read from jax's own state: no public call says."""
  try:
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):   # another jax layout: keep the per-process handler
    return False


def build_task(config, stage: stages_lib.Stage, source_names=(), media_pad_id: int = 0
               ) -> step_lib.Task:
  if stage.task == 'vit_pretrain':
    return tasks_lib.vit_pretrain_task(stage.model, source_names=source_names)
  if stage.task == 'lm':
    return tasks_lib.lm_task(stage.model, config.train, source_names)
  return tasks_lib.kimi_vl_task(stage.model, config.train, source_names, media_pad_id)


def _default_source_factory(config, stage, mesh):
  from kimi_vl_jax.train import data as data_lib
  return data_lib.make_source(config, stage, mesh)


def run_experiment(config, workdir: str, stages: Optional[Sequence[str]] = None,
                   source_factory: Optional[Callable] = None, evaluator: Optional[Callable] = None) -> int:
  """Runs the enabled (or selected) stages; returns 0 on success and after a SIGTERM save."""
  if not workdir:
    raise ValueError('run_experiment: --workdir is required for training')
  os.makedirs(workdir, exist_ok=True)
  with compilation_cache(config.train.get('compilation_cache', ''), workdir):
    return _run_stages(config, workdir, stages, source_factory, evaluator)


def _run_stages(config, workdir, stages, source_factory, evaluator) -> int:
  mesh = mesh_lib.build_mesh(config.mesh)
  source_factory = source_factory or _default_source_factory
  if evaluator is None:
    from kimi_vl_jax.train import evaluate
    evaluator = evaluate.default_evaluator(config)
  names = stages_lib.enabled_stages(config, stages)
  summaries = {}
  with _Preemption() as preempt:
    for name in names:
      stage = stages_lib.resolve(config, name)
      if stage.task == 'rl':   # rollouts instead of a data stream (kimi_vl_jax/rl/loop.py)
        from kimi_vl_jax.rl.loop import run_rl_stage
        summary = run_rl_stage(config, stage, workdir, mesh, preempt, evaluator)
      else:
        summary = run_stage(config, stage, workdir, mesh, source_factory, preempt, evaluator)
      summaries[name] = summary
      if summary.get('interrupted') or preempt.stop_now():
        logging.info('SIGTERM: saved %s at step %s; exiting', name, summary.get('step', summary.get('steps')))
        return 0
      # Refreshed after every stage: a partial run has a report. Every process reads the
      # summaries (opening a stage's Orbax manager is a barrier across processes); process 0
      # writes the files.
      completed = collect_summaries(workdir)
      if jax.process_index() == 0:
        write_run_report(workdir, config, completed)
  return 0


@contextlib.contextmanager
def compilation_cache(setting: str, workdir: str):
  """JAX's persistent compilation cache at ``config.train.compilation_cache`` (see
  config/base.py) while the block runs; yields the directory (None when off) and restores the
  previous setting afterwards."""
  before = jax.config.jax_compilation_cache_dir
  if setting == 'auto':
    path = before or os.path.join(workdir, 'compilation_cache')
  else:
    path = setting or None

  def point_at(p):
    if p != jax.config.jax_compilation_cache_dir:
      from jax.experimental.compilation_cache import compilation_cache as cc
      jax.config.update('jax_compilation_cache_dir', p)
      cc.reset_cache()   # the next compile opens the new directory

  point_at(path)
  try:
    yield path
  finally:
    point_at(before)


def write_run_report(workdir: str, config=None, summaries: Optional[dict] = None) -> dict:
  """``report.{json,md}`` from the completed stages' checkpoint metadata in ``workdir`` (or
  ``summaries``, ``collect_summaries``'s result); with ``config``, each task also names the
  held-out data it was scored on."""
  from kimi_vl_jax.train import evaluate
  held_out = None if config is None else evaluate.held_out_descriptions(config)
  summaries = collect_summaries(workdir) if summaries is None else summaries
  return report.run_report(workdir, summaries, evaluate.CHANCE, held_out)


def collect_summaries(workdir: str) -> dict:
  """{stage: summary} of every stage (curriculum order) with a completed checkpoint. In a
  multi-process job every process must call it (Orbax managers synchronize the processes)."""
  out = {}
  for name in stages_lib.STAGE_NAMES:
    if not os.path.isdir(ckpt_lib.stage_dir(workdir, name)):
      continue
    ck = ckpt_lib.StageCheckpoints(workdir, name)
    meta = ck.read_meta()
    if meta and meta.get('complete'):
      out[name] = meta.get('summary', {})
    ck.close()
  return out


def _prev_params(config, workdir: str, stage: stages_lib.Stage):
  """Host (params, extra) of the previous enabled stage's last checkpoint, or None if first."""
  prev = stages_lib.previous_stage(config, stage.name)
  if prev is None:
    return _init_from(config.train.init_from) if config.train.init_from else None
  ck = ckpt_lib.StageCheckpoints(workdir, prev)
  try:
    meta = ck.read_meta()
    if not meta or not meta.get('complete'):
      raise FileNotFoundError(
          f'stage {stage.name} starts from the last checkpoint of {prev}, but {ck.directory} has '
          f'no completed checkpoint; run {prev} first (or disable it: config.stages.{prev}.enabled=False)')
    tree = ck.restore_raw()
  finally:
    ck.close()
  return tree['params'], tree.get('extra', {})


def _init_from(path: str):
  """(params, extra) of a Hugging Face Kimi-VL directory or a converted Orbax directory."""
  from kimi_vl_jax.convert import hf
  from kimi_vl_jax.convert.__main__ import load_orbax
  if not os.path.isdir(path):
    raise FileNotFoundError(f'config.train.init_from={path!r}: no such directory')
  if os.path.exists(os.path.join(path, 'config.json')):
    _, variables = hf.load_hf(path)
  else:
    _, variables, _ = load_orbax(path)
  variables = dict(variables)
  return variables.pop('params'), variables


def _init_state(task, opt, sh, rng, prev):
  """A fresh state (new optimizer state) whose parameters come from ``prev`` where path and
  shape match. When ``prev`` covers every tensor, no random init is compiled or run."""
  if prev is not None:
    shapes = state_lib.split_variables(nn.unbox(jax.eval_shape(task.init, rng)))
    params, copied = stages_lib.transfer_params(prev[0], shapes[0])
    extra, _ = stages_lib.transfer_params(prev[1], shapes[1])
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((params, extra))):
      fresh = jax.jit(lambda p, e: state_lib.create_state(p, e, opt, jax.random.fold_in(rng, 1)),
                      in_shardings=(sh.params, sh.extra), out_shardings=sh)
      return fresh(jax.device_put(params, sh.params), jax.device_put(extra, sh.extra)), copied

  def make():
    params, extra = state_lib.split_variables(nn.unbox(task.init(rng)))
    return state_lib.create_state(params, extra, opt, jax.random.fold_in(rng, 1))

  st = jax.jit(make, out_shardings=sh)()
  if prev is None:
    return st, []
  # Fresh tensors stay where the init put them (never fetched to the host: in a multi-process
  # job a sharded tensor cannot be, and a whole model need not be); copied ones are placed.
  params, copied = stages_lib.transfer_params(prev[0], st.params)
  extra, _ = stages_lib.transfer_params(prev[1], st.extra)
  params = jax.device_put(params, sh.params)
  extra = jax.device_put(extra, sh.extra)
  return st.replace(params=params, extra=extra), copied


class _LazyJit:
  """``jit_train_step`` built on the first call, when the batch's structure is known."""

  def __init__(self, step_fn, shardings, mesh, hparams=None):
    self.step_fn, self.shardings, self.mesh, self.fn = step_fn, shardings, mesh, None
    self.hparams = hparams

  def _jitted(self, batch):
    if self.fn is None:
      self.fn = step_lib.jit_train_step(self.step_fn, self.shardings, batch, self.mesh,
                                        self.hparams)
    return self.fn

  def __call__(self, state, batch):
    fn = self._jitted(batch)
    with shard_lib.activation_context(self.mesh):   # traced (first call) under the mesh
      return fn(state, batch)

  def lower(self, state, batch):
    """The step lowered exactly as ``__call__`` traces it (for HLO inspection)."""
    fn = self._jitted(batch)
    with shard_lib.activation_context(self.mesh):
      return fn.lower(state, batch)


@dataclasses.dataclass
class PreparedStage:
  source: object
  task: step_lib.Task
  opt: object
  shardings: state_lib.TrainState
  rng: jax.Array
  jitted: Callable
  step_fn: Callable
  step_cfg: step_lib.StepConfig


def prepare_stage(config, stage: stages_lib.Stage, mesh, source_factory=None) -> PreparedStage:
  """Source, task, optimizer, state shardings and the jitted step of one stage (no state yet)."""
  t = config.train
  source = (source_factory or _default_source_factory)(config, stage, mesh)
  media_pad = source.tok.token_id(special_tokens.MEDIA_PAD)
  task = build_task(config, stage, getattr(source, 'source_names', ()), media_pad)
  rng = jax.random.PRNGKey(t.seed + 1000 * stage.index)
  abstract = state_lib.abstract_variables(task.init, rng)
  from kimi_vl_jax.optim import build_optimizer
  opt = build_optimizer(stage.optim, abstract['params'], mesh, trainable=stage.trainable or None,
                        total_steps=stage.steps)
  sh = state_lib.state_shardings(abstract, opt, mesh)
  params_abs = nn.unbox(abstract)['params']
  mask = stages_lib.trainable_mask(params_abs, stage.trainable) if stage.trainable else None
  step_cfg = step_lib.StepConfig(microbatches=stage.microbatches, grad_clip_norm=t.grad_clip_norm,
                                 router_bias_rate=stage.router_bias_rate,
                                 param_cast_dtype=t.param_cast_dtype)
  step_fn = step_lib.make_train_step(task, opt, step_cfg, mask, getattr(opt, 'schedule', None))
  # The lr schedule and router-bias rate as arguments: one compiled program for stages that
  # differ only in those numbers (step.py).
  jitted = _LazyJit(step_fn, sh, mesh, step_lib.step_hparams(opt, step_cfg))
  return PreparedStage(source, task, opt, sh, rng, jitted, step_fn, step_cfg)


def run_stage(config, stage: stages_lib.Stage, workdir: str, mesh, source_factory, preempt,
              evaluator=None) -> dict:
  t = config.train
  ck = ckpt_lib.StageCheckpoints(workdir, stage.name, keep=t.keep_checkpoints,
                                 async_save=t.async_checkpoints)
  meta = ck.read_meta()
  if meta and meta.get('complete'):
    logging.info('stage %s: complete at step %d; skipping', stage.name, meta['step'])
    ck.close()
    return meta.get('summary', {})

  prep = prepare_stage(config, stage, mesh, source_factory)
  source, task, opt, sh, rng, jitted = (prep.source, prep.task, prep.opt, prep.shardings,
                                        prep.rng, prep.jitted)
  example = source.next()
  base_source = source

  start_step, tokens_seen, copied = 0, 0, []
  latest = ck.latest_step()
  if latest is not None:
    def make():
      params, extra = state_lib.split_variables(nn.unbox(task.init(rng)))
      return state_lib.create_state(params, extra, opt, rng)
    target = state_lib.abstract_state(sh, make)
    st, meta, data_state = ck.restore(target)
    start_step, tokens_seen = int(meta['step']), int(meta.get('tokens_seen', 0))
    if start_step > stage.steps:
      raise ValueError(f'config.stages.{stage.name}: the budget of {stage.steps} steps is below '
                       f'the checkpoint at step {start_step} in {ck.directory}')
    if start_step == stage.steps:   # interrupted right at the end: the final save redoes it
      ck.manager.delete(start_step)
    if data_state is not None:
      base_source.set_state(data_state)
    example = base_source.next()
    logging.info('stage %s: resumed at step %d', stage.name, start_step)
  else:
    prev = _prev_params(config, workdir, stage)
    st, copied = _init_state(task, opt, sh, rng, prev)
    if prev is not None and not copied:
      raise ValueError(f'stage {stage.name}: no parameter of the previous checkpoint matches this '
                       'model by path and shape (was the model config changed?)')
    if copied:
      logging.info('stage %s: loaded %d tensors from the previous stage', stage.name, len(copied))

  from kimi_vl_jax.train.data import Prefetcher
  source = Prefetcher(base_source)
  stage_dir = os.path.join(workdir, stage.name)
  writer = MetricsWriter(stage_dir, total_steps=stage.steps, tensorboard=config.metrics.tensorboard,
                         progress=config.metrics.progress, prefix='')
  lm_flops = (flops.lm_forward_flops_per_token(stage.model.lm, stage.seq_len)
              if stage.task != 'vit_pretrain' else 0.0)
  peak = flops.peak_flops_per_device() * jax.device_count()
  source_names = task.source_names
  eval_results = {}
  t_stage = time.time()
  pending = None
  last_loss = float('nan')
  t_last, tok_last = time.time(), tokens_seen
  profiling = False

  def meta_of(step, complete=False):
    return {'stage': stage.name, 'step': step, 'tokens_seen': tokens_seen, 'data_position': step,
            'complete': complete, 'config': config.to_json_best_effort() if hasattr(
                config, 'to_json_best_effort') else str(config)}

  def flush(item):
    nonlocal last_loss, t_last, tok_last
    step_i, metrics, tok = item
    m = jax.device_get(metrics)
    if int(m['nonfinite_run']) >= t.max_consecutive_nonfinite:
      raise NonFiniteError(
          f'stage {stage.name}: {int(m["nonfinite_run"])} consecutive non-finite steps ending at '
          f'step {step_i + 1} (data position: stage batch {step_i}, 0-based; source state '
          f'{source.get_state()}); parameters were not updated by these steps; last checkpoint: '
          f'{ck.latest_step()}')
    if (step_i + 1) % config.metrics.log_every and step_i + 1 != stage.steps:
      return
    now = time.time()
    dt = max(now - t_last, 1e-9)
    scalars = {k: v for k, v in m.items() if np.ndim(v) == 0}
    for key in ('source_loss', 'source_tokens'):
      if key in m:
        for name, v in zip(source_names, m[key]):
          scalars[f'{key}/{name}'] = v
    tps = (tokens_seen - tok_last) / dt
    scalars['tokens_per_s'] = tps
    scalars['tokens_seen'] = tokens_seen
    if lm_flops:
      scalars['mfu'] = 3.0 * lm_flops * tps / peak
    t_last, tok_last = now, tokens_seen
    last_loss = float(m['loss'])
    writer.write(step_i + 1, scalars)

  try:
    for step in range(start_step, stage.steps):
      if t.profile_start >= 0 and step == t.profile_start and not profiling:
        jax.profiler.start_trace(os.path.join(stage_dir, 'profile'))
        profiling = True
      host = example if step == start_step else source.next()
      batch = shard_lib.make_global_batch(host, mesh)
      st, metrics = jitted(st, batch)
      tokens_seen += tasks_lib.host_batch_tokens(host) * jax.process_count()
      if pending is not None:
        flush(pending)
      pending = (step, metrics, tokens_seen)
      if profiling and step + 1 >= t.profile_start + t.profile_steps:
        jax.block_until_ready(st)
        jax.profiler.stop_trace()
        profiling = False
      done = step + 1
      if evaluator is not None and stage.block.eval_every and done % stage.block.eval_every == 0 \
          and done < stage.steps:
        res = evaluator(config, stage, task, st, mesh)
        writer.write(done, {f'eval/{k}': v for k, v in res.items()})
      if t.checkpoint_every and done % t.checkpoint_every == 0 and done < stage.steps:
        ck.save(done, st, meta_of(done), source.get_state())
      if done < stage.steps and preempt.stop_now():
        flush(pending)
        pending = None
        ck.save(done, st, meta_of(done), source.get_state())
        ck.wait()
        writer.close()
        ck.close()
        return {'interrupted': True, 'step': done}
    if pending is not None:
      flush(pending)
    eval_results = final_eval(evaluator, config, stage, task, st, mesh, writer)
    summary = {'stage': stage.name, 'steps': stage.steps, 'final_loss': last_loss,
               'tokens_seen': tokens_seen, 'wall_s': time.time() - t_stage,
               'skipped_steps': int(jax.device_get(st.skipped_total)),
               'seq_len': stage.seq_len, 'rope_theta': float(stage.model.lm.rope_theta),
               'eval': {k: float(v) for k, v in eval_results.items()}}
    save_final(ck, stage.steps, st, meta_of(stage.steps, complete=True), summary,
               source.get_state())
  finally:
    source.close()
    if profiling:
      jax.profiler.stop_trace()
    writer.close()
    ck.close()
  stage_report(stage_dir, stage.name, summary)
  return summary


def final_eval(evaluator, config, stage, task, state, mesh, writer) -> dict:
  """The stage-end evals (``stage.block.eval``), written at the last step; {} without any."""
  if evaluator is None or not stage.block.eval:
    return {}
  results = evaluator(config, stage, task, state, mesh)
  writer.write(stage.steps, {f'eval/{k}': v for k, v in results.items()})
  return results


def save_final(ck, step: int, state, meta: dict, summary: dict, data_state) -> None:
  """Saves the stage's last checkpoint, marked complete with its summary, and waits for it."""
  ck.save(step, state, {**meta, 'summary': summary}, data_state)
  ck.wait()


def stage_report(stage_dir: str, name: str, summary: dict) -> None:
  """The stage's curves plot and report.md (process 0)."""
  if jax.process_index() == 0:
    report.stage_plot(stage_dir, name)
    report.stage_markdown(stage_dir, name, summary)
