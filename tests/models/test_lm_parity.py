"""MoeLM vs transformers' DeepseekV3ForCausalLM (fp32), HF round trip, and decode-with-cache."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from kimi_vl_jax.convert import hf_lm  # noqa: E402
from kimi_vl_jax.models import generate  # noqa: E402
from kimi_vl_jax.models.lm import MoeLM  # noqa: E402

B, S = 2, 24


def _hf_config(q_lora_rank=None, rope_interleave=True):
  return transformers.DeepseekV3Config(
      rope_interleave=rope_interleave,
      vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
      num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=2, topk_group=1,
      routed_scaling_factor=2.446, norm_topk_prob=True, q_lora_rank=q_lora_rank, kv_lora_rank=32,
      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=512,
      rope_parameters={'rope_type': 'default', 'rope_theta': 800000.0}, rms_norm_eps=1e-5,
      initializer_range=0.15, tie_word_embeddings=False, num_nextn_predict_layers=0,
      attn_implementation='eager')


def _torch_model(q_lora_rank=None, seed=0, rope_interleave=True):
  torch.manual_seed(seed)
  model = transformers.DeepseekV3ForCausalLM(_hf_config(q_lora_rank, rope_interleave)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('layernorm.weight') or name.endswith('norm.weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))     # non-trivial norm gains
    for name, buf in model.named_buffers():
      if name.endswith('e_score_correction_bias'):
        buf.copy_(0.05 * torch.randn_like(buf))       # non-zero selection bias
  return model


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _ours(hf_model, **overrides):
  cfg = hf_lm.lm_config_from_hf(hf_model.config, attention_backend='xla',
                                attention_block_size=8, **overrides)
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  variables = hf_lm.params_from_hf(sd, cfg)
  return MoeLM(FrozenConfigDict(cfg)), jax.tree.map(jnp.asarray, variables), cfg


def _tokens(seed=1):
  return np.random.RandomState(seed).randint(0, 256, size=(B, S)).astype(np.int32)


def _full(tokens):
  seg = jnp.ones(tokens.shape, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return seg, pos


@pytest.fixture(scope='module')
def torch_model():
  return _torch_model()


@pytest.fixture(scope='module')
def ours(torch_model):
  model, variables, cfg = _ours(torch_model)
  return model, variables, cfg, jax.jit(model.apply)   # one compile for every [B, S] forward


def test_config_round_trip(torch_model):
  cfg = hf_lm.lm_config_from_hf(torch_model.config)
  assert cfg.q_lora_rank == 0 and cfg.rope_theta == 800000.0 and cfg.n_group == 2
  back = transformers.DeepseekV3Config(**hf_lm.hf_config_from_lm(cfg))
  assert hf_lm.lm_config_from_hf(back).to_dict() == cfg.to_dict()
  with pytest.raises(ValueError, match='hidden_act'):
    hf_lm.lm_config_from_hf({**hf_lm.hf_config_from_lm(cfg), 'hidden_act': 'gelu'})


def test_logits_match_torch(torch_model, ours):
  _, variables, _, apply = ours
  tokens = _tokens()
  ref = _torch_logits(torch_model, tokens)
  got, aux = apply(variables, tokens, *_full(tokens))
  chex.assert_shape(got, (B, S, 256))
  assert float(np.abs(ref).max()) > 0.5          # logits are not trivially tiny
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
  chex.assert_shape(aux['load_le'], (2, 8))
  np.testing.assert_allclose(np.asarray(aux['load_le']).sum(-1), B * S * 3)


def test_rotate_half_checkpoint_is_permuted_to_interleaved(ours):
  # rope_interleave=False checkpoints use rotate-half rope rows; conversion permutes them.
  _, _, cfg, apply = ours
  hf = _torch_model(seed=5, rope_interleave=False)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  variables = jax.tree.map(jnp.asarray, hf_lm.params_from_hf(sd, cfg, rope_interleave=False))
  tokens = _tokens(9)
  got, _ = apply(variables, tokens, *_full(tokens))
  np.testing.assert_allclose(np.asarray(got), _torch_logits(hf, tokens), atol=1e-4, rtol=0)
  # Reading it as interleaved would be wrong (the test can fail).
  wrong = jax.tree.map(jnp.asarray, hf_lm.params_from_hf(sd, cfg))
  bad, _ = apply(wrong, tokens, *_full(tokens))
  assert float(np.abs(np.asarray(bad) - _torch_logits(hf, tokens)).max()) > 1e-3


def test_q_lora_and_unscanned_match_torch():
  hf = _torch_model(q_lora_rank=24, seed=3)
  model, variables, _ = _ours(hf, scan_layers=False)
  tokens = _tokens(2)
  got, _ = jax.jit(model.apply)(variables, tokens, *_full(tokens))
  np.testing.assert_allclose(np.asarray(got), _torch_logits(hf, tokens), atol=1e-4, rtol=0)


def test_round_trip_state_dict_loads_in_torch(torch_model, ours):
  _, variables, cfg, _ = ours
  tokens = _tokens(4)
  for packed in (True, False):
    sd = hf_lm.hf_from_params(jax.device_get(variables), cfg, packed_experts=packed)
    if packed:
      fresh = transformers.DeepseekV3ForCausalLM(_hf_config()).eval()
      missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                                  strict=True)
      assert not missing and not unexpected
      np.testing.assert_allclose(_torch_logits(fresh, tokens), _torch_logits(torch_model, tokens),
                                 atol=1e-6, rtol=0)
    else:
      assert 'model.layers.1.mlp.experts.7.down_proj.weight' in sd
    # The per-expert (released checkpoint) naming converts back to the same params.
    again = hf_lm.params_from_hf(sd, cfg)
    chex.assert_trees_all_equal(again, jax.device_get(variables))


def test_packed_segments_equal_separate_sequences(torch_model, ours):
  # Two sequences packed in one row (positions restart) == each run alone through torch.
  _, variables, _, apply = ours
  a, b = _tokens(5)[0, :10], _tokens(6)[0, :9]
  row = np.zeros((B, S), np.int32)
  row[0, :10], row[0, 10:19] = a, b
  seg = np.zeros((B, S), np.int32)
  seg[0, :10], seg[0, 10:19] = 1, 2
  pos = np.zeros((B, S), np.int32)
  pos[0, :10], pos[0, 10:19] = np.arange(10), np.arange(9)
  got, aux = apply(variables, row, seg, pos)    # row 1 is all padding
  np.testing.assert_allclose(np.asarray(got[0, :10]), _torch_logits(torch_model, a[None])[0],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got[0, 10:19]), _torch_logits(torch_model, b[None])[0],
                             atol=1e-4, rtol=0)
  # Padding is not routed: the load counts only the 19 real tokens.
  np.testing.assert_allclose(np.asarray(aux['load_le']).sum(-1), 19 * 3)


@pytest.mark.parametrize('scan_unroll', [1, 2])
def test_decode_with_cache_matches_full_forward(ours, torch_model, scan_unroll):
  model, variables, cfg, apply = ours
  tokens = _tokens(7)
  full, _ = apply(variables, tokens, *_full(tokens))
  if scan_unroll > 1:   # layers laid out straight; the cache still stacks them
    model, variables, cfg = _ours(torch_model, scan_unroll=scan_unroll)
  prefill = 9
  cache = generate.init_cache(cfg, B, S)
  seg, pos = _full(tokens)
  step = jax.jit(lambda *a: generate.forward_with_cache(model, *a))
  logits, cache = step(variables, tokens[:, :prefill], seg[:, :prefill], pos[:, :prefill], cache)
  outs = [logits]
  for t in range(prefill, S):
    logits, cache = step(variables, tokens[:, t:t + 1], seg[:, t:t + 1], pos[:, t:t + 1], cache)
    outs.append(logits)
  got = jnp.concatenate(outs, axis=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-4, rtol=0)
  # The cache holds only latent + k_pe per token.
  assert set(cache['moe']) == {'ckv', 'kpe'}
  chex.assert_shape(cache['moe']['ckv'], (2, B, S, cfg.kv_lora_rank))


def test_generate_greedy_and_sampling(ours):
  model, variables, _, apply = ours
  prompt = _tokens(8)[:, :8]
  lens = jnp.asarray([8, 5], jnp.int32)
  toks, logits = generate.generate(model, variables, jnp.asarray(prompt), lens,
                                   jax.random.PRNGKey(0), max_new_tokens=4)
  chex.assert_shape(toks, (B, 4))

  def full_forward_last(seq):
    # Right-pad to [B, S] (padding is inert) so the compiled forward is reused.
    n = seq.shape[0]
    x = np.zeros((B, S), np.int32)
    x[0, :n] = seq
    seg = (np.arange(S) < n).astype(np.int32)[None].repeat(B, 0)
    logits, _ = apply(variables, x, seg, np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)))
    return logits[0, n - 1]

  # Greedy step 0 of row 1 is the argmax of the full forward on its 5-token prompt.
  p1 = prompt[1, :5]
  last = full_forward_last(p1)
  assert int(toks[1, 0]) == int(jnp.argmax(last))
  np.testing.assert_allclose(np.asarray(logits[1, 0]), np.asarray(last), atol=1e-4)
  # And step 1 continues that sequence.
  last2 = full_forward_last(np.concatenate([p1, np.asarray(toks[1, :1])]))
  np.testing.assert_allclose(np.asarray(logits[1, 1]), np.asarray(last2), atol=1e-4)
  # Sampling: top_p tiny == greedy; temperature sampling returns in-vocab tokens.
  lg = jax.random.normal(jax.random.PRNGKey(1), (3, 50))
  np.testing.assert_array_equal(generate.sample_logits(lg, jax.random.PRNGKey(2), 1.0, 1e-6),
                                jnp.argmax(lg, -1))
  s = generate.sample_logits(lg, jax.random.PRNGKey(3), 0.7, 0.9)
  assert s.shape == (3,) and bool(jnp.all((s >= 0) & (s < 50)))
