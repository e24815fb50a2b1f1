"""Stage data sources for the loop: ``next() -> host batch``, ``get_state()``, ``set_state()``.

- LM / Kimi-VL stages: the project pipeline (``data/pipeline.py``: mixtures with the stage's
  schedules, first-fit packing, resumable grain iterator; its JSON state goes into each
  checkpoint). ``loss_on='all'`` widens the template's loss mask to every non-media token of
  every example (pretraining); ``'assistant'`` keeps the template's answer-only mask (SFT).
- ``vit_pretrain``: ``CaptionSource`` below, one image and its caption per row, drawn from the
  generated image datasets; row r of step s is a pure function of (seed, s, r), so its state is
  the step. Progressive resolution follows ``stage.max_image_side(step)``.
"""
from __future__ import annotations

import copy
import hashlib
import random
from typing import Optional

import jax
import numpy as np

from kimi_vl_jax.data import image_processor as ip, patch_packing
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.generated import DATASETS, get_dataset
from kimi_vl_jax.data.mixture import generated_views
from kimi_vl_jax.data.tokenizer import load_or_train

TEXT_SOURCES = ('text', 'needle', 'math')
DEFAULT_CAPTION_MIXTURE = 'shapes=2,ocr=1,charts=1'


def parse_mixture(spec: str) -> dict:
  out = {}
  for part in spec.split(','):
    name, _, w = part.partition('=')
    out[name.strip()] = float(w)
  return out


def _row_rng(*key) -> random.Random:
  digest = hashlib.blake2b('|'.join(map(str, key)).encode(), digest_size=8).digest()
  return random.Random(int.from_bytes(digest, 'little'))


def resolve_caption_source(config, stage_name: str, name: str) -> tuple[str, dict]:
  """A ViT-stage mixture name -> (generated dataset, keyword args): a ``data.sources`` entry of
  format ``generated`` (task views like ``words=generated:ocr?tasks=ocr_word``) or a generated
  dataset's own name. The largest image side comes from the stage (progressive resolution), so
  the view's max_side is dropped; its min_side (default 56) is capped at the stage's side.
  Raises ValueError naming ``stages.<stage>.mixture``."""
  views = generated_views(config.data.sources)
  if name in views:
    dataset, kw = views[name]
    return dataset, {k: v for k, v in kw.items() if k != 'max_side'}
  if name in DATASETS:
    return name, {}
  raise ValueError(
      f'stages.{stage_name}.mixture: {name!r} is neither a generated source of data.sources '
      f'({", ".join(views)}) nor a generated dataset ({", ".join(DATASETS)})')


class CaptionSource:
  """Image + caption rows for ``vit_pretrain`` (see the module docstring)."""

  def __init__(self, config, stage, split: str = 'train', seed: Optional[int] = None):
    t = config.train
    self.stage, self.split = stage, split
    self.seed = t.seed if seed is None else seed
    self.tok = load_or_train(vocab_size=config.model.lm.vocab_size)
    self.pad_id = self.tok.pad_id
    self.bos, self.eos = self.tok.bos_id, self.tok.eos_id
    self.rows = stage.global_batch // jax.process_count()
    self.row_offset = jax.process_index() * self.rows
    self.patches = int(stage.patches_per_row)
    self.max_side = int(t.image_max_side)
    self.image_cfg = ip.ImageProcessorConfig.from_vision_config(config.model.vision)
    self.caption_len = min(int(t.caption_len), int(config.model.coca.max_len))
    self.caption_text = str(stage.block.caption_text)
    self.mixture = parse_mixture(stage.block.mixture or DEFAULT_CAPTION_MIXTURE)
    self.source_names = tuple(self.mixture)
    self._sources = {name: resolve_caption_source(config, stage.name, name)
                     for name in self.mixture}
    self._datasets: dict = {}
    self.step = 0

  # ---- datasets
  def dataset(self, name: str, max_side: int):
    key = (name, max_side)
    if key not in self._datasets:
      dataset, kw = self._sources[name]
      kw = dict(kw)
      min_side = int(kw.pop('min_side', 56))
      extra = {} if dataset in TEXT_SOURCES else {'max_side': max_side,
                                                  'min_side': min(min_side, max_side)}
      self._datasets[key] = get_dataset(dataset, self.split, self.seed, **extra, **kw)
    return self._datasets[key]

  def _pick(self, rng: random.Random, names) -> str:
    names = [n for n in names if self.mixture.get(n, 0) > 0]
    weights = [self.mixture[n] for n in names]
    return rng.choices(names, weights)[0]

  # ---- batches
  def next(self) -> dict:
    out = self._vit_batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict:
    return {'step': self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state['step'])

  def _vit_batch(self, step: int) -> dict:
    rows, source_ids = [], []
    # Never beyond what one row's patch buffer holds (a square image of side s needs
    # (ceil(s / 28) * 2)^2 patches) nor beyond train.image_max_side.
    fits = int(np.sqrt(self.patches)) // 2 * 28
    side = min(self.stage.max_image_side(step, self.max_side), self.max_side, fits)
    for r in range(self.rows):
      rng = _row_rng(self.seed, self.stage.name, self.split, step, self.row_offset + r)
      name = self._pick(rng, [n for n in self.mixture if self._sources[n][0] not in TEXT_SOURCES])
      ds = self.dataset(name, side)
      record = ds[rng.randrange(len(ds))]
      rows.append(self.caption_example(record))
      source_ids.append(self.source_names.index(name))
    out = {k: np.stack([r[k] for r in rows]) for k in ('caption', 'caption_mask')}
    out['source_ids'] = np.asarray(source_ids, np.int32)     # [B] index into source_names
    packed = patch_packing.stack_packs([r['packed'] for r in rows])
    out['patches'] = packed['patches']
    for k in patch_packing.PATCH_FIELDS[1:]:
      out['patch_' + k] = packed[k]
    return out

  def caption_example(self, record: dict) -> dict:
    """One image + caption: a caption record's text; a QA record's question + answer, or only
    its answer with ``stages.<name>.caption_text='answer'``. Answer-only text makes the SigLIP
    negatives of one batch differ in content rather than in question template, and every
    caption token depends on the image (the CoCa readout of held-out OCR words: 0.02 -> 0.15)."""
    user = [it for it in record['messages'][-2]['content']]
    image = next(it['image'] for it in user if it['type'] == 'image')
    question = ' '.join(it['text'] for it in user if it['type'] == 'text')
    if record['task'] == 'caption' or self.caption_text == 'answer':
      text = record['answer']
    else:
      text = f'{question} {record["answer"]}'
    ids = [self.bos] + self.tok.encode(text)[: self.caption_len - 2] + [self.eos]
    cap = np.full(self.caption_len, self.pad_id, np.int32)
    cap[:len(ids)] = ids
    cmask = (np.arange(self.caption_len) < len(ids)).astype(np.int32)
    im = ip.process_image(image, self.image_cfg)
    return {'caption': cap, 'caption_mask': cmask,
            'packed': patch_packing.pack_images([im], self.patches)}


class PipelineSource:
  """The project pipeline for one LM / Kimi-VL stage (see the module docstring)."""

  def __init__(self, config, stage, with_images: bool):
    from kimi_vl_jax.data import pipeline
    self.tok = load_or_train(config.data.tokenizer, config.model.lm.vocab_size,
                             config.data.tokenizer_cache)
    if stage.patches_per_row != config.data.max_patches_per_row:
      config = copy.deepcopy(config)       # this stage's patch buffer (stage.max_patches_per_row)
      config.data.max_patches_per_row = stage.patches_per_row
    self.dataset = pipeline.build_dataset(config, stage=stage.name, stage_steps=stage.steps,
                                          tokenizer=self.tok, seq_len=stage.seq_len,
                                          global_batch=stage.global_batch)
    self.iterator = iter(self.dataset)
    self.source_names = tuple(self.dataset.stream.mixture.names) if hasattr(
        self.dataset, 'stream') else ()
    self.loss_on = stage.block.loss_on
    self.with_images = with_images
    self.media_ids = np.array([self.tok.token_id(x) for x in st.MEDIA_TOKENS], np.int32)

  def next(self) -> dict:
    batch = dict(next(self.iterator))
    if self.loss_on == 'all':
      real = (batch['segment_ids'] > 0) & ~np.isin(batch['tokens'], self.media_ids)
      batch['loss_mask'] = real.astype(np.int32)
    if not self.with_images:
      batch = {k: v for k, v in batch.items() if not k.startswith('patch')}
    batch['source_ids'] = np.maximum(batch['source_ids'], 0)
    return batch

  def get_state(self) -> dict:
    return self.iterator.get_state()

  def set_state(self, state: dict) -> None:
    self.iterator.set_state(state)


def batch_spec(config, stage) -> dict:
  """The global batch of one step of ``stage`` as ``{key: jax.ShapeDtypeStruct}``: what
  ``make_source(config, stage).next()`` returns on every process together, from the config
  alone (no tokenizer, no data), for compiling a step ahead of time (``train/aot.py``)."""
  rows, i32 = stage.global_batch, np.int32
  spec = {}

  def add(key, shape, dtype=i32):
    spec[key] = jax.ShapeDtypeStruct((rows,) + tuple(shape), np.dtype(dtype))

  if stage.task == 'vit_pretrain':
    caption_len = min(int(config.train.caption_len), int(config.model.coca.max_len))
    add('caption', (caption_len,))
    add('caption_mask', (caption_len,))
    add('source_ids', ())
  else:
    for key in ('tokens', 'segment_ids', 'positions', 'loss_mask', 'source_ids'):
      add(key, (stage.seq_len,))
  if stage.task in ('vit_pretrain', 'kimi_vl'):
    patch = int(config.model.vision.patch_size)
    add('patches', (stage.patches_per_row, 3 * patch * patch), np.float32)   # RGB, C*p*p
    for key in patch_packing.PATCH_FIELDS[1:]:
      add('patch_' + key, (stage.patches_per_row,))
  return spec


def make_source(config, stage, mesh=None):
  del mesh
  if stage.task == 'vit_pretrain':
    return CaptionSource(config, stage)
  return PipelineSource(config, stage, with_images=stage.task == 'kimi_vl')


class Prefetcher:
  """Builds the next batches on a background thread while the device runs the current step.

  ``get_state()`` is the source state after the last batch handed out (not after the ones
  waiting in the queue), so a checkpoint taken between steps resumes at the right batch.
  """

  def __init__(self, source, depth: int = 2):
    import queue
    import threading
    self.source = source
    self.tok = getattr(source, 'tok', None)
    self.source_names = getattr(source, 'source_names', ())
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._state = source.get_state()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        batch = self.source.next()
        item = (batch, self.source.get_state(), None)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except Exception:  # queue.Full
            continue
    except BaseException as e:  # surfaced on the consumer's next call
      self._queue.put((None, None, e))

  def next(self) -> dict:
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    self._state = state
    return batch

  def get_state(self):
    return self._state

  def close(self):
    self._stop.set()
    while not self._queue.empty():
      self._queue.get_nowait()
    self._thread.join(timeout=5)
