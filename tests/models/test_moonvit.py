"""MoonViT + projector equal transformers' Kimi_K25VisionModel + Kimi_K25MultimodalProjection.

One pack holds three non-square images: one smaller than the 8x8 position table, one larger
on both sides, one larger on one side; the rest of the buffer is empty slots. The reference
runs the same images in raster order; its weights are converted with convert/hf_vision.py
(kimi_k25 naming, so the rotate_half -> interleaved q/k row permutation is exercised).
"""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ml_collections import FrozenConfigDict
from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig
from transformers.models.kimi_k25.modeling_kimi_k25 import (Kimi_K25MultimodalProjection,
                                                            Kimi_K25VisionModel)

from kimi_vl_jax.config import presets
from kimi_vl_jax.convert import hf_vision
from kimi_vl_jax.data import patch_packing
from kimi_vl_jax.models.moonvit import MoonViT
from kimi_vl_jax.models.projector import Projector

GRIDS = [(4, 6), (12, 10), (2, 14)]     # 8x8 table: smaller, larger, larger in w only
MAX_PATCHES = 192                        # 172 real patches + 20 empty slots


def _configs(**vision_overrides):
  model = presets.get_preset('tiny')
  model.vision.update(vision_overrides)
  return model, FrozenConfigDict(model.vision), FrozenConfigDict(model.projector)


def _torch_reference(model_cfg, seed=0):
  v = model_cfg.vision
  hf_cfg = Kimi_K25VisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
      pos_emb_height=v.init_pos_emb_height, pos_emb_width=v.init_pos_emb_width,
      patch_size=v.patch_size, rope_parameters={'rope_type': 'axial', 'rope_theta': v.rope_theta})
  hf_cfg._attn_implementation = 'sdpa'
  torch.manual_seed(seed)
  tower = Kimi_K25VisionModel(hf_cfg).eval()
  ns = types.SimpleNamespace(
      vision_config=hf_cfg, projection_hidden_size=v.hidden_size, projection_layer_norm_eps=1e-5,
      text_config=types.SimpleNamespace(hidden_size=model_cfg.lm.hidden_size))
  proj = Kimi_K25MultimodalProjection(ns).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in (tower, proj):
      for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if name.endswith('norm1.weight') or name.endswith('norm2.weight')
                or 'layernorm.weight' in name or 'pre_norm.weight' in name else 0.2 * noise)
  return tower, proj


def _images(grids, seed):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(h * w, 588)).astype(np.float32), (h, w)) for h, w in grids]


def _params(tower, proj, vision_cfg, proj_cfg):
  vt = {k: v.numpy() for k, v in tower.state_dict().items()}
  pt = {k: v.numpy() for k, v in proj.state_dict().items()}
  return (hf_vision.vision_from_hf(vt, vision_cfg, prefix=''),
          hf_vision.projector_from_hf(pt, proj_cfg, prefix=''))


@pytest.fixture(scope='module')
def setup():
  model_cfg, vision_cfg, proj_cfg = _configs()
  tower, proj = _torch_reference(model_cfg)
  vparams, pparams = _params(tower, proj, vision_cfg, proj_cfg)
  traces = []

  def forward(vp, pp, batch):
    traces.append(1)   # runs only while tracing
    feats = MoonViT(vision_cfg).apply({'params': vp}, batch['patches'], batch['segment_ids'],
                                      batch['rows'], batch['cols'], batch['grid_h'], batch['grid_w'])
    tokens, token_seg = Projector(proj_cfg).apply({'params': pp}, feats, batch['segment_ids'])
    return feats, tokens, token_seg

  return dict(tower=tower, proj=proj, vparams=vparams, pparams=pparams,
              forward=jax.jit(forward), traces=traces, vision_cfg=vision_cfg)


def _reference_outputs(tower, proj, images):
  pixels = torch.from_numpy(np.concatenate([p for p, _ in images])).reshape(-1, 3, 14, 14)
  grid_thw = torch.tensor([[1, h, w] for _, (h, w) in images])
  with torch.no_grad():
    out = tower(pixels, grid_thw)
    tokens = proj(out.pooler_output).squeeze(1)
  return out.last_hidden_state.numpy(), tokens.numpy()


def _check_parity(setup, grids, seed):
  images = _images(grids, seed)
  pack = patch_packing.pack_images(images, MAX_PATCHES)
  batch = {k: jnp.asarray(v[None]) for k, v in pack.arrays().items()}
  feats, tokens, token_seg = setup['forward'](setup['vparams'], setup['pparams'], batch)
  feats, tokens, token_seg = np.asarray(feats[0]), np.asarray(tokens[0]), np.asarray(token_seg[0])
  ref_feats, ref_tokens = _reference_outputs(setup['tower'], setup['proj'], images)
  # Reference features are raster per image; reorder to the pack's merge-block order.
  start, want = 0, []
  for _, (h, w) in images:
    want.append(patch_packing.raster_to_merge_order(ref_feats[start:start + h * w], h, w))
    start += h * w
  want = np.concatenate(want)
  n_real, n_tok = pack.num_real_patches, sum(pack.num_tokens)
  assert n_tok == ref_tokens.shape[0]
  np.testing.assert_allclose(feats[:n_real], want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(tokens[:n_tok], ref_tokens, atol=1e-4, rtol=0)
  # Empty slots and empty tokens are exact zeros.
  chex.assert_trees_all_equal(feats[n_real:], np.zeros_like(feats[n_real:]))
  chex.assert_trees_all_equal(tokens[n_tok:], np.zeros_like(tokens[n_tok:]))
  np.testing.assert_array_equal(token_seg, pack.segment_ids[::4])


def test_parity_with_transformers_three_images_one_pack(setup):
  _check_parity(setup, GRIDS, seed=0)


def test_second_size_mix_does_not_retrace(setup):
  _check_parity(setup, GRIDS, seed=0)
  n = len(setup['traces'])
  # Different sizes, count and order of images; same buffer shape -> same compiled graph.
  _check_parity(setup, [(10, 4), (2, 2), (6, 16), (6, 6)], seed=3)
  assert len(setup['traces']) == n == 1
  assert setup['forward']._cache_size() == 1


def test_unscanned_remat_layout_matches_scanned(setup):
  """scan_layers=False + remat 'full' computes the same function (params relaid via HF names)."""
  model_cfg, vision_cfg, proj_cfg = _configs(scan_layers=False, remat_policy='full')
  hf = hf_vision.vision_to_hf(setup['vparams'], setup['vision_cfg'], naming='release')
  vparams = hf_vision.vision_from_hf(hf, vision_cfg)
  assert 'blocks_1' in vparams
  pack = patch_packing.pack_images(_images(GRIDS, 0), MAX_PATCHES)
  args = [jnp.asarray(v[None]) for v in pack.arrays().values()]
  want = jax.jit(MoonViT(setup['vision_cfg']).apply)({'params': setup['vparams']}, *args)

  def loss(vp):
    return jnp.sum(MoonViT(vision_cfg).apply({'params': vp}, *args) ** 2)

  got = jax.jit(MoonViT(vision_cfg).apply)({'params': vparams}, *args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  grads = jax.jit(jax.grad(loss))(vparams)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_scan_unroll_matches_the_rolled_scan(setup):
  """scan_unroll=2 (both tiny layers straight): the same stacked params give the same values
  and gradients as the rolled scan."""
  _, vision_cfg, _ = _configs(scan_unroll=2)
  pack = patch_packing.pack_images(_images(GRIDS, 0), MAX_PATCHES)
  args = [jnp.asarray(v[None]) for v in pack.arrays().values()]

  def loss(cfg, vp):
    return jnp.sum(MoonViT(cfg).apply({'params': vp}, *args) ** 2)

  jaxpr = jax.make_jaxpr(lambda vp: loss(vision_cfg, vp))(setup['vparams'])
  assert [e.params['unroll'] for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan'] == [2]
  want_l, want_g = jax.jit(jax.value_and_grad(lambda vp: loss(setup['vision_cfg'], vp)))(
      setup['vparams'])
  got_l, got_g = jax.jit(jax.value_and_grad(lambda vp: loss(vision_cfg, vp)))(setup['vparams'])
  np.testing.assert_allclose(got_l, want_l, rtol=1e-6)
  chex.assert_trees_all_close(got_g, want_g, atol=1e-5, rtol=1e-5)


def test_init_annotates_every_param_with_logical_axes():
  _, vision_cfg, _ = _configs()
  from kimi_vl_jax.models.moonvit import dummy_inputs
  import flax.linen as nn
  variables = jax.eval_shape(lambda: MoonViT(vision_cfg).init(jax.random.PRNGKey(0),
                                                               *dummy_inputs(vision_cfg)))
  leaves = jax.tree.leaves(variables['params'], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  from kimi_vl_jax.parallel.rules import LOGICAL_AXES
  for leaf in leaves:   # every name is in the rules table, and none repeats within a tensor
    named = [n for n in leaf.names if n is not None]
    assert set(named) <= set(LOGICAL_AXES) and len(named) == len(set(named)), leaf.names
  stacked = variables['params']['blocks']['block']['wqkv']['kernel']
  assert stacked.names == ('layers', 'vision_embed', 'vision_heads')
  chex.assert_shape(stacked.value, (2, 32, 96))


def test_sharded_over_data_fsdp_tensor_matches_single_device(setup):
  """Params sharded by the rules table, batch over (data, fsdp), constraints active: same output."""
  import flax.linen as nn
  from kimi_vl_jax.parallel import mesh as mesh_lib, sharding
  from kimi_vl_jax.parallel.rules import LOGICAL_AXIS_RULES
  from kimi_vl_jax.models.moonvit import dummy_inputs
  import ml_collections
  mesh = mesh_lib.build_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, expert=1, tensor=2)))
  vision_cfg = setup['vision_cfg']
  abstract = jax.eval_shape(lambda: MoonViT(vision_cfg).init(jax.random.PRNGKey(0),
                                                             *dummy_inputs(vision_cfg)))
  shardings = sharding.fitted_param_shardings(abstract, mesh)['params']
  params = jax.device_put(setup['vparams'], shardings)
  packs = [patch_packing.pack_images(_images(GRIDS, s), MAX_PATCHES) for s in range(4)]
  batch = patch_packing.stack_packs(packs)
  global_batch = sharding.make_global_batch(batch, mesh)

  @jax.jit
  def forward(p, b):
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      return MoonViT(vision_cfg).apply({'params': p}, *(b[k] for k in patch_packing.PATCH_FIELDS))

  with jax.set_mesh(mesh):
    got = forward(params, global_batch)
  args = [jnp.asarray(batch[k]) for k in patch_packing.PATCH_FIELDS]
  want = jax.jit(MoonViT(vision_cfg).apply)({'params': setup['vparams']}, *args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize('layout', [dict(scan_unroll=2), dict(scan_layers=False)])
def test_rope_cos_sin_are_computed_once_per_step(layout):
  """One cos and one sin for the whole tower, forward and backward: not one per block and
  per q/k tensor, as XLA would otherwise fuse them into every rope consumer (unrolled or
  unscanned blocks make that visible as 8 cosines in this 2-block tower)."""
  _, vision_cfg, _ = _configs(**layout)
  from kimi_vl_jax.models.moonvit import dummy_inputs
  import flax.linen as nn
  model = MoonViT(vision_cfg)
  inputs = dummy_inputs(vision_cfg, batch=1, num_patches=64)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)['params'])
  # Inputs are arguments (as in training), so nothing about the angles is constant-folded;
  # the params only need their shapes (the step is compiled, not run).
  grad = jax.jit(jax.grad(lambda p, *x: jnp.sum(model.apply({'params': p}, *x) ** 2)))
  hlo = grad.lower(params, *inputs).compile().as_text()
  assert vision_cfg.num_hidden_layers >= 2
  assert hlo.count(' cosine(') == 1 and hlo.count(' sine(') == 1


def test_split_qkv_gradient_is_the_slices_gradient():
  from kimi_vl_jax.models.moonvit import _split_qkv
  qkv = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 3, 4, 8))
  cot = tuple(jax.random.normal(jax.random.PRNGKey(i), (2, 12, 4, 8)) for i in (1, 2, 3))
  plain = lambda x: (x[:, :, 0], x[:, :, 1], x[:, :, 2])
  out, vjp = jax.vjp(_split_qkv, qkv)
  out_ref, vjp_ref = jax.vjp(plain, qkv)
  chex.assert_trees_all_equal(out, out_ref)
  chex.assert_trees_all_equal(vjp(cot), vjp_ref(cot))
  # The backward is one stack, not three zero-padded slices' transposes added up.
  hlo = jax.jit(lambda x, c: jax.vjp(_split_qkv, x)[1](c)).lower(qkv, cot).as_text()
  assert 'stablehlo.pad' not in hlo
