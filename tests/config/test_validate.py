"""validate(): each kind of config mistake is one ConfigError line naming the key; the CLI
turns flag/file/config mistakes into one ``error:`` line and exit status 2."""
import os
import subprocess
import sys

import ml_collections
import pytest

from kimi_vl_jax.config import ConfigError, base_config, resolve_mesh_shape, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set(**dotted):
  """A mutator that assigns ``{'model.lm.x': v}``-style dotted keys (unlocked config)."""
  def mutate(c):
    for key, value in dotted.items():
      *parents, leaf = key.split('.')
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  return mutate


def _add_nested_key(c):
  c.model.lm.num_heads = 4  # typo of num_attention_heads


def _replace_block(c):
  d = c.to_dict()  # ConfigDict is type-safe; rebuild it to put a scalar where a block belongs
  d['train'] = 3
  return ml_collections.ConfigDict(d)


# (id, mutator, num_devices, the key the message must start with, a fragment of the reason)
MISTAKES = [
    ('unknown_top_key', _set(trian=1), None, 'trian', 'unknown key'),
    ('unknown_nested_key', _add_nested_key, None, 'model.lm.num_heads',
     "did you mean 'num_attention_heads'"),
    ('block_replaced_by_scalar', _replace_block, None, 'train', 'must be a block'),
    ('vision_heads_not_dividing', _set(**{'model.vision.num_attention_heads': 5}), None,
     'model.vision.num_attention_heads', 'do not divide hidden_size'),
    ('vision_head_dim_not_rotary', _set(**{'model.vision.hidden_size': 36,
                                           'model.vision.num_attention_heads': 6,
                                           'model.projector.input_size': 36,
                                           'model.projector.merged_size': 144}), None,
     'model.vision.num_attention_heads', 'multiple of 4'),
    ('vision_head_groups_not_dividing', _set(**{'model.vision.attention_head_groups': 3}), None,
     'model.vision.attention_head_groups', 'groups do not divide the'),
    ('tensor_axis_not_dividing_lm_heads', _set(**{'mesh.data': 1, 'mesh.tensor': 3,
                                                  'train.global_batch': 3}), 3,
     'mesh.tensor', 'model.lm.num_attention_heads'),
    ('mesh_product_not_devices', _set(**{'mesh.data': 2, 'mesh.fsdp': 2}), 8, 'mesh',
     'multiply to 4, but there are 8 devices'),
    ('fixed_mesh_not_dividing_devices', _set(**{'mesh.fsdp': 3}), 8, 'mesh.data',
     'does not divide the 8 devices'),
    ('two_free_axes', _set(**{'mesh.fsdp': -1}), 8, 'mesh.fsdp', 'only one axis may be -1'),
    ('bad_axis_size', _set(**{'mesh.expert': 0}), 8, 'mesh.expert', 'positive integer or -1'),
    ('batch_not_divisible_by_dp', _set(**{'train.global_batch': 12}), 8, 'train.global_batch',
     'data-parallel size 8'),
    ('batch_not_divisible_by_fixed_mesh', _set(**{'mesh.data': 1, 'mesh.fsdp': 16,
                                                  'train.global_batch': 24}), None,
     'train.global_batch', 'data-parallel size 16'),
    ('odd_rope_dims', _set(**{'model.lm.qk_rope_head_dim': 7}), None, 'model.lm.qk_rope_head_dim',
     'must be even'),
    ('topk_exceeds_experts', _set(**{'model.lm.num_experts_per_tok': 17}), None,
     'model.lm.num_experts_per_tok', 'exceeds n_routed_experts 16'),
    ('topk_exceeds_selected_groups', _set(**{'model.lm.n_group': 4, 'model.lm.topk_group': 1,
                                             'model.lm.num_experts_per_tok': 5}), None,
     'model.lm.num_experts_per_tok', 'selected groups'),
    ('groups_not_dividing_experts', _set(**{'model.lm.n_group': 3}), None, 'model.lm.n_group',
     'do not divide 16 experts'),
    ('bad_enum', _set(**{'optim.name': 'sgd'}), None, 'optim.name', 'must be one of muon, adamw'),
    ('bad_dtype', _set(**{'model.lm.dtype': 'float16'}), None, 'model.lm.dtype', 'must be one of'),
    ('bad_remat', _set(**{'model.vision.remat_policy': 'all'}), None, 'model.vision.remat_policy',
     'must be one of'),
    ('microbatches_not_dividing_batch', _set(**{'train.microbatches': 3}), None,
     'train.microbatches', 'do not divide global_batch 8'),
    ('micro_batch_not_divisible_by_dp', _set(**{'train.microbatches': 2}), 8,
     'train.global_batch', '/2 microbatches'),
    ('expert_axis_not_dividing_experts', _set(**{'mesh.data': 1, 'mesh.expert': 32,
                                                 'train.global_batch': 32}), None,
     'mesh.expert', 'does not divide 16 routed experts'),
    ('non_positive_int', _set(**{'model.lm.num_hidden_layers': 0}), None,
     'model.lm.num_hidden_layers', 'integer >= 1'),
    ('negative_float', _set(**{'model.lm.rms_norm_eps': -1e-5}), None, 'model.lm.rms_norm_eps',
     'must be a number > 0'),
    ('beta_out_of_range', _set(**{'optim.b2': 1.0}), None, 'optim.b2', 'in [0, 1)'),
    ('projector_out_of_sync', _set(**{'model.lm.hidden_size': 128}), None,
     'model.projector.output_size', '--config.model.projector.output_size=128'),
    ('dense_layers_exceed_depth', _set(**{'model.lm.first_k_dense_replace': 5}), None,
     'model.lm.first_k_dense_replace', 'exceeds num_hidden_layers 4'),
    ('seq_len_exceeds_positions', _set(**{'train.seq_len': 1 << 20}), None, 'train.seq_len',
     'max_position_embeddings'),
    ('unsupported_merge_kernel', _set(**{'model.vision.merge_kernel_size': (3, 3)}), None,
     'model.vision.merge_kernel_size', 'only (2, 2)'),
    ('metrics_log_every', _set(**{'metrics.log_every': 0}), None, 'metrics.log_every', '>= 1'),
    ('scan_unroll_zero', _set(**{'model.vision.scan_unroll': 0}), None, 'model.vision.scan_unroll',
     'integer >= 1'),
    ('token_chunk_without_vocab_chunk', _set(**{'train.loss_token_chunk': 4096}), None,
     'train.loss_token_chunk', 'needs train.loss_vocab_chunk > 0'),
    ('negative_vocab_chunk', _set(**{'train.loss_vocab_chunk': -1}), None,
     'train.loss_vocab_chunk', 'integer >= 0'),
]


@pytest.mark.parametrize('mutate,num_devices,key,reason', [m[1:] for m in MISTAKES],
                         ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_naming_the_key(mutate, num_devices, key, reason):
  c = base_config('small')
  c = mutate(c) or c
  with pytest.raises(ConfigError) as info:
    validate(c, num_devices=num_devices)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(f'config.{key}: '), message
  assert reason in message, message


def _with_budgets(c):
  """base_config leaves stage budgets to the experiment; give each stage one step."""
  for name in c.get('stages', {}):
    c.stages[name].steps = 1
  return c


def test_valid_configs_pass_for_every_preset_and_mesh():
  from kimi_vl_jax.config import PRESET_NAMES
  for preset in PRESET_NAMES:
    c = _with_budgets(base_config(preset))
    assert validate(c) is c
    validate(c, num_devices=8)
  c = _with_budgets(base_config('tiny'))
  c.mesh.update(dict(data=2, fsdp=2, expert=-1, tensor=1))
  validate(c, num_devices=8)
  c.mesh.update(dict(data=-1, fsdp=2, expert=1, tensor=2))
  validate(c, num_devices=8)


def test_the_mistakes_cover_the_issue_kinds():
  """Guards the list itself: at least 8 kinds, and the ones issue 2 names explicitly."""
  kinds = {m[0] for m in MISTAKES}
  assert len(kinds) >= 8
  assert {'unknown_nested_key', 'vision_heads_not_dividing', 'mesh_product_not_devices',
          'two_free_axes', 'batch_not_divisible_by_dp', 'odd_rope_dims', 'topk_exceeds_experts',
          'bad_enum', 'microbatches_not_dividing_batch', 'expert_axis_not_dividing_experts'} <= kinds


def test_missing_key_is_an_error_not_a_crash():
  c = base_config('small')
  del c.optim['b1']
  with pytest.raises(ConfigError, match=r'^config\.optim\.b1: missing'):
    validate(c)


def test_custom_schema_rejects_keys_outside_it():
  schema = base_config('tiny')
  c = base_config('tiny')
  c.extra = ml_collections.ConfigDict({'x': 1})
  with pytest.raises(ConfigError, match=r'^config\.extra: unknown key'):
    validate(c, schema=schema)


def test_resolve_mesh_shape_fills_the_free_axis():
  mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=2, expert=1, tensor=2))
  assert resolve_mesh_shape(mesh, 8) == dict(data=2, fsdp=2, expert=1, tensor=2)
  mesh.data = 2
  assert resolve_mesh_shape(mesh, 8) == dict(data=2, fsdp=2, expert=1, tensor=2)


# --- the CLI: one `error:` line, exit status 2 -------------------------------------------------

def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'kimi_vl_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args,expected', [
    (['--config=experiments/demo.py', '--config.train.stepz=3'],
     "error: --config.train.stepz=3: unknown key 'stepz'"),
    (['--config=experiments/demo.py', '--config.model.lm.num_experts_per_tok=99'],
     'error: config.model.lm.num_experts_per_tok: top-k 99 exceeds'),
    (['--config=experiments/demo.py', '--config.train.steps=abc'],
     'error: --config.train.steps=abc: invalid literal'),
    (['--config=experiments/no_such_experiment.py'],
     'error: --config=experiments/no_such_experiment.py: cannot load the experiment file'),
    (['--config=experiments/kimi_vl_a3b.py:v9z-1'],
     "error: --config=experiments/kimi_vl_a3b.py:v9z-1: ValueError: unknown pod mesh 'v9z-1'"),
], ids=['bad_override_key', 'invalid_value', 'bad_override_type', 'missing_file', 'bad_arg'])
def test_cli_mistake_prints_one_error_line_and_exits_2(args, expected):
  result = _main(*args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(expected), lines[0]
  assert 'Traceback' not in result.stderr + result.stdout


def test_cli_broken_experiment_file_names_file_and_line(tmp_path):
  bad = tmp_path / 'broken.py'
  bad.write_text('def get_config(arg=None)\n  return None\n')
  result = _main(f'--config={bad}')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: --config={bad}: SyntaxError'), lines
  assert f'{bad}, line 1' in lines[0]
