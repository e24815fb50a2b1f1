"""Every source format from files the test writes, bad input by reason, ArrayRecord round trip."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax.data import examples as ex
from kimi_vl_jax.data import image_processor as ip
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.sources import DataError, SourceSpec, open_source
from kimi_vl_jax.data.sources.base import BadRecord

CFG = ip.ImageProcessorConfig(in_token_limit=256, max_patches_per_side=16)
IMG = lambda n: st.MEDIA_START + 'image' + st.MEDIA_CONTENT + st.MEDIA_PAD * n + st.MEDIA_END


def _png(path, w, h, color=(200, 30, 30)):
  Image.new('RGB', (w, h), color).save(path)
  return os.path.basename(path)


def _jsonl(path, rows):
  with open(path, 'wb') as f:
    for r in rows:
      f.write(r if isinstance(r, bytes) else (json.dumps(r) + '\n').encode())
  return str(path)


@pytest.fixture
def d(tmp_path):
  _png(tmp_path / 'a.png', 56, 28)     # grid (2, 4) -> 2 LM tokens
  _png(tmp_path / 'b.png', 30, 60)     # grid (6, 4) -> 6 LM tokens
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
  _png(tmp_path / 'wide.png', 300, 20)  # 22 patches wide >= 16 per side
  return tmp_path


def _one(d, fmt, row, name='s'):
  src = open_source(SourceSpec(name, fmt, _jsonl(d / f'{fmt}.jsonl', [row])), strict=True)
  assert len(src) == 1
  rec = src[0]
  assert rec['source'] == name and rec['origin'].endswith(f'{fmt}.jsonl:1')
  return rec


def _text(tok, rec):
  e = ex.build_example(rec, tok, CFG)
  assert e.tokens.shape == e.loss_mask.shape
  assert sum(p.shape[0] for p in e.patches) == e.num_patches
  return tok.decode(e.tokens), e


def test_messages(d, tok):
  rec = _one(d, 'messages', {'messages': [
      {'role': 'user', 'content': '<image>What color? <image>'},
      {'role': 'assistant', 'content': [{'type': 'text', 'text': 'Red.'}]}],
      'images': ['a.png', 'b.png']})
  text, e = _text(tok, rec)
  assert text == (f'<|im_user|>user<|im_middle|>{IMG(2)}What color? {IMG(6)}<|im_end|>'
                  '<|im_assistant|>assistant<|im_middle|>Red.<|im_end|>')
  assert e.grids == [(2, 4), (6, 4)]
  assert tok.decode(e.tokens[e.loss_mask == 1]) == 'Red.<|im_end|>'


def test_llava(d, tok):
  rec = _one(d, 'llava', {'image': 'a.png', 'conversations': [
      {'from': 'system', 'value': 'Be brief.'},
      {'from': 'human', 'value': '<image>\nWhat is it?'}, {'from': 'gpt', 'value': 'A box.'}]})
  text, _ = _text(tok, rec)
  assert text == ('<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>'
                  f'{IMG(2)}What is it?<|im_end|><|im_assistant|>assistant<|im_middle|>A box.<|im_end|>')


def test_caption_and_interleaved_and_text(d, tok):
  text, e = _text(tok, _one(d, 'caption', {'image': 'b.png', 'caption': 'A tall red box.'}))
  assert text == f'{IMG(6)}A tall red box.[EOS]'
  assert tok.decode(e.tokens[e.loss_mask == 1]) == 'A tall red box.[EOS]'
  text, _ = _text(tok, _one(d, 'interleaved', {'content': [
      {'type': 'text', 'text': 'First '}, {'type': 'image', 'image': 'a.png'},
      {'type': 'text', 'text': ' then '}, {'type': 'image', 'image': 'b.png'}]}))
  assert text == f'First {IMG(2)} then {IMG(6)}[EOS]'
  text, _ = _text(tok, _one(d, 'auto', {'texts': ['Hi', None], 'images': [None, 'a.png']}))
  assert text == f'Hi{IMG(2)}[EOS]'
  text, _ = _text(tok, _one(d, 'text', {'text': 'Plain words.'}))
  assert text == 'Plain words.[EOS]'
  (d / 'doc.txt').write_text('para one\nline two\n\n\npara two\n')
  src = open_source(SourceSpec('t', 'text', str(d / 'doc.txt')))
  assert [src[i]['items'][0]['text'] for i in range(len(src))] == ['para one\nline two', 'para two']
  assert src[1]['origin'].endswith('doc.txt:5')


def test_video(d, tok):
  for k in range(3):
    _png(d / f'f{k}.png', 28, 28, (10 * k, 0, 0))
  frames = ['f0.png', 'f1.png', 'f2.png']
  text, e = _text(tok, _one(d, 'video', {'frames': frames, 'timestamps': [0, 0.5, 1.25],
                                          'messages': [
      {'role': 'user', 'content': '<video>Which way?'}, {'role': 'assistant', 'content': 'Left.'}]}))
  assert text == ('<|im_user|>user<|im_middle|>' + f'[0.00s]{IMG(1)}[0.50s]{IMG(1)}[1.25s]{IMG(1)}'
                  'Which way?<|im_end|><|im_assistant|>assistant<|im_middle|>Left.<|im_end|>')
  assert len(e.grids) == 3
  text, _ = _text(tok, _one(d, 'auto', {'video': {'frames': frames[:2], 'fps': 2}, 'caption': 'Moves.'}))
  assert text == f'[0.00s]{IMG(1)}[0.50s]{IMG(1)}Moves.[EOS]'


@pytest.mark.parametrize('action,answer', [
    ({'type': 'click', 'x': 0.4123, 'y': 0.77}, 'click(x=0.412, y=0.770)'),
    ({'type': 'box', 'box': [0.1, 0.2, 0.3, 0.4]}, 'box(x0=0.100, y0=0.200, x1=0.300, y1=0.400)'),
    ({'type': 'type', 'text': 'hi "x"'}, 'type(text="hi \\"x\\"")'),
])
def test_grounding(d, tok, action, answer):
  text, _ = _text(tok, _one(d, 'grounding', {'screenshot': 'b.png', 'instruction': 'Press OK',
                                               'action': action}))
  assert text == (f'<|im_user|>user<|im_middle|>{IMG(6)}Press OK<|im_end|>'
                  f'<|im_assistant|>assistant<|im_middle|>{answer}<|im_end|>')


BAD_LINES = [
    (b'{"messages": [\n', 'invalid_json'),
    (b'{"text": "caf\xe9"}\n', 'non_utf8'),
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, 'unknown_role'),
    ({'messages': []}, 'empty_conversation'),
    ({'messages': [{'role': 'user', 'content': ''}]}, 'empty_conversation'),
    ({'messages': [{'role': 'user', 'content': '<image>'}], 'images': ['nope.png']}, 'missing_image'),
    ({'messages': [{'role': 'user', 'content': '<image>'}], 'images': ['a.png', 'b.png']},
     'image_count_mismatch'),
    ({'messages': [{'role': 'user', 'content': '<image><image>'}], 'images': ['a.png']},
     'image_count_mismatch'),
    ({'image': 'a.png', 'instruction': 'x', 'action': {'type': 'click', 'x': 1.5, 'y': 0}},
     'invalid_action'),
    ({'frames': ['a.png', 'b.png'], 'timestamps': [1, 0], 'caption': 'x'}, 'invalid_timestamps'),
    ({'what': 1}, 'invalid_record'),
]


def test_bad_lines_counted_by_reason(d, caplog):
  good = {'text': 'fine'}
  rows = [good] + [r for r, _ in BAD_LINES] + [good]
  path = _jsonl(d / 'mixed.jsonl', rows)
  src = open_source(SourceSpec('m', 'auto', path))
  assert len(src) == 2
  expected = {}
  for _, reason in BAD_LINES:
    expected[reason] = expected.get(reason, 0) + 1
  assert src.skips.as_dict() == dict(sorted(expected.items()))
  assert src.skips.total == len(BAD_LINES)
  assert src.skips.examples[0].startswith(f'{path}:2: invalid_json')
  assert src.skips.examples[1].startswith(f'{path}:3: non_utf8')


@pytest.mark.parametrize('k', range(len(BAD_LINES)))
def test_strict_mode_names_file_and_line(d, k):
  path = _jsonl(d / 'strict.jsonl', [{'text': 'ok'}, BAD_LINES[k][0]])
  with pytest.raises(DataError, match=f'{path}:2: {BAD_LINES[k][1]}'):
    open_source(SourceSpec('m', 'auto', path), strict=True)


@pytest.mark.parametrize('image,reason', [('bad.png', 'corrupt_image'),
                                          ('wide.png', 'image_beyond_limits')])
def test_bad_pixels_found_when_decoded(d, tok, image, reason):
  rec = _one(d, 'caption', {'image': image, 'caption': 'x'})
  with pytest.raises(BadRecord) as e:
    ex.build_example(rec, tok, CFG)
  assert e.value.reason == reason and e.value.origin.endswith('caption.jsonl:1')
  assert image in str(e.value)


def test_too_many_patches_or_images(d, tok):
  rec = _one(d, 'caption', {'image': 'b.png', 'caption': 'x'})
  for limits in (ex.ExampleLimits(max_patches=20), ex.ExampleLimits(max_images=0)):
    with pytest.raises(BadRecord, match='image_beyond_limits'):
      ex.build_example(rec, tok, CFG, limits=limits)


def test_missing_image_after_indexing(d, tok):
  rec = _one(d, 'caption', {'image': 'a.png', 'caption': 'x'})
  os.remove(d / 'a.png')
  with pytest.raises(BadRecord, match='missing_image'):
    ex.build_example(rec, tok, CFG)


def test_shards_are_disjoint_and_complete(d):
  path = _jsonl(d / 'many.jsonl', [{'text': f'doc {i}'} for i in range(7)])
  shards = [open_source(SourceSpec('m', 'text', path), shard_index=p, shard_count=2)
            for p in range(2)]
  texts = [[s[i]['items'][0]['text'] for i in range(len(s))] for s in shards]
  assert texts == [['doc 0', 'doc 2', 'doc 4', 'doc 6'], ['doc 1', 'doc 3', 'doc 5']]


def test_arrayrecord_roundtrip(d, tok):
  rows = [{'image': 'a.png', 'caption': 'A.'},
          {'messages': [{'role': 'user', 'content': '<image>Q'},
                        {'role': 'assistant', 'content': 'A'}], 'images': ['b.png']},
          {'image': 'bad.png', 'caption': 'corrupt'},
          {'text': 'only text'}, b'not json\n']
  path = _jsonl(d / 'all.jsonl', rows)
  out = d / 'out' / 'all.array_record'
  res = subprocess.run([sys.executable, '-m', 'kimi_vl_jax.data.to_arrayrecord', f'--input={path}',
                        f'--output={out}'], check=True, capture_output=True, text=True)
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary['written'] == 3
  assert summary['skipped'] == {'corrupt_image': 1, 'invalid_json': 1}
  src = open_source(SourceSpec('ar', 'arrayrecord', str(out)))
  direct = open_source(SourceSpec('j', 'auto', path))
  assert len(src) == 3
  for i, j in zip(range(3), (0, 1, 3)):
    a, b = ex.build_example(src[i], tok, CFG), ex.build_example(direct[j], tok, CFG)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert a.grids == b.grids
    for pa, pb in zip(a.patches, b.patches):
      np.testing.assert_array_equal(pa, pb)
  with pytest.raises(DataError, match=f'{path}:5: invalid_json'):
    from kimi_vl_jax.data import to_arrayrecord
    to_arrayrecord.convert(path, str(d / 'strict.array_record'), strict=True)


def test_converter_strict_stops_at_corrupt_image(d):
  from kimi_vl_jax.data import to_arrayrecord
  path = _jsonl(d / 'c.jsonl', [{'image': 'a.png', 'caption': 'A.'}, {'image': 'bad.png', 'caption': 'x'}])
  with pytest.raises(DataError, match=f'{path}:2: corrupt_image'):
    to_arrayrecord.convert(path, str(d / 'strict.array_record'), strict=True)


def test_txt_non_utf8_paragraph(d):
  (d / 'latin.txt').write_bytes(b'fine text\n\ncaf\xe9 au lait\n\nmore fine\n')
  src = open_source(SourceSpec('t', 'text', str(d / 'latin.txt')))
  assert len(src) == 2 and src.skips.as_dict() == {'non_utf8': 1}
  assert src.skips.examples[0].startswith(f'{d / "latin.txt"}:3: non_utf8')
