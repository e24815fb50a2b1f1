"""The grain pipeline: sources -> examples (worker processes) -> packed batches (this process).

  MapDataset.source(ExampleStream)      example i = f(seed, process, i): source and record
                                        (stream_plan.py), images -> patches, template -> ids
    .to_iter_dataset()
    .mp_prefetch(workers)               the heavy part, in ``data.workers`` spawned processes
  PackedDataset                         first-fit packing into [B, S] + patch buffers (packing.py)

Each process builds its own pipeline over its own shard of every source (``jax.process_index``)
and yields process-local numpy batches of ``global_batch / process_count`` rows;
``global_batches`` turns them into global arrays (``parallel.sharding.make_global_batch``).

Resume: the packed iterator's state is the upstream grain state plus the stream indices of the
examples waiting to be packed (recomputed on restore, since example i is pure), so a restored
iterator yields exactly the batches of an uninterrupted run (``get_state`` / ``set_state``; a
small JSON-able dict the trainer checkpoints). Packing runs after ``mp_prefetch``, so the
batches do not depend on the number of workers.

Bad records reach this process as ``Skipped`` markers and are counted by reason in
``iterator.skips`` (first few logged with file:line); in strict mode the worker raises
``DataError`` naming the record.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence

import grain
import numpy as np
from absl import logging

from kimi_vl_jax.data import examples as examples_lib
from kimi_vl_jax.data import image_processor as ip
from kimi_vl_jax.data import mixture as mixture_lib
from kimi_vl_jax.data import packing
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data import stream_plan
from kimi_vl_jax.data import tokenizer as tokenizer_lib
from kimi_vl_jax.data.sources import BadRecord, DataError, SkipCounter, open_source

STREAM_LENGTH = 1 << 40      # the example stream is (practically) infinite: epochs repeat


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record that could not become an example (passes through workers to be counted)."""
  reason: str
  message: str
  origin: str
  index: int


class ExampleStream:
  """Random access over the (infinite) example stream of one process: ``stream[i]``.

  Picklable (sent to the grain workers): sources hold file offsets, the tokenizer its proto.
  """

  def __init__(self, sources: Sequence[Any], mixture: mixture_lib.Mixture,
               tokenizer: tokenizer_lib.Tokenizer, image_cfg: ip.ImageProcessorConfig,
               limits: examples_lib.ExampleLimits, seed: int, process_index: int,
               examples_per_step: int, strict: bool = False):
    self.sources, self.mixture, self.tokenizer = list(sources), mixture, tokenizer
    self.image_cfg, self.limits, self.seed = image_cfg, limits, seed
    self.process_index, self.examples_per_step, self.strict = process_index, examples_per_step, strict
    self.sizes = [len(s) for s in self.sources]
    self.plan = stream_plan.StreamPlan(mixture.weights, self.sizes, seed, process_index,
                                       examples_per_step)

  def __len__(self) -> int:
    return STREAM_LENGTH

  def __getitem__(self, index: int):
    index = int(index)
    k, j = self.plan.locate(index)
    origin = f'{self.mixture.names[k]}[{j}]'
    try:
      record = self.sources[k][j]
      origin = record.get('origin', origin)
      return examples_lib.build_example(record, self.tokenizer, self.image_cfg, k, self.limits,
                                        index)
    except BadRecord as bad:
      bad.origin = bad.origin or origin
      if self.strict:
        raise DataError(str(bad)) from None
      return Skipped(bad.reason, bad.message, bad.origin, index)
    except Exception as e:  # a bug or an unexpected failure: never without the record named
      raise RuntimeError(f'{origin} (stream example {index}): {e.__class__.__name__}: {e}') from e


class PackedDataset(grain.IterDataset):
  """Packs the examples of ``parent`` (an IterDataset over ``stream``) into batches."""

  def __init__(self, parent: grain.IterDataset, stream: ExampleStream, cfg: packing.PackConfig,
               strict: bool = False):
    super().__init__(parent)
    self.stream, self.cfg, self.strict = stream, cfg, strict

  def __iter__(self) -> 'PackedIterator':
    return PackedIterator(self._parent.__iter__(), self.stream, self.cfg, self.strict)


class PackedIterator(grain.DatasetIterator):
  """Yields batch dicts (see ``packing``); ``skips``, ``packer.stats``, ``report()``."""

  def __init__(self, parent, stream: ExampleStream, cfg: packing.PackConfig, strict: bool):
    super().__init__(parent)
    self.stream, self.cfg = stream, cfg
    tok = stream.tokenizer
    self.packer = packing.Packer(cfg, tok.token_id(st.MEDIA_START), tok.token_id(st.MEDIA_END))
    self.skips = SkipCounter(strict=strict, name='pipeline')
    k = len(stream.sources)
    self.source_examples, self.source_tokens = np.zeros(k, np.int64), np.zeros(k, np.int64)
    self.steps = 0
    self.last_index = -1      # highest stream index pulled (the schedule clock of the report)

  def _pull(self) -> examples_lib.Example:
    while True:
      item = next(self._parent)
      if isinstance(item, Skipped):
        self.skips.skip(BadRecord(item.reason, item.message, item.origin))
        continue
      self.last_index = max(self.last_index, item.index)
      return item

  def __next__(self) -> dict:
    batch = self.packer.next_batch(self._pull)
    seg = batch['segment_ids'] > 0
    src = batch['source_ids']
    np.add.at(self.source_tokens, src[seg], 1)
    starts = seg & (batch['positions'] == 0)
    np.add.at(self.source_examples, src[starts], 1)
    self.steps += 1
    return batch

  def get_state(self) -> dict:
    return {'parent': self._parent.get_state(),
            'pending': [int(e.index) for e in self.packer.pending],
            'steps': self.steps,
            'last_index': self.last_index,
            'source_examples': self.source_examples.tolist(),
            'source_tokens': self.source_tokens.tolist(),
            'skips': self.skips.as_dict(),
            'pack_stats': dataclasses.asdict(self.packer.stats)}

  def set_state(self, state: dict):
    self._parent.set_state(state['parent'])
    pending = []
    for i in state['pending']:
      ex = self.stream[i]
      ex = packing.fit_to_length(ex, self.cfg.seq_len, self.packer.media_start_id,
                                 self.packer.media_end_id, self.cfg.overflow)
      if not isinstance(ex, examples_lib.Example):
        raise ValueError(f'resume: pending example {i} no longer builds ({ex}); the data changed')
      pending.append(ex)
    self.packer.pending = pending
    self.steps = int(state['steps'])
    self.last_index = int(state['last_index'])
    self.source_examples = np.asarray(state['source_examples'], np.int64)
    self.source_tokens = np.asarray(state['source_tokens'], np.int64)
    self.skips.counts.clear()
    self.skips.counts.update(state['skips'])
    self.packer.stats = packing.PackStats(**state['pack_stats'])

  def report(self) -> dict:
    """Realized mix since the start (per source), skips by reason, packing efficiency."""
    st_ = self.packer.stats
    # Expected weights: the schedule's weights averaged over the clock steps consumed so far.
    last = max(0, self.last_index) // max(1, self.stream.examples_per_step)
    clock = np.unique(np.linspace(0, last, num=min(last + 1, 256)).astype(np.int64))
    w = np.mean([self.stream.mixture.weights(int(c)) for c in clock], axis=0)
    return {'mix': mixture_lib.mix_report(self.stream.mixture.names, self.source_examples,
                                          self.source_tokens, w),
            'skipped': self.skips.as_dict(),
            'truncated': st_.truncated, 'dropped_too_long': st_.dropped_too_long,
            'token_efficiency': round(st_.tokens / max(1, st_.slots), 4),
            'patch_efficiency': round(st_.patches / max(1, st_.patch_slots), 4)}


def estimate_examples_per_step(probe: ExampleStream, rows: int, seq_len: int,
                               num_probe: int = 64, packing_efficiency: float = 0.95) -> int:
  """The schedule clock's examples per step: rows x S / mean example length (capped at S).

  Measured on the first ``num_probe`` examples of ``probe`` (a stream at the stage's final
  weights), so it is deterministic in (data, config) and a resumed run gets the same clock.
  """
  lengths = []
  for i in range(num_probe):
    ex = probe[i]
    if isinstance(ex, examples_lib.Example):
      lengths.append(min(ex.num_tokens, seq_len))
  if not lengths:
    return rows
  return max(1, round(rows * seq_len * packing_efficiency / float(np.mean(lengths))))


def _process_info(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def build_dataset(config, *, stage: Optional[str] = None, stage_steps: int = 0,
                  tokenizer: Optional[tokenizer_lib.Tokenizer] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  workers: Optional[int] = None, seq_len: Optional[int] = None,
                  global_batch: Optional[int] = None) -> PackedDataset:
  """The packed grain dataset of this process for ``config`` (and stage, if given).

  Rows per batch: ``global_batch / process_count`` (default ``config.train.global_batch``);
  tokens per row: ``seq_len`` (default ``config.train.seq_len``).
  """
  d = config.data
  p, n = _process_info(process_index, process_count)
  global_batch = global_batch or config.train.global_batch
  if global_batch % n:
    raise ValueError(f'config.train.global_batch={global_batch} is not divisible by the '
                     f'{n} processes')
  rows = global_batch // n
  seq_len = seq_len or config.train.seq_len
  specs = mixture_lib.parse_sources(d.sources)
  stage_block = config.stages[stage] if stage else None
  mixture = mixture_lib.Mixture.for_stage(specs, stage_block, stage_steps, d.qa_share_cap)
  if tokenizer is None:
    tokenizer = tokenizer_lib.load_or_train(d.tokenizer, config.model.lm.vocab_size,
                                            d.tokenizer_cache)
  if tokenizer.vocab_size > config.model.lm.vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} ids > model.lm.vocab_size '
                     f'{config.model.lm.vocab_size}')
  sources = [open_source(s, p, n, strict=d.strict, split=d.split, seed=d.seed) for s in specs]
  for spec, src in zip(specs, sources):
    if len(src) == 0 and spec.weight > 0:
      logging.warning('source %s has no valid records in shard %d/%d', spec.name, p, n)
  image_cfg = ip.ImageProcessorConfig.from_vision_config(config.model.vision, d.in_token_limit)
  limits = examples_lib.ExampleLimits(max_images=d.max_images_per_example,
                                      max_patches=d.max_patches_per_row)
  eps = d.examples_per_step or estimate_examples_per_step(
      ExampleStream(sources, dataclasses.replace(mixture, stage_steps=0, text_only_fraction=0.0),
                    tokenizer, image_cfg, limits, d.seed, p, rows), rows, seq_len)
  stream = ExampleStream(sources, mixture, tokenizer, image_cfg, limits, d.seed, p, eps, d.strict)
  # Bounded read-ahead: grain's default (500 examples per process) would hide the real rate and
  # hold hundreds of decoded images in memory.
  ds = grain.MapDataset.source(stream).to_iter_dataset(grain.ReadOptions(
      num_threads=d.read_threads, prefetch_buffer_size=d.worker_buffer))
  workers = d.workers if workers is None else workers
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside app.run (tests, notebooks) use the defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=d.worker_buffer))
  cfg = packing.PackConfig(rows=rows, seq_len=seq_len, max_patches=d.max_patches_per_row,
                           overflow=d.overflow, lookahead=d.pack_lookahead,
                           patch_dim=3 * config.model.vision.patch_size ** 2)
  return PackedDataset(ds, stream, cfg, d.strict)


def global_batches(iterator: Iterator[dict], mesh) -> Iterator[dict]:
  """Process-local batches -> global jax.Arrays sharded over the batch axes."""
  from kimi_vl_jax.parallel import sharding
  for batch in iterator:
    yield sharding.make_global_batch(batch, mesh)
