"""The generated-data benchmark runs and reports every dataset and split."""
from kimi_vl_jax.bench import generated as bench
from kimi_vl_jax.data import generated


def test_bench_reports_every_dataset(capsys):
  out = bench.main(['--n', '3'])
  assert set(out) == {f'{n}/{s}' for n in generated.DATASETS for s in generated.SPLITS} | {
      'min_image_set_cpu_examples_per_s'}
  assert out['shapes/train']['mean_image_tokens'] > 0 and out['text/train']['mean_image_tokens'] == 0
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{')
