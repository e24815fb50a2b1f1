"""The LM benchmark's FLOP accounting agrees with the parameter tree (no timing here)."""
from kimi_vl_jax.bench import lm as bench_lm
from kimi_vl_jax.config.presets import get_preset
from kimi_vl_jax.describe import count_params
from kimi_vl_jax.models.abstract import abstract_components


def test_active_matmul_params_match_describe():
  for preset in ('bench', 'tiny'):
    model_cfg = get_preset(preset)
    variables, spec = abstract_components(model_cfg)['lm']
    counts = count_params(variables, spec)
    cfg = model_cfg.lm
    embedding = cfg.vocab_size * cfg.hidden_size            # a lookup, not a matmul
    norms = sum(n for name, (n, _) in counts['modules'].items() if name == 'norm')
    layer_norms = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.kv_lora_rank)
    expected = counts['active'] - embedding - norms - layer_norms
    assert abs(bench_lm.active_matmul_params(cfg) - expected) < 1, (preset, expected)


def test_train_flops_counts_attention():
  cfg = get_preset('bench').lm
  base = 6 * bench_lm.active_matmul_params(cfg) * 4 * 512
  attn = bench_lm.train_flops(cfg, 4, 512) - base
  # 3 (fwd + bwd) * 2 * B * H * S^2 * (d_qk + d_v) / 2 (causal) per layer.
  assert attn == 3 * 2 * 4 * 8 * 512 ** 2 * (48 + 32) / 2 * 4


def test_alternating_times_interleave_the_callables():
  calls = []
  fns = [lambda: calls.append('a'), lambda: calls.append('b')]
  times = bench_lm._alternating_times(fns, rounds=3, warmup=1)
  assert calls == ['a', 'b'] * 4                       # 1 warm-up round, then 3 timed rounds
  assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)
  assert len(bench_lm._alternating_medians(fns, rounds=2, warmup=0)) == 2
