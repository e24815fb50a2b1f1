"""Each stage's defining behaviour: long-context theta/context, the multimodal share schedule,
SFT masks (user/system tokens are never targets), the LM frozen in alignment, ViT -> Kimi-VL by
parameter path, stage validation."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from kimi_vl_jax.config import ConfigError, base_config, validate
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.train import losses, stages as stages_lib, tasks as tasks_lib


def _config():
  c = base_config('tiny')
  c.train.global_batch = 8
  c.train.seq_len = 128
  c.data.sources = ('text=generated:text@1#text;shapes=generated:shapes@1#mm#qa;'
                    'needle=generated:needle@0#text#long')
  c.data.max_patches_per_row = 64
  c.data.in_token_limit = 64
  c.metrics.tensorboard = False
  for name in c.stages:
    c.stages[name].steps = 4
  return c


def test_long_context_raises_theta_and_context():
  c = _config()
  validate(c)
  joint = stages_lib.resolve(c, 'joint_pretrain')
  lc1 = stages_lib.resolve(c, 'long_context_1')
  lc2 = stages_lib.resolve(c, 'long_context_2')
  assert joint.model.lm.rope_theta == c.model.lm.rope_theta == 800000.0  # tiny keeps the release value
  c.model.lm.rope_theta = 50000.0
  joint = stages_lib.resolve(c, 'joint_pretrain')
  lc1 = stages_lib.resolve(c, 'long_context_1')
  assert joint.model.lm.rope_theta == 50000.0 and lc1.model.lm.rope_theta == 800000.0
  assert (joint.seq_len, lc1.seq_len, lc2.seq_len) == (128, 4 * 128, 16 * 128)
  assert c.model.lm.rope_theta == 50000.0   # resolving never mutates the experiment config
  # The model the stage trains is built with the stage's theta.
  task = tasks_lib.lm_task(lc1.model, c.train)
  assert task.model.config.rope_theta == 800000.0
  assert lc1.block.long_fraction == 0.25 and lc2.block.long_fraction == 0.25


def test_multimodal_share_follows_schedule_in_stage_and_data_mixture():
  from kimi_vl_jax.data import mixture as mixture_lib
  c = _config()
  b = c.stages.joint_pretrain
  b.steps, b.text_only_fraction, b.multimodal_share_start, b.multimodal_share_end = 100, 0.2, 0.1, 0.5
  stage = stages_lib.resolve(c, 'joint_pretrain')
  shares = [stage.multimodal_share(s) for s in range(101)]
  assert shares[:20] == [0.0] * 20
  np.testing.assert_allclose([shares[20], shares[60], shares[100]], [0.1, 0.3, 0.5])
  assert all(a <= b for a, b in zip(shares[20:], shares[21:]))
  mix = mixture_lib.Mixture.for_stage(mixture_lib.parse_sources(c.data.sources), b, stage.steps)
  mm = np.array(['mm' in s.tags for s in mix.sources])
  for step in (0, 19, 20, 60, 100):
    np.testing.assert_allclose(mix.weights(step)[mm].sum(), shares[step], atol=1e-9)


def _roles(tokens, tok):
  """Per token: the role whose turn it is in (by the last role token seen), '' outside turns."""
  ids = {tok.token_id(st.ROLE_TOKENS[r]): r for r in st.ROLES}
  out, role = [], ''
  for t in tokens:
    role = ids.get(int(t), role)
    out.append(role)
  return np.array(out)


@pytest.mark.parametrize('loss_on', ['assistant', 'all'])
def test_sft_loss_ignores_user_and_system_tokens(loss_on):
  from kimi_vl_jax.train import data as data_lib
  c = _config()
  c.data.sources = 'shapes=generated:shapes@1#mm#qa;ocr=generated:ocr@1#mm#qa'
  c.stages.sft_1.loss_on = loss_on
  stage = stages_lib.resolve(c, 'sft_1')
  src = data_lib.make_source(c, stage)
  batch = src.next()
  user_targets = 0
  for row in range(batch['tokens'].shape[0]):
    roles = _roles(batch['tokens'][row], src.tok)
    mask = batch['loss_mask'][row]
    assert mask[roles == 'assistant'].sum() > 0
    user_targets += int(mask[(roles == 'user') | (roles == 'system')].sum())
    _, weights = losses.shift_targets(batch['tokens'][row:row + 1], batch['loss_mask'][row:row + 1],
                                      batch['segment_ids'][row:row + 1])
    targets_roles = np.concatenate([roles[1:], ['']])
    if loss_on == 'assistant':
      assert np.asarray(weights)[0][targets_roles != 'assistant'].sum() == 0
  if loss_on == 'assistant':
    assert user_targets == 0
  else:
    assert user_targets > 0   # pretraining masks are wider: the check above can fail


def test_vit_pretrain_params_load_into_kimi_vl_by_path():
  c = base_config('tiny')
  vit = tasks_lib.vit_pretrain_task(c.model)
  kvl = tasks_lib.kimi_vl_task(c.model, c.train, media_pad_id=3)
  src = nn.unbox(jax.eval_shape(vit.init, jax.random.PRNGKey(0)))['params']
  dst = nn.unbox(jax.eval_shape(kvl.init, jax.random.PRNGKey(0)))['params']
  src = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), src)
  dst = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dst)
  new, copied = stages_lib.transfer_params(src, dst)
  n_vision = len(jax.tree.leaves(dst['vision_tower']))
  assert len(copied) == n_vision and all(p.startswith('vision_tower/') for p in copied)
  assert all((x == 7).all() for x in jax.tree.leaves(new['vision_tower']))
  assert all((x == 0).all() for x in jax.tree.leaves(new['language_model']))
  mask = stages_lib.trainable_mask(dst, c.stages.alignment.trainable)
  assert not any(jax.tree.leaves(mask['language_model']))
  assert all(jax.tree.leaves(mask['vision_tower'])) and all(jax.tree.leaves(mask['multi_modal_projector']))


def test_stage_validation_names_the_key():
  c = _config()
  c.stages.cooldown.steps = 0
  with pytest.raises(ConfigError, match=r'config.stages.cooldown: set a budget'):
    validate(c)
  c = _config()
  c.stages.sft_2.eval = ('vqa', 'mmmu')
  with pytest.raises(ConfigError, match=r'config.stages.sft_2.eval: unknown'):
    validate(c)
  c = _config()
  c.stages.long_context_2.seq_len_scale = 64
  with pytest.raises(ConfigError, match=r'long_context_2.seq_len_scale'):
    validate(c)
  c = _config()
  c.stages.vit_pretrain.max_patches_per_row = 30
  with pytest.raises(ConfigError, match=r'config.stages.vit_pretrain.max_patches_per_row: 30'):
    validate(c)


def test_stage_patch_buffer_overrides_the_data_default():
  """``stages.<name>.max_patches_per_row`` sizes that stage's rows (ViT pretraining: many small
  rows of one image each; SFT: several images per row); 0 inherits ``data.max_patches_per_row``."""
  from kimi_vl_jax.train import data as data_lib
  c = _config()
  c.stages.vit_pretrain.max_patches_per_row = 16
  c.stages.sft_1.max_patches_per_row = 128
  validate(c)
  vit, joint, sft = (stages_lib.resolve(c, n) for n in ('vit_pretrain', 'joint_pretrain', 'sft_1'))
  assert (vit.patches_per_row, joint.patches_per_row, sft.patches_per_row) == (16, 64, 128)
  batch = data_lib.make_source(c, vit).next()
  assert batch['patches'].shape[:2] == (8, 16)
  # A 16-slot row holds a 2x2 merge grid at most: images are drawn at most 56 px on a side.
  assert batch['patch_grid_h'].max() <= 4 and batch['patch_grid_w'].max() <= 4
  src = data_lib.make_source(c, sft)
  try:
    batch = src.next()
  finally:
    getattr(src.dataset, 'close', lambda: None)()
  assert batch['patches'].shape[:2] == (8, 128)
  assert c.data.max_patches_per_row == 64      # the experiment config is not mutated


def test_vit_pretrain_mixture_reads_source_views_by_name():
  """The ViT stage's mixture may name a generated source of ``data.sources`` (a task view such
  as ``words=generated:ocr?tasks=ocr_word``), not only a generated dataset; a name that is
  neither is a config error naming the field."""
  from kimi_vl_jax.data.generated import vocab
  from kimi_vl_jax.train import data as data_lib
  c = _config()
  c.data.sources += ';words=generated:ocr?tasks=ocr_word&max_side=56@0#mm#qa'
  c.stages.vit_pretrain.mixture = 'words=1'
  validate(c)
  src = data_lib.make_source(c, stages_lib.resolve(c, 'vit_pretrain'))
  batch = src.next()
  words = set(vocab.WORDS)
  for cap, mask in zip(batch['caption'], batch['caption_mask']):
    text = src.tok.decode([int(t) for t, m in zip(cap, mask) if m][1:-1])   # no BOS, EOS
    assert text.split()[-1] in words, text       # every caption reads one word: no numbers
  # Each row names its source (index into source_names): the per-source caption loss metric.
  c.stages.vit_pretrain.mixture = 'shapes=1,words=1'
  src = data_lib.make_source(c, stages_lib.resolve(c, 'vit_pretrain'))
  assert src.source_names == ('shapes', 'words')
  batch = src.next()
  assert batch['source_ids'].shape == (batch['caption'].shape[0],)
  assert set(batch['source_ids'].tolist()) == {0, 1}
  from kimi_vl_jax.data.generated.ocr import _QUESTIONS as OCR_QUESTIONS
  for cap, mask, sid in zip(batch['caption'], batch['caption_mask'], batch['source_ids']):
    text = src.tok.decode([int(t) for t, m in zip(cap, mask) if m][1:-1])   # question + answer
    assert text.startswith(OCR_QUESTIONS) == (sid == 1), (text, sid)
  c.stages.vit_pretrain.mixture = 'shapes=1,nope=1'
  with pytest.raises(ValueError, match=r"stages.vit_pretrain.mixture: 'nope'"):
    data_lib.make_source(c, stages_lib.resolve(c, 'vit_pretrain'))
  with pytest.raises(ConfigError, match=r"config.stages.vit_pretrain.mixture: 'nope'"):
    validate(c)          # caught at config time, before any stage runs


def test_vit_pretrain_keeps_a_views_min_side_under_the_stage_side():
  """A view's min_side holds in the ViT stage (capped at the stage's side); max_side is the
  stage's (progressive resolution)."""
  from kimi_vl_jax.train import data as data_lib
  c = _config()
  c.data.sources += ';words=generated:ocr?tasks=ocr_word&min_side=112&max_side=112@0#mm#qa'
  c.stages.vit_pretrain.mixture = 'words=1'
  c.stages.vit_pretrain.image_sides = (112,)
  c.train.image_max_side = 112
  c.stages.vit_pretrain.max_patches_per_row = 64
  validate(c)
  src = data_lib.make_source(c, stages_lib.resolve(c, 'vit_pretrain'))
  batch = src.next()
  real = batch['patch_segment_ids'] > 0
  assert (batch['patch_grid_h'][real] == 8).all() and (batch['patch_grid_w'][real] == 8).all()
  small = src.dataset('words', 56)
  assert (small.min_side, small.max_side) == (56, 56)


def test_vit_pretrain_caption_text_answer_only():
  """``caption_text='answer'``: a QA record's caption is its answer alone (here: the word)."""
  from kimi_vl_jax.data.generated import vocab
  from kimi_vl_jax.train import data as data_lib
  c = _config()
  c.data.sources += ';words=generated:ocr?tasks=ocr_word@0#mm#qa'
  c.stages.vit_pretrain.mixture = 'words=1'
  texts = {}
  for mode in ('question_answer', 'answer'):
    c.stages.vit_pretrain.caption_text = mode
    validate(c)
    src = data_lib.make_source(c, stages_lib.resolve(c, 'vit_pretrain'))
    batch = src.next()
    texts[mode] = [src.tok.decode([int(t) for t, m in zip(cap, mask) if m][1:-1])
                   for cap, mask in zip(batch['caption'], batch['caption_mask'])]
  assert all(t in set(vocab.WORDS) for t in texts['answer']), texts['answer']
  # Same images and words, the question dropped.
  assert [t.split()[-1] for t in texts['question_answer']] == texts['answer']
  c.stages.vit_pretrain.caption_text = 'question'
  with pytest.raises(ConfigError, match=r'vit_pretrain.caption_text'):
    validate(c)


def test_stage_microbatches_override_and_are_checked():
  """``stages.<name>.microbatches`` (0 = train.microbatches) sets a stage's accumulation; a
  split that leaves microbatches the data-parallel devices cannot share is a config error
  naming the field (before: a sharding error deep inside the first step)."""
  c = _config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 2, 2, 1
  c.train.microbatches = 2
  c.stages.sft_1.microbatches = 1
  validate(c)
  assert stages_lib.resolve(c, 'joint_pretrain').microbatches == 2
  assert stages_lib.resolve(c, 'sft_1').microbatches == 1
  c.stages.sft_1.microbatches = 4              # 8 rows / 4 = 2 per microbatch, over 4 devices
  with pytest.raises(ConfigError, match=r'stages\.sft_1\.microbatches: .* data-parallel size 4'):
    validate(c)
  c.stages.sft_1.microbatches = 3
  with pytest.raises(ConfigError, match=r'stages\.sft_1\.microbatches: 3 microbatches do not divide'):
    validate(c)
  c.stages.sft_1.microbatches = 0
  c.stages.sft_1.global_batch = 4              # inherits 2 microbatches: 2 rows over 4 devices
  with pytest.raises(ConfigError, match=r'stages\.sft_1\.global_batch: .* data-parallel size 4'):
    validate(c)


def test_stage_remat_policy_overrides_both_towers():
  c = _config()
  c.model.lm.remat_policy = c.model.vision.remat_policy = 'save_dots'
  c.stages.sft_2.remat_policy = 'full'
  validate(c)
  sft2, joint = stages_lib.resolve(c, 'sft_2'), stages_lib.resolve(c, 'joint_pretrain')
  assert (sft2.model.lm.remat_policy, sft2.model.vision.remat_policy) == ('full', 'full')
  assert (joint.model.lm.remat_policy, joint.model.vision.remat_policy) == ('save_dots',) * 2
  assert c.model.lm.remat_policy == 'save_dots'      # the experiment config is not mutated
  c.stages.sft_2.remat_policy = 'everything'
  with pytest.raises(ConfigError, match=r'stages\.sft_2\.remat_policy: must be one of'):
    validate(c)


def test_stage_batch_is_checked_against_the_device_count():
  # A mesh with a -1 axis takes its size from the devices: the stage check needs the count.
  c = _config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = -1, 1, 1, 1
  c.stages.long_context_2.global_batch = 2
  validate(c)                                  # device count unknown: nothing to check
  validate(c, num_devices=2)
  with pytest.raises(ConfigError, match=r'stages\.long_context_2\.global_batch: .* size 4'):
    validate(c, num_devices=4)
