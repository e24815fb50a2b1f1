"""Eval sets: held-out generated data drawn at the experiment's image size."""
import pytest

from kimi_vl_jax.config import ConfigError, validate

from kimi_vl_jax.config import base_config
from kimi_vl_jax.data.generated import is_correct
from kimi_vl_jax.train import evaluate


def _images(record):
  return [it['image'] for m in record['messages'] if isinstance(m['content'], list)
          for it in m['content'] if it['type'] == 'image']


@pytest.mark.parametrize('side', [56, 112])
def test_eval_images_follow_train_image_max_side(side):
  c = base_config('tiny')
  c.train.image_max_side = side
  for name in ('vqa', 'counting', 'ocr'):
    ds_name, tasks = evaluate.EXACT_MATCH_SETS[name]
    ds = evaluate.eval_dataset(c, ds_name, tasks, seq_len=128)
    records = [ds[i] for i in range(8)]
    assert all(r['task'] in tasks for r in records)
    sizes = [im.size for r in records for im in _images(r)]
    assert sizes and max(max(s) for s in sizes) <= side, (name, sizes)
    assert all(is_correct(r, r['answer']) for r in records)


def test_needle_haystack_fills_a_third_of_the_row():
  c = base_config('tiny')
  short = evaluate.eval_dataset(c, 'needle', ('needle',), seq_len=300)
  long = evaluate.eval_dataset(c, 'needle', ('needle',), seq_len=3000)
  assert short.length == 100 and long.length == 1000


def _valid_config():
  c = base_config('tiny')
  for name in c.stages:
    c.stages[name].steps = 4
  return c


def test_eval_sources_draw_held_out_images_like_the_named_view():
  """``train.eval_sources='ocr=words'``: the OCR eval draws its held-out words like the
  ``words`` view (112-px upright text filling the image), still scoring ocr_word only."""
  c = _valid_config()
  c.train.image_max_side = 112
  c.data.sources += (';words=generated:ocr?tasks=ocr_word&min_side=112&max_side=112'
                     '&max_angle=0&min_fill=0.95@0#mm#qa')
  plain = evaluate.eval_dataset(c, 'ocr', ('ocr_word',), 128, name='ocr')
  assert any(plain[i]['meta']['angle'] for i in range(16))
  c.train.eval_sources = 'ocr=words'
  validate(c)
  ds = evaluate.eval_dataset(c, 'ocr', ('ocr_word',), 128, name='ocr')
  for i in range(16):
    r = ds[i]
    assert r['task'] == 'ocr_word' and _images(r)[0].size == (112, 112)
    assert r['meta']['angle'] == 0 and r['meta']['size_frac'] == 0.95
  assert ds.split == 'eval'


@pytest.mark.parametrize('value, match', [
    ('ocr=nope', "'nope' is not a generated source"),
    ('ocr=shapes', "draws from 'shapes'"),
    ('reading=words', 'expected <eval set>=<data.sources name>'),
    ('ocr', 'expected <eval set>=<data.sources name>')])
def test_eval_sources_mistakes_are_config_errors(value, match):
  c = _valid_config()
  c.data.sources += ';words=generated:ocr?tasks=ocr_word@0#mm#qa'
  c.train.eval_sources = value
  with pytest.raises(ConfigError, match=r'config.train.eval_sources: .*' + match):
    validate(c)


def test_held_out_descriptions_name_the_view_an_eval_set_uses():
  c = _valid_config()
  c.train.image_max_side = 112
  c.data.sources += ';words=generated:ocr?tasks=ocr_word&max_angle=0@0#mm#qa'
  assert evaluate.held_out_descriptions(c)['ocr'] == 'ocr?tasks=ocr_word&max_side=112'
  c.train.eval_sources = 'ocr=words'
  described = evaluate.held_out_descriptions(c)
  assert described['ocr'] == 'ocr?tasks=ocr_word&max_side=112&max_angle=0'
  assert described['counting'] == 'shapes?tasks=count&max_side=112'


@pytest.fixture(scope='module')
def tiny_kimi_vl():
  """The tiny Kimi-VL task, its jitted init (one compile serves every seed), the tokenizer and
  the image processor's config."""
  import jax
  from kimi_vl_jax.data import image_processor as ip
  from kimi_vl_jax.data import special_tokens as st
  from kimi_vl_jax.data.tokenizer import load_or_train
  from kimi_vl_jax.train import tasks
  c = base_config('tiny')
  c.train.image_max_side = 56
  tok = load_or_train(c.data.tokenizer, c.model.lm.vocab_size, c.data.tokenizer_cache)
  image_cfg = ip.ImageProcessorConfig.from_vision_config(c.model.vision, c.data.in_token_limit)
  task = tasks.kimi_vl_task(c.model, c.train, media_pad_id=tok.token_id(st.MEDIA_PAD))
  return c, tok, image_cfg, task, jax.jit(task.init)


def _tiny_kimi_vl_and_prompts(tiny_kimi_vl, seed: int, max_new: int):
  """A random tiny Kimi-VL task (params, other variables) and 3 counting prompts with images."""
  import flax.linen as nn
  import jax
  c, tok, image_cfg, task, init = tiny_kimi_vl
  variables = nn.unbox(init(jax.random.PRNGKey(seed)))
  params = variables.pop('params')
  ds = evaluate.eval_dataset(c, 'shapes', ('count',), seq_len=256)
  return task, params, variables, [evaluate._prompt(ds[i], tok, image_cfg, 256 - max_new)
                                   for i in range(3)]


def test_greedy_rows_cut_to_the_prompts_decode_like_the_stage_rows(tiny_kimi_vl):
  """Eval rows hold the prompts (64-token and 64-slot multiples), not the stage's training
  rows; the decoded tokens are the same as in full-size rows (padding is never attended)."""
  import jax
  import numpy as np
  task, params, variables, prompts = _tiny_kimi_vl_and_prompts(tiny_kimi_vl, seed=0, max_new=4)
  seq, slots = evaluate._eval_shape(prompts, 4, seq_len=256, patches=512)
  assert (seq, slots) == (64, 64), (seq, slots)
  assert evaluate._eval_shape(prompts, 4, seq_len=48, patches=32) == (48, 32)   # capped
  greedy = jax.jit(evaluate.make_greedy(task, 4))
  cut = greedy(params, variables, evaluate._rows(prompts, seq, 4, slots))
  full = greedy(params, variables, evaluate._rows(prompts, 256, 4, 512))
  np.testing.assert_array_equal(np.asarray(cut), np.asarray(full))
  # Stopping at the end token: the same tokens up to the first stop, the stop token after it.
  stop = int(np.asarray(full)[0, 1])   # a token the first row emits second: it stops there
  early = np.asarray(jax.jit(evaluate.make_greedy(task, 4, stop))(
      params, variables, evaluate._rows(prompts, seq, 4, slots)))
  full = np.asarray(full)
  for row_full, row_early in zip(full, early):
    hits = np.flatnonzero(row_full == stop)
    k = hits[0] if hits.size else len(row_full)
    np.testing.assert_array_equal(row_early[:k + 1], row_full[:k + 1])
    assert (row_early[k:] == stop).all()


def test_cached_greedy_decodes_what_full_forwards_decode(tiny_kimi_vl):
  """make_greedy prefills the latent KV cache once and decodes one token per LM step; the
  tokens equal those of re-running the whole model (vision tower included) over the row for
  every new token."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kimi_vl_jax.train import tasks
  task, params, variables, prompts = _tiny_kimi_vl_and_prompts(tiny_kimi_vl, seed=1, max_new=6)
  seq, slots = evaluate._eval_shape(prompts, 6, seq_len=256, patches=512)
  rows = evaluate._rows(prompts, seq, 4, slots)
  got = np.asarray(jax.jit(evaluate.make_greedy(task, 6))(params, variables, rows))

  # Oracle: the full model over the whole row for each token, argmax at the last real one.
  kwargs = {k: jnp.asarray(rows[k]) for k in tasks.PATCH_KEYS if k in rows}
  full = jax.jit(lambda t, seg, pos: task.model.apply({'params': params, **variables}, t, seg,
                                                      pos, **kwargs)[0])
  tokens, lens = np.array(rows['tokens']), np.array(rows['lens'])
  pos = np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape)
  want = np.zeros_like(got)
  for t in range(6):
    cur = lens + t
    logits = np.asarray(full(tokens, (pos < cur[:, None]).astype(np.int32), pos))
    nxt = logits[np.arange(len(cur)), cur - 1].argmax(-1)
    want[:, t] = nxt
    tokens[np.arange(len(cur)), cur] = nxt
  np.testing.assert_array_equal(got[:3], want[:3])
  assert len(set(map(tuple, got[:3]))) > 1 or len(set(got[0])) > 1   # not a constant output
