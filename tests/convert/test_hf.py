"""End to end: tiny random Kimi-VL in the HF layout -> convert (CLI) -> chat with two images ->
convert back -> byte-equal tensors. Plus streaming/refusal details of convert/hf.py."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from ml_collections import FrozenConfigDict
from PIL import Image
from safetensors import safe_open

from kimi_vl_jax.config import presets
from kimi_vl_jax.convert import __main__ as cli
from kimi_vl_jax.convert import hf
from kimi_vl_jax.data import chat_template, image_processor, patch_packing
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.tokenizer import Tokenizer
from kimi_vl_jax.models import kimi_vl

SPECIAL_IDS = {piece: i for i, piece in enumerate(st.ALL_SPECIAL)}
MEDIA_PAD_ID = SPECIAL_IDS[st.MEDIA_PAD]


class _CharTokenizer(Tokenizer):
  """Specials at ids 0..14, characters above: enough to render the real chat template."""

  @property
  def vocab_size(self):
    return 512

  def encode(self, text):
    return [len(SPECIAL_IDS) + ord(c) % 400 for c in text]

  def decode(self, ids):
    return ''.join(chr(i - len(SPECIAL_IDS)) for i in ids)

  def token_id(self, piece):
    return SPECIAL_IDS[piece]


def _tensors(directory):
  t = hf.SafetensorsDir(directory)
  return {k: t[k] for k in t}


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny random Kimi-VL written in the HF layout (bf16 weights, fp32 router bias, 3+ shards)."""
  model_cfg = presets.get_preset('tiny')
  model = kimi_vl.KimiVL(FrozenConfigDict(model_cfg), media_pad_id=MEDIA_PAD_ID)
  # Shapes from eval_shape (no compile); random values everywhere, router bias included, so
  # every tensor carries information through the round trip.
  import flax.linen as nn
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                   **kimi_vl.dummy_inputs(model_cfg, MEDIA_PAD_ID)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.2).astype(x.dtype), shapes)
  directory = str(tmp_path_factory.mktemp('hf_src'))
  shards = hf.save_hf(directory, model_cfg, variables, media_pad_id=MEDIA_PAD_ID,
                      max_shard_bytes=300_000)
  assert len(shards) >= 3
  return directory


def test_hf_layout_names_and_config(hf_dir):
  tensors = _tensors(hf_dir)
  cfg = json.load(open(os.path.join(hf_dir, 'config.json')))
  assert cfg['model_type'] == 'kimi_vl' and cfg['media_placeholder_token_id'] == MEDIA_PAD_ID
  assert cfg['vision_config']['hidden_size'] == 32 and cfg['text_config']['hidden_size'] == 64
  index = json.load(open(os.path.join(hf_dir, hf.INDEX_NAME)))
  assert set(index['weight_map']) == set(tensors)
  # SPEC §3.3 names and torch (out, in) shapes.
  want = {
      'vision_tower.patch_embed.proj.weight': (32, 3, 14, 14),
      'vision_tower.patch_embed.pos_emb.weight': (8, 8, 32),
      'vision_tower.encoder.blocks.1.wqkv.weight': (96, 32),
      'vision_tower.encoder.blocks.0.mlp.fc0.weight': (64, 32),
      'vision_tower.encoder.final_layernorm.bias': (32,),
      'multi_modal_projector.linear_1.weight': (128, 128),
      'multi_modal_projector.linear_2.weight': (64, 128),
      'language_model.model.embed_tokens.weight': (512, 64),
      'language_model.model.layers.0.mlp.gate_proj.weight': (128, 64),
      'language_model.model.layers.1.mlp.experts.7.down_proj.weight': (64, 32),
      'language_model.model.layers.2.mlp.gate.weight': (8, 64),
      'language_model.lm_head.weight': (512, 64),
  }
  for name, shape in want.items():
    assert tensors[name].shape == shape, name
    assert tensors[name].dtype == ml_dtypes.bfloat16, name
  assert tensors['language_model.model.layers.1.mlp.gate.e_score_correction_bias'].dtype == np.float32


def _chat_batch(seq_len=160, max_patches=96):
  rng = np.random.default_rng(1)
  pil = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for w, h in ((60, 40), (30, 90))]
  images = image_processor.process_images(pil)
  pack = patch_packing.pack_images(images, max_patches)
  messages = [
      {'role': 'system', 'content': 'You are a helpful assistant'},
      {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'and'},
                                   {'type': 'image'}, {'type': 'text', 'text': 'Compare them.'}]},
      {'role': 'assistant', 'content': 'The first is wider.'},
  ]
  ids, _ = chat_template.encode_chat(messages, _CharTokenizer(), pack.num_tokens)
  assert (ids == MEDIA_PAD_ID).sum() == sum(pack.num_tokens) > 0
  tokens = np.zeros((1, seq_len), np.int32)
  tokens[0, :len(ids)] = ids
  seg = (np.arange(seq_len) < len(ids)).astype(np.int32)[None]
  pos = np.where(seg > 0, np.arange(seq_len), 0).astype(np.int32)
  patches = {'patch_' + k if k != 'patches' else k: v[None] for k, v in pack.arrays().items()}
  return dict(tokens_bs=tokens, segment_ids_bs=seg, positions_bs=pos, **patches)


def test_end_to_end_convert_run_convert_back(hf_dir, tmp_path):
  orbax_dir, back_dir = str(tmp_path / 'orbax'), str(tmp_path / 'hf_back')
  assert cli.main(['--to=jax', f'--src={hf_dir}', f'--dst={orbax_dir}']) == 0
  model_cfg, variables, media_pad = cli.load_orbax(orbax_dir)
  assert media_pad == MEDIA_PAD_ID
  # The restored weights are fp32 copies of the bf16 checkpoint.
  emb = variables['params']['language_model']['embed_tokens']['embedding']
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(emb.astype(ml_dtypes.bfloat16),
                                _tensors(hf_dir)['language_model.model.embed_tokens.weight'])

  model = kimi_vl.KimiVL(FrozenConfigDict(model_cfg), media_pad_id=media_pad)
  batch = _chat_batch()
  kimi_vl.check_image_placeholders(batch['tokens_bs'], batch['patch_segment_ids'], media_pad)
  apply = jax.jit(lambda v, b: model.apply(v, **b))
  logits, aux = apply(variables, batch)
  assert logits.shape == (1, 160, 512) and np.isfinite(np.asarray(logits)).all()
  assert int(aux['image_tokens']) == int((batch['tokens_bs'] == MEDIA_PAD_ID).sum())
  assert aux['load_le'].shape == (2, 8)
  # The images matter: other pixels change the logits at and after the image tokens.
  other = dict(batch, patches=batch['patches'][:, ::-1] * 0 + 0.5)
  other_logits, _ = apply(variables, other)
  first_pad = int(np.argmax(batch['tokens_bs'][0] == MEDIA_PAD_ID))
  np.testing.assert_allclose(np.asarray(other_logits)[0, :first_pad], np.asarray(logits)[0, :first_pad],
                             atol=1e-5)
  assert np.abs(np.asarray(other_logits - logits)[0, first_pad:]).max() > 1e-3

  assert cli.main(['--to=hf', f'--src={orbax_dir}', f'--dst={back_dir}',
                   '--max_shard_gb=0.0003']) == 0
  src, back = _tensors(hf_dir), _tensors(back_dir)
  assert sorted(src) == sorted(back)
  for name in src:
    assert src[name].dtype == back[name].dtype and src[name].shape == back[name].shape, name
    assert src[name].tobytes() == back[name].tobytes(), name
  assert json.load(open(os.path.join(back_dir, 'config.json'))) == \
      json.load(open(os.path.join(hf_dir, 'config.json')))


def test_load_hf_unscanned_and_kimi_k25_vision_naming(hf_dir, tmp_path):
  cfg_a, var_a = hf.load_hf(hf_dir, param_dtype=None)
  k25 = str(tmp_path / 'k25')
  hf.save_hf(k25, cfg_a, var_a, media_pad_id=MEDIA_PAD_ID, dtype=None, vision_naming='kimi_k25',
             packed_experts=True)
  names = set(_tensors(k25))
  assert 'vision_tower.layers.0.attn.q_proj.weight' in names
  assert 'mm_projector.in_proj.weight' in names
  assert 'language_model.model.layers.1.mlp.experts.gate_up_proj' in names
  cfg_b, var_b = hf.load_hf(k25, scan_layers=False, param_dtype=None)
  assert 'blocks_0' in var_b['params']['vision_tower']
  back = str(tmp_path / 'back')
  hf.save_hf(back, cfg_b, var_b, media_pad_id=MEDIA_PAD_ID, dtype=None)
  src, again = _tensors(hf_dir), _tensors(back)
  assert sorted(src) == sorted(again)
  assert all(src[k].tobytes() == again[k].tobytes() for k in src)


def test_refuses_pickle_and_reports_missing(tmp_path, hf_dir):
  pickled = tmp_path / 'pickled'
  pickled.mkdir()
  (pickled / 'config.json').write_text(open(os.path.join(hf_dir, 'config.json')).read())
  (pickled / 'pytorch_model.bin').write_bytes(b'\x80\x04')
  with pytest.raises(hf.ConversionError, match='refusing to unpickle'):
    hf.load_hf(str(pickled))
  assert cli.main(['--to=jax', f'--src={pickled}', f'--dst={tmp_path / "x"}']) == 2
  # Drop one LM tensor from a single-file copy: the error names it.
  tensors = _tensors(hf_dir)
  del tensors['language_model.model.layers.2.self_attn.o_proj.weight']
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_text(open(os.path.join(hf_dir, 'config.json')).read())
  from safetensors.numpy import save_file
  save_file(tensors, str(broken / 'model.safetensors'))
  with pytest.raises(hf.ConversionError, match=r'language_model\.model\.layers\.2\.self_attn\.o_proj\.weight'):
    hf.load_hf(str(broken))
