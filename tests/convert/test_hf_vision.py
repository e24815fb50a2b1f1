"""HF vision/projector conversion: both namings, bit-exact round trips, clear errors.

Numerical equivalence of the converted weights (the rope row permutation) is proven by the
parity test in tests/models/test_moonvit.py; here: layout, exactness and error messages.
"""
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from kimi_vl_jax.config import presets
from kimi_vl_jax.convert import hf_vision as hv


def _cfgs(scan=True):
  model = presets.get_preset('tiny')
  model.vision.scan_layers = scan
  return FrozenConfigDict(model.vision), FrozenConfigDict(model.projector)


def _release_tensors(vcfg, pcfg, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  d, m, p = vcfg.hidden_size, vcfg.intermediate_size, vcfg.patch_size
  shapes = {'patch_embed.proj.weight': (d, 3, p, p), 'patch_embed.proj.bias': (d,),
            'patch_embed.pos_emb.weight': (vcfg.init_pos_emb_height, vcfg.init_pos_emb_width, d),
            'encoder.final_layernorm.weight': (d,), 'encoder.final_layernorm.bias': (d,)}
  for i in range(vcfg.num_hidden_layers):
    b = f'encoder.blocks.{i}.'
    shapes.update({b + 'norm0.weight': (d,), b + 'norm0.bias': (d,), b + 'norm1.weight': (d,),
                   b + 'norm1.bias': (d,), b + 'wqkv.weight': (3 * d, d), b + 'wqkv.bias': (3 * d,),
                   b + 'wo.weight': (d, d), b + 'wo.bias': (d,), b + 'mlp.fc0.weight': (m, d),
                   b + 'mlp.fc0.bias': (m,), b + 'mlp.fc1.weight': (d, m), b + 'mlp.fc1.bias': (d,)})
  out = {hv.RELEASE_VISION_PREFIX + k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
  for k, s in {'pre_norm.weight': (d,), 'pre_norm.bias': (d,), 'linear_1.weight': (4 * d, 4 * d),
               'linear_1.bias': (4 * d,), 'linear_2.weight': (pcfg.output_size, 4 * d),
               'linear_2.bias': (pcfg.output_size,)}.items():
    out[hv.RELEASE_PROJECTOR_PREFIX + k] = rng.normal(size=s).astype(dtype)
  return out


def _assert_bit_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize('scan', [True, False])
def test_release_round_trip_is_bit_exact(scan):
  vcfg, pcfg = _cfgs(scan)
  import ml_dtypes
  tensors = _release_tensors(vcfg, pcfg, dtype=ml_dtypes.bfloat16)
  vparams = hv.vision_from_hf(tensors, vcfg)
  pparams = hv.projector_from_hf(tensors, pcfg)
  back = {**hv.vision_to_hf(vparams, vcfg), **hv.projector_to_hf(pparams, pcfg)}
  _assert_bit_equal(back, tensors)
  if scan:
    assert vparams['blocks']['block']['wqkv']['kernel'].shape == (2, 32, 96)
  assert vparams['patch_embed']['kernel'].shape == (588, 32)


def test_kimi_k25_naming_round_trip_and_rope_permutation():
  vcfg, pcfg = _cfgs()
  release = _release_tensors(vcfg, pcfg)
  vparams = hv.vision_from_hf(release, vcfg)
  k25 = hv.vision_to_hf(vparams, vcfg, naming='kimi_k25', prefix='model.vision_tower.')
  assert 'model.vision_tower.layers.1.attn.q_proj.weight' in k25
  assert 'model.vision_tower.patch_embed.pos_emb.position_embeddings' in k25
  # q rows: head h, k25 dim m (< hd/2) is our interleaved dim 2m; dim m + hd/2 is 2m + 1.
  hd = vcfg.hidden_size // vcfg.num_attention_heads
  wqkv = release['vision_tower.encoder.blocks.0.wqkv.weight']
  q_k25 = k25['model.vision_tower.layers.0.attn.q_proj.weight']
  head, m = 1, 3
  np.testing.assert_array_equal(q_k25[head * hd + m], wqkv[head * hd + 2 * m])
  np.testing.assert_array_equal(q_k25[head * hd + hd // 2 + m], wqkv[head * hd + 2 * m + 1])
  # v rows are not permuted.
  np.testing.assert_array_equal(k25['model.vision_tower.layers.0.attn.v_proj.weight'],
                                wqkv[2 * vcfg.hidden_size:])
  again = hv.vision_from_hf(k25, vcfg, prefix='model.vision_tower.')
  _assert_bit_equal(hv.vision_to_hf(again, vcfg), {k: v for k, v in release.items()
                                                   if k.startswith('vision_tower.')})
  pk = hv.projector_to_hf(hv.projector_from_hf(release, pcfg), pcfg, 'kimi_k25', 'mm_projector.')
  assert 'mm_projector.in_proj.weight' in pk
  _assert_bit_equal(hv.projector_to_hf(hv.projector_from_hf(pk, pcfg, 'mm_projector.'), pcfg),
                    {k: v for k, v in release.items() if k.startswith('multi_modal_projector.')})


def test_errors_name_the_tensor():
  vcfg, pcfg = _cfgs()
  tensors = _release_tensors(vcfg, pcfg)
  missing = dict(tensors)
  del missing['vision_tower.encoder.blocks.1.mlp.fc0.bias']
  with pytest.raises(hv.ConversionError, match=r"missing tensor 'vision_tower\.encoder\.blocks\.1\.mlp\.fc0\.bias'"):
    hv.vision_from_hf(missing, vcfg)
  bad = dict(tensors)
  bad['vision_tower.encoder.blocks.0.wo.weight'] = np.zeros((3, 3), np.float32)
  with pytest.raises(hv.ConversionError, match=r"blocks\.0\.wo\.weight' has shape \(3, 3\), expected \(32, 32\)"):
    hv.vision_from_hf(bad, vcfg)
  extra = dict(tensors)
  extra['vision_tower.encoder.blocks.7.wo.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(hv.ConversionError, match='unexpected tensors'):
    hv.vision_from_hf(extra, vcfg)
  with pytest.raises(hv.ConversionError, match='no MoonViT tensors'):
    hv.vision_from_hf(tensors, vcfg, prefix='visual.')
  with pytest.raises(hv.ConversionError, match='unknown naming'):
    hv.projector_to_hf(hv.projector_from_hf(tensors, pcfg), pcfg, naming='llava')
