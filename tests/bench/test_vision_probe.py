"""The learnability probe trains on a view's answers and scores its held-out split."""
import json

import pytest

from kimi_vl_jax.bench import vision_probe


def test_probe_learns_a_trivial_view_and_reports_json(capsys):
  # Colour of one big shape on 56 px canvases: separable from the mean patch, so even a
  # tiny tower learns it in a few steps; an untrained head would sit near chance (1/6).
  view = 'shapes?tasks=color&min_side=56&max_side=56'
  out = vision_probe.main([f'--views={view}', '--steps=30', '--batch=32', '--eval_n=48',
                           '--eval_every=15', '--preset=tiny', '--patches=16', '--lr=3e-3'])
  result = out[view]
  assert result['steps'] == 30 and [s for s, _ in result['curve']] == [15, 30]
  assert result['accuracy'] >= 0.5, result
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(out))


def test_probe_names_an_image_too_big_for_the_row():
  with pytest.raises(ValueError, match=r'ocr:eval:seed=0:index=0: 64 patches exceed the probe row of 16'):
    vision_probe.probe('ocr?tasks=ocr_word&min_side=112&max_side=112', steps=1, batch=2,
                       lr=1e-3, eval_n=2, eval_every=1, preset='tiny', patches=16)
