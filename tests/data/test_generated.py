"""Generated datasets: determinism, disjoint splits, exact answers (re-derived from pixels
where possible), size variety, template compatibility, speed."""
import collections
import pickle
import re
import time

import grain
import numpy as np
import pytest
from scipy import ndimage

from kimi_vl_jax.data import chat_template
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data import generated as g
from kimi_vl_jax.data.generated import base, charts, render, scoring, shapes, video

IMAGE_SETS = ('shapes', 'ocr', 'charts', 'gui', 'video', 'interleaved')


def _images(record):
  items = record['items'] if record['kind'] == 'document' else [
      it for m in record['messages'] for it in m['content']]
  return [np.asarray(it['image']) for it in items if it['type'] == 'image']


def _texts(record):
  items = record['items'] if record['kind'] == 'document' else [
      it for m in record['messages'] for it in m['content']]
  return [it['text'] for it in items if it['type'] == 'text']


def _fingerprint(record):
  return (record['task'], tuple(_texts(record)),
          tuple(a.tobytes() + bytes(str(a.shape), 'ascii') for a in _images(record)))


def _mask(img, rgb):
  return np.all(img == np.asarray(rgb, np.uint8), axis=-1)


# ---------------------------------------------------------------- registry and arguments
def test_registry_errors_and_chance_levels():
  assert set(g.DATASETS) == {'shapes', 'ocr', 'charts', 'gui', 'video', 'interleaved', 'needle',
                             'math', 'text'}
  with pytest.raises(ValueError, match='unknown generated dataset'):
    g.get_dataset('nope')
  with pytest.raises(ValueError, match='split='):
    g.get_dataset('shapes', 'test')
  with pytest.raises(ValueError, match='tasks='):
    g.get_dataset('shapes', tasks=('ocr_word',))
  with pytest.raises(ValueError, match='difficulty='):
    g.get_dataset('ocr', difficulty=3)
  with pytest.raises(IndexError):
    g.get_dataset('shapes', size=10)[10]
  with pytest.raises(ValueError, match='length='):
    g.get_dataset('needle', length=3)
  with pytest.raises(ValueError, match='unknown task'):
    g.chance_level('nope')
  assert g.chance_level('count') == pytest.approx(1 / 5)
  assert g.chance_level('color') == pytest.approx(1 / 6)
  assert g.chance_level('shape') == pytest.approx(1 / 3)
  assert g.chance_level('ocr_word') == pytest.approx(1 / 20)
  assert g.chance_level('video_direction', 1) == pytest.approx(1 / 8)
  assert g.chance_level('gui_click') == pytest.approx((1 / 2 + 1 / 3) / 2)
  for task in g.TASK_TO_DATASET:
    for d in (0, 1, 2):
      c = g.chance_level(task, d)
      assert 0.0 <= c < 1.0, (task, d, c)
      assert g.chance_level(task, 0) >= c, task     # harder never easier to guess
  assert len(set(render.ALL_COLORS.values())) == len(render.ALL_COLORS)
  from kimi_vl_jax.data.generated import vocab
  assert len(set(vocab.WORDS)) == len(vocab.WORDS)


# ---------------------------------------------------------------- determinism and splits
@pytest.mark.parametrize('name', g.DATASETS)
def test_deterministic_and_picklable(name):
  kw = {'length': 120} if name in ('needle', 'text') else {}
  ds = g.get_dataset(name, 'train', 3, tasks=g.get_dataset(name).TASKS, **kw)
  again = pickle.loads(pickle.dumps(g.get_dataset(name, 'train', 3, tasks=ds.tasks, **kw)))
  for i in (0, 7, 12345, len(ds) - 1):
    assert _fingerprint(ds[i]) == _fingerprint(again[i])
    assert ds[i]['meta'] == again[np.int64(i)]['meta']
  other = g.get_dataset(name, 'train', 4, tasks=ds.tasks, **kw)
  assert sum(_fingerprint(ds[i]) != _fingerprint(other[i]) for i in range(8)) >= 6
  # grain reads it as a random-access source.
  src = grain.MapDataset.source(ds)
  assert len(src) == len(ds) and _fingerprint(src[5]) == _fingerprint(ds[5])


@pytest.mark.parametrize('name', g.DATASETS)
def test_splits_disjoint_by_construction(name):
  kw = {'length': 60} if name in ('needle', 'text') else {}
  tasks = g.get_dataset(name).TASKS
  specs = {}
  for split in g.SPLITS:
    hashes = set()
    for seed in (0, 1):
      ds = g.get_dataset(name, split, seed, tasks=tasks, **kw)
      for i in range(40):
        spec = ds.spec(i)
        h = base.spec_hash(name, spec)
        assert (h % base.EVAL_MODULUS == 0) == (split == 'eval')
        hashes.add(h)
    specs[split] = hashes
  assert not specs['train'] & specs['eval']
  assert len(specs['eval']) >= 70            # not a handful of repeated examples


def test_eval_images_never_in_train():
  train = g.get_dataset('shapes', 'train', 0, tasks='count')
  ev = g.get_dataset('shapes', 'eval', 0, tasks='count')
  train_imgs = {_images(train[i])[0].tobytes() for i in range(300)}
  assert not train_imgs & {_images(ev[i])[0].tobytes() for i in range(100)}


# ---------------------------------------------------------------- records fit the template
@pytest.mark.parametrize('name', g.DATASETS)
def test_records_render_with_chat_template(name):
  kw = {'length': 50} if name in ('needle', 'text') else {}
  ds = g.get_dataset(name, 'train', 0, tasks=g.get_dataset(name).TASKS, **kw)
  for i in range(6):
    r = ds[i]
    assert r['source'] == name and r['task'] in ds.TASKS and r['origin'].startswith(name)
    n_img = len(_images(r))
    if r['kind'] == 'document':
      text = chat_template.render_document(r['items'], [1] * n_img)
      assert text.endswith(st.EOS)
    else:
      text = chat_template.render_chat(r['messages'], [1] * n_img)
      answer_turn = r['messages'][-1]
      assert answer_turn['role'] == 'assistant'
      assert answer_turn['content'][0]['text'].endswith(r['answer'].rstrip('.')) or \
          r['task'] in scoring.NUMERIC_TASKS
      assert g.is_correct(r, answer_turn['content'][0]['text'])
    assert text.count(st.MEDIA_PAD) == n_img


# ---------------------------------------------------------------- answers from pixels
@pytest.mark.parametrize('difficulty', [0, 1, 2])
def test_shapes_count_color_kind_from_pixels(difficulty):
  kinds_fill = {'circle': np.pi / 4, 'square': 1.0, 'triangle': 0.5}
  for task in ('count', 'color', 'shape'):
    ds = g.get_dataset('shapes', 'train', 0, tasks=task, difficulty=difficulty)
    for i in range(25):
      r = ds[i]
      img = _images(r)[0]
      bg = _mask(img, r['meta']['bg'])
      labels, n = ndimage.label(~bg, structure=np.ones((3, 3)))
      assert n == len(r['meta']['shapes'])
      if task == 'count':
        assert r['answer'] == str(n)
        assert 1 <= n <= shapes.MAX_COUNT[difficulty]
      tgt = r['meta']['shapes'][r['meta']['target']]
      comp = labels == labels[tgt[3], tgt[2]]       # the component under the target centre
      colors = np.unique(img[comp].reshape(-1, 3), axis=0)
      assert len(colors) == 1
      if task == 'color':
        assert tuple(colors[0]) == render.ALL_COLORS[r['answer']]
      if task == 'shape':
        assert r['answer'] == tgt[0]
        if difficulty == 0:            # fill ratio of the bbox identifies the kind
          ys, xs = np.nonzero(comp)
          fill = comp.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
          assert abs(fill - kinds_fill[r['answer']]) < 0.12, (r['answer'], fill)


def test_shapes_caption_and_unique_targets():
  shp = (('square', 'blue', 0, 0, 1, 0), ('circle', 'red', 0, 0, 1, 0),
         ('circle', 'red', 0, 0, 1, 0))
  assert shapes.caption_text(shp) == 'The image shows 2 red circles and 1 blue square.'
  for task, slot in (('color', 0), ('shape', 1)):
    ds = g.get_dataset('shapes', 'train', 0, tasks=task, difficulty=1)
    for i in range(20):
      m = ds[i]['meta']
      tgt = m['shapes'][m['target']][slot]
      assert [s[slot] for s in m['shapes']].count(tgt) == 1    # the question names one shape


@pytest.mark.parametrize('difficulty', [0, 2])
def test_ocr_text_is_whole_and_from_the_answer_space(difficulty):
  from kimi_vl_jax.data.generated import ocr, vocab
  ds = g.get_dataset('ocr', 'train', 0, difficulty=difficulty)
  fonts = set()
  for i in range(40):
    r = ds[i]
    img, m = _images(r)[0], r['meta']
    ink = ~_mask(img, m['bg'])
    assert ink.sum() > 20
    # Nothing touches the border: the rotated text is never clipped.
    assert not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any())
    if r['task'] == 'ocr_number':
      assert 0 <= int(r['answer']) <= ocr.MAX_NUMBER[difficulty]
    else:
      assert all(w in vocab.WORDS[:vocab.N_WORDS[difficulty]] for w in r['answer'].split())
    assert abs(m['angle']) <= ocr.MAX_ANGLE[difficulty] and m['size'] >= ocr.MIN_FONT_PX
    fonts.add(m['font'])
  assert len(fonts) >= 4 and render.PIL_DEFAULT_FONT in render.font_names(0)


def test_ocr_layout_options_narrow_angle_and_size():
  """max_angle / min_fill (as a source path passes them: text) upright the text and make it
  fill the image; the defaults keep every tier's spec stream unchanged."""
  from kimi_vl_jax.data.generated import ocr
  from kimi_vl_jax.data.sources import parse_generated_path
  name, kw = parse_generated_path('ocr?tasks=ocr_word&min_side=112&max_side=112'
                                  '&max_angle=0&min_fill=0.95')
  narrow = g.get_dataset(name, 'eval', 0, **kw)
  default = g.get_dataset('ocr', 'eval', 0, tasks='ocr_word', min_side=112, max_side=112)
  explicit = g.get_dataset('ocr', 'eval', 0, tasks='ocr_word', min_side=112, max_side=112,
                           max_angle=ocr.MAX_ANGLE[0], min_fill=ocr.SIZE_FRACTION[0][0])
  fracs = []
  for i in range(30):
    m = narrow[i]['meta']
    assert m['angle'] == 0 and m['size_frac'] == 0.95
    fracs.append(default.spec(i)['size_frac'])
    assert default.spec(i) == explicit.spec(i)
  assert min(fracs) < 0.9 and any(default.spec(i)['angle'] for i in range(30))


def test_ocr_aspect_draws_a_text_line_canvas_the_text_fills():
  """aspect=2: every canvas is w x w/2 with w in [min_side, max_side]; the upright text fills
  most of both sides (within the margins), and its pixels lie inside the drawn layout."""
  from kimi_vl_jax.data.generated import ocr
  from kimi_vl_jax.data.sources import parse_generated_path
  name, kw = parse_generated_path('ocr?tasks=ocr_word&min_side=96&max_side=112'
                                  '&max_angle=0&min_fill=0.95&aspect=2')
  ds = g.get_dataset(name, 'train', 0, **kw)
  widths = set()
  for i in range(40):
    r = ds[i]
    m, img = r['meta'], _images(r)[0]
    assert 96 <= m['w'] <= 112 and m['h'] == round(m['w'] / 2), m
    assert img.shape[:2] == (m['h'], m['w'])
    widths.add(m['w'])
    ink = np.argwhere(np.abs(img.astype(int) - np.array(m['bg'])).sum(-1) > 60)
    (y0, x0), (y1, x1) = ink.min(0), ink.max(0)
    # The limiting side is filled: text spans > 60% of the width or > 45% of the height.
    assert (x1 - x0) > 0.6 * m['w'] or (y1 - y0) > 0.45 * m['h'], (r['answer'], m)
  assert len(widths) > 5


@pytest.mark.parametrize('kw, field', [(dict(max_angle='upright'), 'max_angle'),
                                       (dict(max_angle=120), 'max_angle'),
                                       (dict(min_fill='0'), 'min_fill'),
                                       (dict(min_fill=1.5), 'min_fill'),
                                       (dict(aspect='wide'), 'aspect'),
                                       (dict(aspect=0.5), 'aspect')])
def test_ocr_layout_options_reject_bad_values(kw, field):
  with pytest.raises(ValueError, match=f'ocr: {field}='):
    g.get_dataset('ocr', **kw)


@pytest.mark.parametrize('difficulty', [0, 1, 2])
def test_chart_values_from_bar_heights(difficulty):
  ds = g.get_dataset('charts', 'train', 0, difficulty=difficulty)
  for i in range(20):
    r = ds[i]
    img, m = _images(r)[0], r['meta']
    geom = charts.layout(m)
    read = []
    for (x0, x1), color in zip(geom['bars'], m['colors']):
      col = _mask(img[:, (x0 + x1) // 2], render.ALL_COLORS[color])
      height = col[:geom['bottom']].sum()
      read.append(int(round(height / (geom['bottom'] - geom['top']) * charts.VMAX[difficulty])))
    assert tuple(read) == m['values']
    if r['task'] == 'chart_value':
      assert r['answer'] == str(read[m['target']])
    else:
      assert r['answer'] == charts.LABELS[int(np.argmax(read))]


def test_gui_click_targets_and_scoring():
  ds = g.get_dataset('gui', 'train', 0, difficulty=1)
  for i in range(30):
    r = ds[i]
    img, m = _images(r)[0], r['meta']
    boxes = [tuple(b) for b in m['boxes_px']]
    for a in range(len(boxes)):        # buttons never overlap
      for b in range(a + 1, len(boxes)):
        p, q = boxes[a], boxes[b]
        assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
    x0, y0, x1, y1 = m['boxes_px'][m['target']]
    color = render.ALL_COLORS[m['colors'][m['target']]]
    assert _mask(img[y0 + 2:y1 - 2, x0 + 2:x1 - 2], color).mean() > 0.3
    if r['task'] == 'gui_click':
      x, y = scoring.parse_point(r['answer'])
      assert x0 <= x * m['w'] <= x1 and y0 <= y * m['h'] <= y1
      assert g.is_correct(r, r['answer'])
      assert g.is_correct(r, f'{st.THINK_START}hmm{st.THINK_END} ' + r['answer'])
      assert not g.is_correct(r, 'click(x=0.00, y=0.00)')   # the title bar corner
      assert not g.is_correct(r, 'the button')
    else:
      assert r['answer'] == m['labels'][m['target']]


@pytest.mark.parametrize('difficulty', [0, 1])
def test_video_direction_from_pixels(difficulty):
  ds = g.get_dataset('video', 'train', 0, difficulty=difficulty, tasks='video_direction')
  for i in range(20):
    r = ds[i]
    frames, m = _images(r), r['meta']
    assert len(frames) == video.DIRECTION_FRAMES[difficulty] == len(m['timestamps'])
    assert len({f.shape for f in frames}) == 1
    assert _texts(r)[:-2] == [f'[{t:.1f}s]' for t in m['timestamps']]   # - question, answer
    cents = [np.argwhere(_mask(f, render.ALL_COLORS[m['color']])).mean(0) for f in frames]
    dy, dx = cents[-1] - cents[0]
    ux, uy = video.DIRECTIONS[r['answer']]
    for u, dv in ((ux, dx), (uy, dy)):
      assert (abs(dv) < 1.0) if u == 0 else (np.sign(dv) == u and abs(dv) > 5)


def test_video_needle_has_one_number_frame():
  ds = g.get_dataset('video', 'train', 0, tasks='video_needle', num_frames=9)
  for i in range(10):
    r = ds[i]
    frames, m = _images(r), r['meta']
    assert len(frames) == 9
    dark = [_mask(f, (20, 20, 20)).sum() > 0 for f in frames]
    assert dark.index(True) == m['needle_frame'] and sum(dark) == 1
    assert r['answer'] == str(m['number'])


def test_interleaved_answers_and_captions():
  ds = g.get_dataset('interleaved', 'train', 0, tasks='interleaved_qa', difficulty=1)
  for i in range(20):
    r = ds[i]
    m = r['meta']
    holders = [k + 1 for k, f in enumerate(m['figures'])
               if any(s[:2] == (m['kind'], m['color']) for s in f[3])]
    assert [int(r['answer'])] == holders
    assert len(_images(r)) == len(m['figures'])
  doc = g.get_dataset('interleaved', 'train', 0, tasks='interleaved_doc')[0]
  assert doc['kind'] == 'document'
  kinds = [it['type'] for it in doc['items']]
  assert kinds.count('image') == len(doc['meta']['figures'])
  for k, fig in enumerate(doc['meta']['figures']):      # the caption after figure k describes it
    at = [j for j, t in enumerate(kinds) if t == 'image'][k]
    cap = shapes.caption_text(fig[3]).replace('The image shows', 'It shows')
    assert doc['items'][at + 1]['text'].strip() == cap
    img = np.asarray(doc['items'][at]['image'])
    assert ndimage.label(~_mask(img, fig[2]))[1] == len(fig[3])


def test_needle_position_length_and_distractors():
  for depth, where in ((0.0, 0), (1.0, -1)):
    r = g.get_dataset('needle', 'train', 0, length=300, depth=depth)[0]
    m = r['meta']
    body = r['messages'][0]['content'][0]['text'].split('\n\n')[0]
    sentences = re.split(r'(?<=\.) ', body)
    assert sentences[where] == f"The secret number of {m['key']} is {m['code']}."
    assert len(body.split()) >= 300
  ds = g.get_dataset('needle', 'train', 0, length=200, difficulty=2)
  for i in range(10):
    r = ds[i]
    m, body = r['meta'], r['messages'][0]['content'][0]['text']
    assert body.count(f"secret number of {m['key']} ") == 1 and r['answer'] == str(m['code'])
    assert len(m['distractors']) == 5 and body.count('secret number of') == 7   # + question
    assert m['key'] not in [k for k, _ in m['distractors']]
  long = g.get_dataset('needle', 'train', 0, length=20000)[0]
  assert len(long['messages'][0]['content'][0]['text'].split()) >= 20000


def test_text_documents():
  ds = g.get_dataset('text', 'train', 0, length=500)
  r = ds[0]
  assert r['kind'] == 'document' and len(r['items'][0]['text'].split()) >= 500
  assert ds[1]['items'][0]['text'] != r['items'][0]['text']


# ---------------------------------------------------------------- math and verify
@pytest.mark.parametrize('difficulty', [0, 1, 2])
def test_math_answers_and_traces(difficulty):
  from kimi_vl_jax.data.generated import arithmetic
  ds = g.get_dataset('math', 'train', 0, difficulty=difficulty)
  seen = collections.Counter()
  for i in range(60):
    r = ds[i]
    m, response = r['meta'], r['messages'][-1]['content'][0]['text']
    seen[r['task']] += 1
    assert response.startswith(st.THINK_START) and response.count(st.THINK_END) == 1
    assert response.endswith(f"The answer is {r['answer']}.")
    assert scoring.verify(r['answer'], response)
    if r['task'] == 'arithmetic':       # independent re-derivation
      assert eval(arithmetic.arith_expression(m)) == int(r['answer'])  # noqa: S307 (our own text)
    else:
      assert int(r['answer']) >= 0
    # Every 'a op b = c' stated in the trace is true.
    for a, op, b, c in re.findall(r'(-?\d+) ([-+*]) (\d+) = (-?\d+)[.,]', response):
      assert eval(f'{a} {op} {b}') == int(c), (a, op, b, c)   # noqa: S307
  assert set(seen) == {'arithmetic', 'word_problem'}
  plain = g.get_dataset('math', 'train', 0, think=False)[0]
  assert plain['messages'][-1]['content'][0]['text'] == f"The answer is {plain['answer']}."
  assert plain['prompt'] == plain['messages'][0]['content'][0]['text']


def test_verify_accepts_right_and_rejects_wrong():
  t, e = st.THINK_START, st.THINK_END
  assert scoring.verify('42', f'{t}6 * 7 = 42{e}The answer is 42.')
  assert scoring.verify('1000', 'The answer is 1,000.')
  assert scoring.verify('-5', 'so the answer: -5')
  assert scoring.verify('12', 'I get 12')
  assert not scoring.verify('42', f'{t}6 * 7 = 42{e}The answer is 41.')
  assert not scoring.verify('42', f'{t}the answer is 42')        # never closed its thinking
  assert not scoring.verify('42', f'{t}42{e}I do not know.')     # the 42 is inside the thinking
  assert not scoring.verify('42', '')
  assert scoring.verify('42', 'The answer is 42 because 43 - 1 = 42, not 41')   # stated answer wins
  assert not scoring.verify('42', 'The answer is 42. No: the answer is 43.')   # the last one counts
  with pytest.raises(ValueError, match='not a number'):
    scoring.verify('seven', 'seven')
  assert scoring.exact_match('red', ' Red. ') and not scoring.exact_match('red', 'dark red')


# ---------------------------------------------------------------- sizes, formats, speed
def test_image_sizes_and_aspects_vary():
  ds = g.get_dataset('shapes', 'train', 0)
  sizes = [_images(ds[i])[0].shape[:2] for i in range(200)]
  assert len(set(sizes)) > 150
  aspects = [w / h for h, w in sizes]
  assert min(aspects) < 0.6 and max(aspects) > 1.6
  assert all(56 <= s <= 224 for hw in sizes for s in hw)
  small = g.get_dataset('ocr', 'train', 0, min_side=32, max_side=96, image_format='numpy')
  for i in range(20):
    img = small[i]['messages'][0]['content'][0]['image']
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape[2] == 3
    assert max(img.shape[:2]) <= 96
  for name in ('charts', 'gui'):      # content-driven floors
    assert all(min(_images(g.get_dataset(name)[i])[0].shape[:2]) >= 84 for i in range(20))


def _rate(ds, n):
  ds[0]                                # warm font caches
  t0 = time.process_time()             # CPU time of this process: robust to a busy machine
  for i in range(1, n + 1):
    ds[i]
  return n / (time.process_time() - t0)


def test_generation_speed():
  rates = {name: _rate(g.get_dataset(name, 'train', 0), 60) for name in IMAGE_SETS}
  print('train examples/s (CPU time, one core):', {k: round(v) for k, v in rates.items()})
  for name, rate in rates.items():
    assert rate >= 200, (name, rate)


# ---------------------------------------------------------------- through the real example builder
def test_records_build_examples_whose_targets_are_the_answers(tok):
  from kimi_vl_jax.data import examples, image_processor
  cfg = image_processor.ImageProcessorConfig()
  for name in g.DATASETS:
    kw = {'length': 40} if name in ('needle', 'text') else {}
    r = g.get_dataset(name, 'eval', 0, tasks=g.get_dataset(name).TASKS, **kw)[1]
    ex = examples.build_example(r, tok, cfg)
    assert ex.num_tokens == len(ex.loss_mask) and len(ex.grids) == len(_images(r))
    assert ex.num_patches == sum(-(-a.shape[0] // 28) * 2 * -(-a.shape[1] // 28) * 2
                                 for a in _images(r))
    target = tok.decode([int(t) for t, m in zip(ex.tokens, ex.loss_mask) if m])
    if r['kind'] == 'chat':
      assert target == r['messages'][-1]['content'][0]['text'] + st.IM_END, name
      assert r['answer'] in target
    else:
      assert target.endswith(st.EOS)


def test_arguments_as_written_in_mixture_specs():
  from kimi_vl_jax.data import sources
  ds = g.get_dataset('shapes', tasks='count,color')
  assert ds.tasks == ('count', 'color')
  assert g.get_dataset('needle', length=50, depth='0.0')[0]['meta']['depth'] == 0.0
  with pytest.raises(ValueError, match="depth='deep'"):
    g.get_dataset('needle', depth='deep')
  plain = g.get_dataset('math', think='false')[0]
  assert st.THINK_START not in plain['messages'][-1]['content'][0]['text']
  with pytest.raises(ValueError, match='think'):
    g.get_dataset('math', think='maybe')
  spec = sources.SourceSpec('c', 'generated', 'shapes?tasks=count&difficulty=1')
  src = sources.open_source(spec, shard_index=1, shard_count=2)
  rec = src[0]
  assert rec['kind'] == 'chat' and rec['source'] == 'c'
  assert rec['messages'][-1]['content'][0]['text'].isdigit()


def test_held_out_problems_are_unseen_under_any_wording():
  key = lambda m: (m['terms'], m['ops'])
  train = {key(g.get_dataset('math', 'train', s, tasks='arithmetic')[i]['meta'])
           for s in range(3) for i in range(400)}
  held = [key(g.get_dataset('math', 'eval', 0, tasks='arithmetic')[i]['meta']) for i in range(100)]
  assert not train & set(held)
