"""The run report: per-task accuracy before / after SFT, chance, and the held-out data."""
import json

from kimi_vl_jax.train import report


def test_run_report_puts_accuracy_beside_chance_and_held_out_data(tmp_path):
  summaries = {
      'cooldown': {'steps': 20, 'eval': {'exact_match/ocr': 0.25}},
      'alignment': {'steps': 20},
      'sft_1': {'steps': 150, 'eval': {'exact_match/ocr': 0.5}},
      'long_cot_sft': {'steps': 10, 'eval': {'exact_match/ocr': 0.875}},
  }
  out = report.run_report(str(tmp_path), summaries, {'ocr': 0.05},
                          {'ocr': 'ocr?tasks=ocr_word&max_angle=0'})
  assert (out['pre_sft_stage'], out['final_stage']) == ('cooldown', 'long_cot_sft')
  on_disk = json.loads((tmp_path / 'report.json').read_text())
  assert on_disk['tasks']['ocr'] == {'chance': 0.05, 'before_sft': 0.25, 'after_sft': 0.875,
                                     'held_out': 'ocr?tasks=ocr_word&max_angle=0'}
  md = (tmp_path / 'report.md').read_text()
  assert '| ocr | 0.050 | 0.250 | 0.875 | ocr?tasks=ocr_word&max_angle=0 |' in md
