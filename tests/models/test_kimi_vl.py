"""KimiVL: image tokens land on <|media_pad|> positions in order; mismatches fail on the host;
any image-size mix runs under one compiled graph."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from kimi_vl_jax.config import presets
from kimi_vl_jax.data import patch_packing
from kimi_vl_jax.models import kimi_vl

PAD_ID = 7
SEQ, SLOTS = 48, 64


def test_merge_image_tokens_places_kth_token_at_kth_placeholder():
  text = np.zeros((2, 6, 3), np.float32)
  image = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3) + 1
  is_pad = np.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  out = np.asarray(kimi_vl.merge_image_tokens(jnp.asarray(text), jnp.asarray(image), jnp.asarray(is_pad)))
  np.testing.assert_array_equal(out[0, [1, 2, 4]], image[0, :3])
  np.testing.assert_array_equal(out[1, 0], image[1, 0])
  assert np.all(out[~is_pad] == 0)


def test_placeholder_mismatch_is_a_clear_host_error():
  tokens = np.array([[1, PAD_ID, PAD_ID, 2], [PAD_ID, 3, 3, 3]])
  seg = np.zeros((2, 8), np.int32)
  seg[0, :8] = 1          # 2 image tokens in row 0
  seg[1, :4] = 1          # 1 image token in row 1
  kimi_vl.check_image_placeholders(tokens, seg, PAD_ID)
  seg[1, :8] = 1
  with pytest.raises(kimi_vl.PlaceholderMismatchError, match=r'row 1: 1 <\|media_pad\|> tokens .* but 2 image tokens'):
    kimi_vl.check_image_placeholders(tokens, seg, PAD_ID)


def _batch(grids, seed):
  """One row: text, then each image's placeholders, then text; padding after."""
  rng = np.random.default_rng(seed)
  images = [(rng.normal(size=(h * w, 588)).astype(np.float32), (h, w)) for h, w in grids]
  pack = patch_packing.pack_images(images, SLOTS)
  ids = [11, 12]
  for n in pack.num_tokens:
    ids += [13] + [PAD_ID] * n + [14]
  ids += list(rng.integers(20, 500, size=5))
  tokens = np.zeros((1, SEQ), np.int32)
  tokens[0, :len(ids)] = ids
  seg = (np.arange(SEQ) < len(ids)).astype(np.int32)[None]
  pos = np.where(seg > 0, np.arange(SEQ), 0).astype(np.int32)
  arrays = pack.arrays()
  return dict(tokens_bs=tokens, segment_ids_bs=seg, positions_bs=pos, patches=arrays['patches'][None],
              **{f'patch_{k}': arrays[k][None] for k in patch_packing.PATCH_FIELDS[1:]})


@pytest.fixture(scope='module')
def model_and_vars():
  cfg = presets.get_preset('tiny')
  model = kimi_vl.KimiVL(FrozenConfigDict(cfg), media_pad_id=PAD_ID)
  # Shapes from eval_shape (no init compile), random values.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), **kimi_vl.dummy_inputs(cfg, PAD_ID)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype), shapes)
  return model, variables


def test_equals_lm_on_manually_merged_embeddings_and_compiles_once(model_and_vars):
  model, variables = model_and_vars
  traces = []

  def run(v, b):
    traces.append(1)
    return model.apply(v, **b)

  run = jax.jit(run)
  a = _batch([(2, 6), (4, 2)], seed=0)
  logits, aux = run(variables, a)
  b = _batch([(6, 4), (2, 2), (2, 4)], seed=1)
  run(variables, b)
  assert len(traces) == 1 and int(aux['image_tokens']) == 5

  # Reference: image tokens from the tower+projector, placed by a Python loop, then the LM.
  img, img_seg = jax.jit(lambda v, *p: model.apply(v, *p, method=model.image_tokens))(
      variables, *[a[k] for k in kimi_vl.PATCH_KEYS])
  emb = np.array(model.apply(variables, a['tokens_bs'], method=lambda m, t: m.language_model.embed(t)))
  k = 0
  for s in range(SEQ):
    if a['tokens_bs'][0, s] == PAD_ID:
      emb[0, s] = np.asarray(img)[0, k]
      k += 1
  assert k == int((np.asarray(img_seg) > 0).sum()) == 5
  lm = lambda m, t, s, p, e: m.language_model(t, s, p, inputs_embeds_bsd=e)
  want, _ = jax.jit(lambda v, *x: model.apply(v, *x, method=lm))(
      variables, a['tokens_bs'], a['segment_ids_bs'], a['positions_bs'], jnp.asarray(emb))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=2e-5)


def test_eager_call_checks_placeholders(model_and_vars):
  model, variables = model_and_vars
  a = _batch([(2, 6), (4, 2)], seed=0)
  a['tokens_bs'] = np.where(a['tokens_bs'] == PAD_ID, 3, a['tokens_bs'])
  with pytest.raises(kimi_vl.PlaceholderMismatchError, match='row 0: 0 <'):
    model.apply(variables, **a)
