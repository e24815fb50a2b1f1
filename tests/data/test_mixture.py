"""Mixture parsing, proportions within tolerance, stage schedules, determinism."""
import numpy as np
import pytest

from kimi_vl_jax.config import base
from kimi_vl_jax.data import mixture as mx
from kimi_vl_jax.data.stream_plan import StreamPlan

SPEC = 'txt=text:/x/*.txt@3;cap=caption:/y.jsonl@1;vqa=messages:/z.jsonl@1#qa;doc=text:/l.txt@1#long'


def test_parse_sources():
  s = mx.parse_sources(SPEC)
  assert [x.name for x in s] == ['txt', 'cap', 'vqa', 'doc']
  assert [x.weight for x in s] == [3, 1, 1, 1]
  assert s[0].tags == ('text',) and s[1].tags == ('mm',) and s[2].tags == ('qa', 'mm')
  assert s[3].tags == ('long', 'text')
  for bad, match in (('a=nope:x', 'unknown format'), ('a:x', 'expected name='),
                     ('a=text:x@w', 'not a number'), ('a=text:x#big', 'unknown tags'),
                     ('a=text:x;a=text:y', 'duplicate'), ('', 'empty')):
    with pytest.raises(ValueError, match=match):
      mx.parse_sources(bad)


def test_generated_views():
  views = mx.generated_views('t=text:/x/*.txt@1;words=generated:ocr?tasks=ocr_word&max_angle=0@0;'
                             'shapes=generated:shapes@2#qa')
  assert views == {'words': ('ocr', {'tasks': 'ocr_word', 'max_angle': 0}),
                   'shapes': ('shapes', {})}
  with pytest.raises(ValueError, match="unknown generated dataset 'nope'"):
    mx.generated_views('a=generated:nope@1')


def _picks(m, n, sizes=(10, 10, 10, 10), seed=0, process=0, eps=8):
  plan = StreamPlan(m.weights, list(sizes), seed, process, eps)
  return [plan.locate(i) for i in range(n)]


def test_realized_proportions_match_weights():
  m = mx.Mixture(tuple(mx.parse_sources(SPEC)))
  picks = np.array([k for k, _ in _picks(m, 6000)])
  share = np.bincount(picks, minlength=4) / len(picks)
  np.testing.assert_allclose(share, [0.5, 1 / 6, 1 / 6, 1 / 6], atol=0.01)
  # Pure in (seed, process, index): a fresh plan, or one asked out of order, agrees.
  plan = StreamPlan(m.weights, [10] * 4, 0, 0, 8)
  assert [plan.locate(i) for i in (5000, 17, 3)] == [_picks(m, 5001)[i] for i in (5000, 17, 3)]
  assert _picks(m, 50, process=1) != _picks(m, 50)
  assert _picks(m, 50, seed=1) != _picks(m, 50)
  # An empty shard is never drawn.
  assert all(k != 1 for k, _ in _picks(m, 300, sizes=(10, 0, 10, 10)))


def test_joint_pretrain_schedule():
  cfg = base.base_config('tiny')
  stage = cfg.stages.joint_pretrain          # text-only 20%, mm share 0.1 -> 0.5
  m = mx.Mixture.for_stage(mx.parse_sources(SPEC), stage, stage_steps=100)
  mm = np.array(['mm' in s.tags for s in m.sources])
  assert m.weights(0)[mm].sum() == 0 and m.weights(19)[mm].sum() == 0
  np.testing.assert_allclose(m.weights(20)[mm].sum(), 0.1)
  np.testing.assert_allclose(m.weights(60)[mm].sum(), 0.3)
  np.testing.assert_allclose(m.weights(100)[mm].sum(), 0.5)
  shares = [m.weights(s)[mm].sum() for s in range(20, 101)]
  assert np.all(np.diff(shares) >= -1e-12), 'multimodal share rises'
  # Realized over a window of steps: draws follow the weights of their step.
  early = [k for k, _ in _picks(m, 80, eps=4)]         # steps 0..19
  assert not any(mm[k] for k in early)


def test_long_share_and_qa_cap():
  cfg = base.base_config('tiny')
  m = mx.Mixture.for_stage(mx.parse_sources(SPEC), cfg.stages.long_context_1)
  long = np.array(['long' in s.tags for s in m.sources])
  np.testing.assert_allclose(m.weights(0)[long].sum(), 0.25)
  picks = np.array([k for k, _ in _picks(m, 4000, sizes=[5] * 4, seed=1)])
  assert abs(np.mean(long[picks]) - 0.25) < 0.01
  capped = mx.Mixture(tuple(mx.parse_sources('t=text:a@1;q=messages:b@9#qa')), qa_share_cap=0.1)
  np.testing.assert_allclose(capped.weights(0), [0.9, 0.1])
  uncapped = mx.Mixture(tuple(mx.parse_sources('t=text:a@9;q=messages:b@1#qa')), qa_share_cap=0.2)
  np.testing.assert_allclose(uncapped.weights(0), [0.9, 0.1])


def test_stage_mixture_override():
  cfg = base.base_config('tiny')
  stage = cfg.stages.sft_1
  stage.mixture = 'cap=1,vqa=3'
  m = mx.Mixture.for_stage(mx.parse_sources(SPEC), stage)
  np.testing.assert_allclose(m.weights(0), [0, 0.25, 0.75, 0])
  stage.mixture = 'nope=1'
  with pytest.raises(ValueError, match="unknown source 'nope'"):
    mx.Mixture.for_stage(mx.parse_sources(SPEC), stage)


def test_mix_report():
  r = mx.mix_report(['a', 'b'], [3, 1], [30, 10], [0.7, 0.3])
  assert r['a'] == {'weight': 0.7, 'examples': 3, 'example_share': 0.75, 'token_share': 0.75}
