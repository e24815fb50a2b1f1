"""Compile a stage's train step ahead of time for a TPU topology: does it fit, and in how much.

``python -m kimi_vl_jax.main --mode=aot --config=experiments/kimi_vl_a3b.py:v5p-64
--topology=v5p:4x4x2 --stages=joint_pretrain``

libtpu (``pip install -e '.[aot]'``) compiles for a TPU topology on any host, a laptop CPU
included. The mesh is built over the topology's devices; the train state and the batch are
abstract (``jax.ShapeDtypeStruct``, from ``train/data.batch_spec``), so nothing is allocated
and no data or tokenizer is read. The compiler's memory analysis then gives each chip's bytes:
arguments (parameters, optimizer state, the batch shard), temporaries (activations kept for the
backward, collectives' buffers) and outputs. A program that needs more than a chip's HBM does
not compile; the result then carries the compiler's message, which names the size it needed.
"fits" is the compiler's verdict; the reported total (arguments + temporaries + outputs -
aliased) can still exceed the HBM (kimi_vl_a3b's 128K stages on v5p-64, when they routed whole
rows through the MoE: 102.0 of 95.7 GiB), so read the total against the chip's HBM too.

An ``rl`` stage has three programs (``rl/loop.prepare_rl``), each compiled at its largest
shapes (``compile_rl_stage``): the train step on rows of prompt + response, the sampler over
every row of an iteration, and the reference log-probabilities.

This is the same step ``train`` runs (``loop.prepare_stage``), traced under the same mesh and
logical-axis rules, with the backends the TPU gets ('auto' follows the mesh's platform). It is
how to size ``train.microbatches`` (or a stage's own ``microbatches``) and the expert-parallel
capacity (``model.lm.moe_capacity_factor``) and, for long rows, the sequence slices of the MoE
and the loss (``model.lm.moe_token_chunk``, ``train.loss_token_chunk``) before holding a pod.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_vl_jax.data import mixture as mixture_lib
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import sharding as shard_lib
from kimi_vl_jax.train import data as data_lib
from kimi_vl_jax.train import stages as stages_lib
from kimi_vl_jax.train import state as state_lib
from kimi_vl_jax.train import step as step_lib

GIB = 2 ** 30


def topology_devices(topology: str, chips_per_host: str = '2x2x1') -> list:
  """Devices of a TPU topology such as ``v5p:4x4x2`` (``jax.experimental.topologies``).

  ``chips_per_host``: the host's chip grid (``2x2x1`` on v4/v5p hosts, ``2x2x1`` or ``2x4x1``
  on v5e/v6e); it decides which devices share a process. Needs libtpu installed.
  """
  if importlib.util.find_spec('libtpu') is None:
    raise RuntimeError("--mode=aot compiles for TPU with libtpu, which is not installed: "
                       "pip install -e '.[aot]'")
  try:
    bounds = tuple(int(n) for n in chips_per_host.split('x'))
  except ValueError:
    raise ValueError(f'--chips_per_host={chips_per_host!r}: expected AxBxC, e.g. 2x2x1') from None
  # Compiling touches no chip, so several compiling processes need not queue on libtpu's
  # lockfile (which guards a host's chips); without this the second one aborts.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  desc = topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                      chip_config_name='default', chips_per_host_bounds=bounds,
                                      num_slices=1)
  return list(desc.devices)


@dataclasses.dataclass
class _Tokenizer:
  """Stands in for the stage's tokenizer: the step's program depends on the media-pad id
  only as a constant, not on its value."""
  vocab_size: int

  def token_id(self, _piece: str) -> int:
    return self.vocab_size - 1


@dataclasses.dataclass
class _AbstractSource:
  tok: _Tokenizer
  source_names: tuple


def _source_names(config, stage) -> tuple:
  """The names the stage's per-source metrics are kept for (as its data source reports)."""
  if stage.task == 'vit_pretrain':
    return tuple(data_lib.parse_mixture(stage.block.mixture or data_lib.DEFAULT_CAPTION_MIXTURE))
  return tuple(s.name for s in mixture_lib.parse_sources(config.data.sources))


def _without_persistent_cache(fn):
  """Runs ``fn`` with JAX's persistent compilation cache off (if one is set, e.g. by the
  environment): a topology has no client to load a cached executable into, so reading one back
  fails with a warning and compiles again, and writing one only costs time and disk."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    from kimi_vl_jax.train import loop
    with loop.compilation_cache('', ''):
      return fn(*args, **kwargs)
  return wrapped


@_without_persistent_cache
def compile_stage(config, stage_name: str, devices: Sequence, keep_text: bool = False) -> dict:
  """Lowers and compiles ``stage_name``'s train step over ``devices``; returns its figures.

  Keys: stage, devices, device_kind, mesh, global_batch, seq_len, microbatches, compile_s,
  fits, and per-device GiB (argument, temp, output, alias, total = argument + temp + output
  - alias) when it compiled, else ``error`` (the compiler's message). ``keep_text`` adds the
  lowered program (``lowered``, StableHLO text) for inspection.
  """
  from kimi_vl_jax.train import loop   # the trainer's own set-up of a stage
  mesh = mesh_lib.build_mesh(config.mesh, devices)
  stage = stages_lib.resolve(config, stage_name)
  source = _AbstractSource(_Tokenizer(int(config.model.lm.vocab_size)),
                           _source_names(config, stage))
  prep = loop.prepare_stage(config, stage, mesh, source_factory=lambda *_: source)

  def make():
    params, extra = state_lib.split_variables(nn.unbox(prep.task.init(prep.rng)))
    return state_lib.create_state(params, extra, prep.opt, prep.rng)

  state = state_lib.abstract_state(prep.shardings, make)
  spec = data_lib.batch_spec(config, stage)
  batch_sh = shard_lib.batch_shardings(spec, mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in spec.items()}
  replicated = NamedSharding(mesh, P())
  hparams = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
      step_lib.step_hparams(prep.opt, prep.step_cfg))
  jitted = step_lib.train_step_jit(prep.step_fn, prep.shardings, batch_sh, mesh, hparams=True)
  result = {'stage': stage_name, 'devices': len(devices), 'device_kind': devices[0].device_kind,
            'mesh': {k: int(v) for k, v in mesh.shape.items()},
            'global_batch': stage.global_batch, 'seq_len': stage.seq_len,
            'microbatches': stage.microbatches}
  with shard_lib.activation_context(mesh):
    lowered = jitted.lower(state, batch, hparams)
  if keep_text:
    result['lowered'] = lowered.as_text()
  result.update(_compiled_figures(lowered))
  return result


def _compiled_figures(lowered) -> dict:
  """Compiles ``lowered``: fits, compile_s and per-device GiB, or fits=False with the
  compiler's out-of-memory message."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return dict(fits=False, compile_s=round(time.perf_counter() - t0, 1),
                error=str(e).strip().splitlines()[0])
  m = compiled.memory_analysis()
  gib = lambda n: round(n / GIB, 3)
  return dict(
      fits=True, compile_s=round(time.perf_counter() - t0, 1),
      argument_gib=gib(m.argument_size_in_bytes), temp_gib=gib(m.temp_size_in_bytes),
      output_gib=gib(m.output_size_in_bytes), alias_gib=gib(m.alias_size_in_bytes),
      total_gib=gib(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                    - m.alias_size_in_bytes))


RL_PROGRAMS = ('decode', 'ref_logp')


@_without_persistent_cache
def compile_rl_stage(config, stage_name: str, devices: Sequence, keep_text: bool = False) -> dict:
  """An RL stage's three programs compiled for ``devices`` at their largest shapes: the train
  step on a batch of training rows (``rollout.training_rows``: prompt + response rows of
  ``seq_len``, with the RL keys), the sampler (``evaluate.make_decoder``: every row of the
  iteration, prompts filling the row) and the reference log-probabilities.

  Returns ``compile_stage``'s keys for the train step, plus ``decode`` and ``ref_logp`` dicts
  with their own figures; ``fits`` only when all three fit.
  """
  from kimi_vl_jax.rl import loop as rl_loop
  mesh = mesh_lib.build_mesh(config.mesh, devices)
  stage = stages_lib.resolve(config, stage_name)
  vocab = int(config.model.lm.vocab_size)
  # Token ids enter the programs as constants only (stop and media-pad ids); their values
  # do not change what is compiled.
  progs = rl_loop.prepare_rl(config, stage, mesh, stop_id=vocab - 2, media_pad_id=vocab - 1)

  def make():
    params, extra = state_lib.split_variables(nn.unbox(progs.task.init(progs.rng)))
    return state_lib.create_state(params, extra, progs.opt, progs.rng)

  state = state_lib.abstract_state(progs.shardings, make)
  rows, seq = stage.global_batch, stage.seq_len
  spec = data_lib.batch_spec(config, progs.base_stage)
  for key in ('rl_weight', 'rl_ref_logp', 'rl_advantage'):
    spec[key] = jax.ShapeDtypeStruct((rows,), np.dtype(np.float32))
  def abstract(sp):   # a batch spec as global arrays laid out as the loop lays out its rows
    sh = shard_lib.batch_shardings(sp, mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[k]) for k, v in sp.items()}

  batch = abstract(spec)
  replicated = NamedSharding(mesh, P())
  hparams = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
      step_lib.step_hparams(progs.opt, progs.step_cfg))
  jitted = step_lib.train_step_jit(progs.step_fn, progs.shardings,
                                   shard_lib.batch_shardings(spec, mesh), mesh, hparams=True)
  # The sampler's rows: every row of the iteration, padded to the data-parallel size as the
  # loop pads them; prompts + new tokens fill at most the stage's row.
  dp = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp', 'expert')]))
  decode_rows = -(-rows // dp) * dp
  decode_spec = {'tokens': jax.ShapeDtypeStruct((decode_rows, seq), np.dtype(np.int32)),
                 'lens': jax.ShapeDtypeStruct((decode_rows,), np.dtype(np.int32))}
  for key, v in spec.items():
    if key.startswith('patch'):
      decode_spec[key] = jax.ShapeDtypeStruct((decode_rows,) + v.shape[1:], v.dtype)
  rng = jax.ShapeDtypeStruct((2,), np.dtype(np.uint32), sharding=replicated)
  result = {'stage': stage_name, 'devices': len(devices), 'device_kind': devices[0].device_kind,
            'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'global_batch': rows,
            'seq_len': seq, 'microbatches': stage.microbatches}
  with shard_lib.activation_context(mesh):
    lowered = {'train': jitted.lower(state, batch, hparams),
               'decode': progs.decode.lower(state.params, state.extra, abstract(decode_spec), rng),
               'ref_logp': progs.ref_logp.lower(state.params, state.extra, batch)}
  if keep_text:
    result['lowered'] = {name: low.as_text() for name, low in lowered.items()}
  result.update(_compiled_figures(lowered['train']))
  for name in RL_PROGRAMS:
    result[name] = _compiled_figures(lowered[name])
  result['fits'] = all(r['fits'] for r in [result] + [result[n] for n in RL_PROGRAMS])
  return result


def describe_result(r: dict) -> str:
  """One line per stage for the log."""
  head = (f"{r['stage']}: {r['devices']} x {r['device_kind']}, mesh "
          + ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
          + f", batch {r['global_batch']} x {r['seq_len']} in {r['microbatches']} microbatch(es)")
  parts = [('train step', r)] + [(n, r[n]) for n in RL_PROGRAMS if n in r]
  out = []
  for name, f in parts:
    if not f['fits']:
      out.append(f"{name} DOES NOT FIT ({f['compile_s']} s): {f['error']}")
    else:
      out.append(f"{name} fits, per device {f['total_gib']:.2f} GiB (arguments "
                 f"{f['argument_gib']:.2f}, temporaries {f['temp_gib']:.2f}, outputs "
                 f"{f['output_gib']:.2f}, aliased {f['alias_gib']:.2f}); compiled in "
                 f"{f['compile_s']} s")
  if len(parts) == 1:   # a trainer stage: one program
    out[0] = out[0].replace('train step ', '', 1)
  return f"{head}: " + '; '.join(out)


def compile_stages(config, topology: str, stages: Optional[Sequence[str]] = None,
                   chips_per_host: str = '2x2x1', print_fn=print) -> list:
  """``compile_stage`` for each of ``stages`` (default: every enabled stage) on ``topology``."""
  devices = topology_devices(topology, chips_per_host)
  results = []
  for name in stages_lib.enabled_stages(config, stages):
    compile_fn = compile_rl_stage if config.stages[name].task == 'rl' else compile_stage
    results.append(compile_fn(config, name, devices))
    print_fn(describe_result(results[-1]))
  return results
