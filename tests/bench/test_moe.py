"""The MoE micro-benchmark runs end to end on a tiny shape and reports what it promises."""
import json

from kimi_vl_jax.bench import moe as bench_moe
from kimi_vl_jax.config.presets import get_preset


def test_flop_count_counts_active_experts_only():
  cfg = bench_moe.moe_config(64)
  cfg8 = bench_moe.moe_config(8)
  # Same top-k and width: only the router term differs between 64 and 8 experts.
  diff = bench_moe.moe_layer_flops(cfg, 10) - bench_moe.moe_layer_flops(cfg8, 10)
  assert diff == 3 * 2 * 10 * cfg.hidden_size * (64 - 8)
  assert cfg.n_routed_experts == 64 and cfg.num_experts_per_tok == get_preset('bench').lm.num_experts_per_tok


def test_main_prints_json_last(capsys):
  result = bench_moe.main(['--preset=tiny', '--batch=1', '--seq=16', '--repeats=1',
                           '--backends=capacity'])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == result
  for key in ('capacity_ms_64', 'capacity_ms_8', 'capacity_ratio_64_vs_8', 'capacity_mfu_64',
              'matmul_peak_gflops'):
    assert result[key] > 0
  assert 'moe_time_ratio_64_vs_8' in result
