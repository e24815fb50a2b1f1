"""Evaluation in training: held-out exact match by greedy generation, caption perplexity, needle.

Eval sets (``config.stages.<name>.eval``), all from the generated datasets' held-out split (disjoint
from training by construction, ``data/generated/base.py``):
- ``vqa``: shapes color + shape questions; ``counting``: shapes count; ``ocr``: ocr_word;
- ``caption_ppl``: perplexity of the canonical caption (answer tokens) of shapes ``caption`` records;
- ``needle``: a 4-digit code hidden in a haystack that fills about the stage's row length.

Greedy decoding runs the full model over a fixed [B, S] buffer once per new token inside one
``while_loop`` (no KV cache: the prompt carries images, and answers are a few tokens) that ends
once every row has emitted the end of its turn, and reads only the last position's logits from
the final hidden states (``lm_head`` applied to one vector per row), so long rows never
materialize [B, S, V].
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.data import chat_template, image_processor as ip, patch_packing
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.config.validate import ConfigError, register_check
from kimi_vl_jax.data.generated import chance_level, get_dataset, is_correct
from kimi_vl_jax.models import generate as generate_lib
from kimi_vl_jax.parallel import sharding as shard_lib
from kimi_vl_jax.train import tasks as tasks_lib

# eval name -> (dataset, tasks)
EXACT_MATCH_SETS = {
    'vqa': ('shapes', ('color', 'shape')),
    'counting': ('shapes', ('count',)),
    'ocr': ('ocr', ('ocr_word',)),
    'needle': ('needle', ('needle',)),
}
CHANCE = {name: float(np.mean([chance_level(t) for t in tasks]))
          for name, (_, tasks) in EXACT_MATCH_SETS.items() if name != 'needle'}


# Eval rows are cut to the prompts they hold (tokens and patch slots rounded up to these), not
# the stage's training rows: greedy decoding reruns the model per new token, and one short
# prompt in a 256-token row with 512 patch slots cost ~45 s per eval point in the demo.
_EVAL_ROUND_TOKENS = 64
_EVAL_ROUND_PATCHES = 64


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _prompt(record: dict, tok, image_cfg, seq_len: int):
  """Prompt ids (all turns but the answer, then the assistant header) and processed images."""
  messages = record['messages'][:-1]
  images = [ip.process_image(it['image'], image_cfg) for m in messages
            for it in chat_template.content_items(m) if it['type'] == 'image']
  counts = [im.num_patches // 4 for im in images]
  ids, _ = chat_template.encode_chat(messages, tok, counts, add_generation_prompt=True)
  if len(ids) > seq_len:
    raise ValueError(f'{record.get("origin")}: prompt of {len(ids)} tokens exceeds the eval row '
                     f'length {seq_len}')
  return ids, images


def _eval_shape(prompts, max_new: int, seq_len: int, patches: int) -> tuple[int, int]:
  """(row tokens, patch slots) that hold every prompt plus ``max_new`` tokens, rounded up
  (few distinct shapes, few compiles) and capped at the stage's row."""
  need = max(len(ids) for ids, _ in prompts) + max_new
  slots = max(sum(im.num_patches for im in images) for _, images in prompts)
  return (min(seq_len, _round_up(need, _EVAL_ROUND_TOKENS)),
          min(patches, _round_up(max(slots, 1), _EVAL_ROUND_PATCHES)))


def _rows(prompts, seq_len: int, batch: int, patches: int = 0):
  """Greedy-decoding rows: tokens [batch, seq_len], lens [batch], packed images (when
  ``patches``); one prompt per row, rows past the prompts repeat the first."""
  prompts = [(ids, patch_packing.pack_images(images, patches) if patches else None)
             for ids, images in prompts]
  b = len(prompts)
  tokens = np.zeros((batch, seq_len), np.int32)
  lens = np.ones((batch,), np.int32)
  for i, (ids, _) in enumerate(prompts):
    tokens[i, :len(ids)] = ids
    lens[i] = len(ids)
  out = {'tokens': tokens, 'lens': lens}
  if prompts[0][1] is not None:
    packs = [p for _, p in prompts] + [prompts[0][1]] * (batch - b)
    stacked = patch_packing.stack_packs(packs)
    out['patches'] = stacked['patches']
    for k in patch_packing.PATCH_FIELDS[1:]:
      out['patch_' + k] = stacked[k]
    # Padding rows repeat the first prompt's images; give them its tokens too (consistent counts).
    for i in range(b, batch):
      out['tokens'][i] = tokens[0]
      out['lens'][i] = lens[0]
  return out


def make_greedy(task, max_new: int, stop_id: Optional[int] = None):
  """jit-able ``fn(params, extra, batch) -> new tokens [B, max_new]``: ``make_decoder`` at
  temperature 0 (argmax)."""
  decode = make_decoder(task, max_new, stop_id)
  return lambda params, extra, batch: decode(params, extra, batch, None)


def make_decoder(task, max_new: int, stop_id: Optional[int] = None, temperature: float = 0.0,
                 top_p: float = 1.0):
  """jit-able ``fn(params, extra, batch, rng) -> new tokens [B, max_new]``.

  ``batch``: 'tokens' [B, S] right-padded prompts, 'lens' [B], and the rows' patch buffers.
  One prefill runs the whole model (vision tower included) over the prompts and fills the
  LM's latent KV cache (``models/generate.py``); each new token is then one single-token LM
  step against that cache, instead of a full forward over the row per token.
  With ``stop_id`` the loop ends as soon as every row has produced it (answers here are a few
  tokens of the 8 allowed), and each row reads ``stop_id`` from its first one on.
  ``temperature`` 0: argmax (``rng`` unused, may be None); else temperature + nucleus
  (``top_p``) sampling, new token i drawn with ``fold_in(rng, i)`` (RL rollouts)."""
  model = task.model
  lm_cfg = model.config.lm if 'lm' in model.config else model.config

  def next_token(variables, kernel, args, kwargs, at_b, rng):
    _, h, aux = tasks_lib.apply_with_hidden(model, variables, args, kwargs)
    h_b = jnp.take_along_axis(h, at_b[:, None, None], axis=1)[:, 0]
    logits = h_b.astype(jnp.float32) @ kernel.astype(jnp.float32)
    if temperature <= 0.0:
      return jnp.argmax(logits, axis=-1), aux['cache']
    return generate_lib.sample_logits(logits, rng, temperature, top_p), aux['cache']

  def fn(params, extra, batch, rng):
    variables = {'params': params, **extra}
    kernel = tasks_lib._lm_head_kernel(params)
    tokens, lens = batch['tokens'], batch['lens']
    b, s = tokens.shape
    key = (lambda i: jax.random.fold_in(rng, i)) if temperature > 0.0 else (lambda i: None)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    prefill = {k: batch[k] for k in tasks_lib.PATCH_KEYS if k in batch}
    prefill['decode_cache'] = generate_lib.init_cache(lm_cfg, b, s + max_new, lm_cfg.dtype)
    first, cache = next_token(variables, kernel,
                              (tokens, (pos < lens[:, None]).astype(jnp.int32), pos), prefill,
                              lens - 1, key(0))

    def body(carry):
      i, cache, cur, out, done = carry
      out = jax.lax.dynamic_update_slice(out, cur[:, None].astype(out.dtype), (0, i))
      if stop_id is not None:
        done = done | (cur == stop_id)
      args = (cur[:, None], jnp.ones((b, 1), jnp.int32), (lens + i)[:, None].astype(jnp.int32))

      def step(cache):
        return next_token(variables, kernel, args, {'decode_cache': cache},
                          jnp.zeros((b,), jnp.int32), key(i + 1))

      # The token just written may be the last one wanted: then skip the model step.
      last = (i + 1 >= max_new) | jnp.all(done)
      nxt, cache = jax.lax.cond(last, lambda c: (cur, c), step, cache)
      return i + 1, cache, nxt, out, done

    def cond(carry):
      i, _, _, _, done = carry
      return (i < max_new) & ~jnp.all(done)

    init = (jnp.zeros((), jnp.int32), cache, first, jnp.zeros((b, max_new), tokens.dtype),
            jnp.zeros((b,), bool))
    _, _, _, new, _ = jax.lax.while_loop(cond, body, init)
    if stop_id is not None:   # positions after a row's stop may not have been written
      new = jnp.where(jnp.cumsum(new == stop_id, axis=1) > 0, stop_id, new)
    return new

  return fn


def eval_views(config) -> dict[str, dict]:
  """``train.eval_sources`` (``'ocr=words,counting=counting'``) -> {eval set: generator kwargs}.

  An eval set named there draws its held-out images like that ``data.sources`` entry (a
  ``generated`` view of the eval set's dataset): sides, layout options; its tasks stay the eval
  set's. Raises ValueError naming ``train.eval_sources`` and the entry.
  """
  from kimi_vl_jax.data.mixture import generated_views
  text = str(config.train.eval_sources or '').strip()
  if not text:
    return {}
  generated = generated_views(config.data.sources)
  views = {}
  for entry in filter(None, (e.strip() for e in text.split(','))):
    name, eq, source = (x.strip() for x in entry.partition('='))
    where = f'train.eval_sources: {entry!r}'
    if not eq or name not in EXACT_MATCH_SETS or name == 'needle':
      raise ValueError(f'{where}: expected <eval set>=<data.sources name> with an eval set of '
                       f'{", ".join(n for n in EXACT_MATCH_SETS if n != "needle")}')
    if source not in generated:
      raise ValueError(f'{where}: {source!r} is not a generated source of data.sources '
                       f'({", ".join(generated)})')
    dataset, kw = generated[source]
    if dataset != EXACT_MATCH_SETS[name][0]:
      raise ValueError(f'{where}: {source!r} draws from {dataset!r}, but eval set {name!r} '
                       f'scores {EXACT_MATCH_SETS[name][0]!r} tasks')
    views[name] = {k: v for k, v in kw.items() if k != 'tasks'}
  return views


def held_out_descriptions(config) -> dict[str, str]:
  """{eval set: the generated data it scores, as a source path} for the run report."""
  views = eval_views(config)
  out = {}
  for name, (dataset, tasks) in EXACT_MATCH_SETS.items():
    if name == 'needle':
      continue
    kw = {'tasks': ','.join(tasks), 'max_side': int(config.train.image_max_side),
          **views.get(name, {})}
    out[name] = f'{dataset}?' + '&'.join(f'{k}={v}' for k, v in kw.items())
  return out


@register_check
def _check_eval_sources(config, num_devices=None):
  del num_devices
  try:
    eval_views(config)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None


def eval_dataset(config, ds_name: str, tasks, seq_len: int, split: str = 'eval',
                 name: str | None = None):
  """The held-out generated dataset of eval set ``name`` (its dataset ``ds_name``, ``tasks``).

  Images are drawn like the ``data.sources`` view that ``train.eval_sources`` names for it,
  else at most ``train.image_max_side`` pixels on a side (the size an experiment trains its
  generated image sources at); needle haystacks fill about a third of the stage's row of
  ``seq_len`` tokens."""
  if ds_name == 'needle':
    kw = {'length': max(10, seq_len // 3)}
  else:
    kw = {'max_side': int(config.train.image_max_side), **eval_views(config).get(name, {})}
  return get_dataset(ds_name, split, config.data.seed, tasks=tasks, **kw)


class Evaluator:
  """Callable ``(config, stage, task, state, mesh) -> {metric: value}`` for the loop."""

  def __init__(self, num_examples: int = 32, max_new_tokens: int = 8, split: str = 'eval'):
    self.n, self.max_new, self.split = num_examples, max_new_tokens, split
    self._cache = {}

  def __call__(self, config, stage, task, state, mesh) -> dict:
    if stage.task == 'vit_pretrain' or not stage.block.eval:
      return {}
    from kimi_vl_jax.data.tokenizer import load_or_train
    tok = load_or_train(config.data.tokenizer, config.model.lm.vocab_size, config.data.tokenizer_cache)
    image_cfg = ip.ImageProcessorConfig.from_vision_config(config.model.vision,
                                                           config.data.in_token_limit)
    patches = stage.patches_per_row if stage.task == 'kimi_vl' else 0
    out = {}
    for name in stage.block.eval:
      if name == 'caption_ppl':
        out['caption_ppl'] = self.caption_ppl(config, stage, task, state, mesh, tok, image_cfg, patches)
        continue
      if name in ('vqa', 'counting', 'ocr') and stage.task != 'kimi_vl':
        continue
      ds_name, tasks = EXACT_MATCH_SETS[name]
      ds = eval_dataset(config, ds_name, tasks, stage.seq_len, self.split, name)
      records = [ds[i] for i in range(self.n)]
      texts = self.generate(config, stage, task, state, mesh, tok, image_cfg, patches, records)
      out[f'exact_match/{name}'] = float(np.mean([is_correct(r, t) for r, t in zip(records, texts)]))
    return out

  def generate(self, config, stage, task, state, mesh, tok, image_cfg, patches, records) -> list[str]:
    dp = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp', 'expert')]))
    batch = -(-len(records) // dp) * dp
    prompts = [_prompt(r, tok, image_cfg, stage.seq_len - self.max_new) for r in records]
    seq, patches = _eval_shape(prompts, self.max_new, stage.seq_len, patches)
    rows = _rows(prompts, seq, batch, patches)
    key = (stage.name, id(task), id(tok))   # jit keeps one executable per row shape
    if key not in self._cache:
      self._cache = {key: jax.jit(make_greedy(task, self.max_new, tok.token_id(st.IM_END)))}
    # Every process builds all rows and reads back all sampled tokens (multi-process jobs).
    dev = shard_lib.make_global_batch_from_full(dict(rows), mesh)
    with shard_lib.activation_context(mesh):
      new = shard_lib.gather_to_host(self._cache[key](state.params, state.extra, dev))
    end = tok.token_id(st.IM_END)
    texts = []
    for row in new[:len(records)]:
      ids = list(row)
      if end in ids:
        ids = ids[:ids.index(end)]
      texts.append(tok.decode([int(i) for i in ids]))
    return texts

  def caption_ppl(self, config, stage, task, state, mesh, tok, image_cfg, patches) -> float:
    from kimi_vl_jax.data import examples as examples_lib
    ds = eval_dataset(config, 'shapes', ('caption',), stage.seq_len, self.split)
    dp = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp', 'expert')]))
    n = -(-self.n // dp) * dp
    seq = stage.seq_len
    exs = [examples_lib.build_example(ds[i % self.n], tok, image_cfg) for i in range(n)]
    batch = {'tokens': np.zeros((n, seq), np.int32), 'segment_ids': np.zeros((n, seq), np.int32),
             'positions': np.zeros((n, seq), np.int32), 'loss_mask': np.zeros((n, seq), np.int32),
             'source_ids': np.zeros((n, seq), np.int32)}
    packs = []
    for i, ex in enumerate(exs):
      t = min(ex.num_tokens, seq)
      batch['tokens'][i, :t] = ex.tokens[:t]
      batch['segment_ids'][i, :t] = 1
      batch['positions'][i, :t] = np.arange(t)
      batch['loss_mask'][i, :t] = ex.loss_mask[:t]
      if patches:
        packs.append(patch_packing.pack_images(list(zip(ex.patches, ex.grids)), patches))
    if patches:
      stacked = patch_packing.stack_packs(packs)
      batch['patches'] = stacked['patches']
      for k in patch_packing.PATCH_FIELDS[1:]:
        batch['patch_' + k] = stacked[k]
    key = ('ppl', stage.name, id(task), n, seq)
    if key not in self._cache:
      self._cache[key] = jax.jit(lambda p, e, b: task.loss(p, e, b, None))
    with shard_lib.activation_context(mesh):
      obj, aux = self._cache[key](state.params, state.extra,
                                  shard_lib.make_global_batch_from_full(batch, mesh))
    obj, denom = shard_lib.gather_to_host((obj, aux['sums']['denom']))
    return float(np.exp(float(obj) / max(float(denom), 1.0)))


def default_evaluator(config) -> Optional[Evaluator]:
  return Evaluator(num_examples=int(config.train.eval_examples))
