"""Packing invariants: rows, segments, positions, masks, image placeholders vs patch buffers."""
import numpy as np
import pytest

from kimi_vl_jax.data import chat_template as ct
from kimi_vl_jax.data import packing
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.examples import Example


def _example(tok, rng, idx, n_images=None, words=None):
  n_images = rng.integers(0, 3) if n_images is None else n_images
  grids = [(2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))) for _ in range(n_images)]
  words = int(rng.integers(1, 30)) if words is None else words
  content = [{'type': 'image'} for _ in grids] + [{'type': 'text', 'text': f'q{idx} ' * words}]
  msgs = [{'role': 'user', 'content': content}, {'role': 'assistant', 'content': f'a{idx}'}]
  ids, mask = ct.encode_chat(msgs, tok, [h * w // 4 for h, w in grids])
  patches = [np.full((h * w, 588), 1000 * idx + k, np.float32) for k, (h, w) in enumerate(grids)]
  return Example(ids, mask, patches, grids, source_id=idx % 3, origin=f'f:{idx}', index=idx)


def _packer(tok, **kw):
  cfg = packing.PackConfig(**{'rows': 4, 'seq_len': 128, 'max_patches': 128, **kw})
  return packing.Packer(cfg, tok.token_id(st.MEDIA_START), tok.token_id(st.MEDIA_END))


def _check_batch(tok, batch, by_index, cfg):
  pad_id = tok.token_id(st.MEDIA_PAD)
  b, s = batch['tokens'].shape
  assert (b, s) == (cfg.rows, cfg.seq_len)
  assert batch['patches'].shape == (cfg.rows, cfg.max_patches, 588)
  seen = []
  for r in range(b):
    seg = batch['segment_ids'][r]
    used = seg > 0
    n_used = int(used.sum())
    assert np.all(used[:n_used]) and not np.any(used[n_used:]), 'padding only at the end'
    assert np.all(batch['tokens'][r, n_used:] == 0) and np.all(batch['loss_mask'][r, n_used:] == 0)
    assert np.all(batch['source_ids'][r, n_used:] == -1)
    assert np.all(np.diff(seg[:n_used]) >= 0)
    images = []
    for sid in np.unique(seg[used]):
      span = np.flatnonzero(seg == sid)
      assert np.all(np.diff(span) == 1), 'segment is contiguous'
      np.testing.assert_array_equal(batch['positions'][r, span], np.arange(len(span)))
      toks = batch['tokens'][r, span]
      # Identify the example by its contents: it is whole, in one row.
      ex = [e for e in by_index.values() if e.num_tokens == len(span) and
            np.array_equal(e.tokens, toks)]
      assert ex, 'segment equals an example exactly (nothing split across rows)'
      ex = ex[0]
      seen.append(ex.index)
      np.testing.assert_array_equal(batch['loss_mask'][r, span], ex.loss_mask)
      assert np.all(batch['source_ids'][r, span] == ex.source_id)
      images += list(zip(ex.grids, ex.patches))
    # k-th <|media_pad|> run <-> k-th image of the patch buffer, same token count.
    is_pad = batch['tokens'][r] == pad_id
    runs = np.flatnonzero(np.diff(np.concatenate([[0], is_pad.astype(int), [0]])))
    run_lens = list((runs[1::2] - runs[0::2]))
    assert run_lens == [h * w // 4 for (h, w), _ in images]
    pseg = batch['patch_segment_ids'][r]
    slot = 0
    for k, ((h, w), pt) in enumerate(images, start=1):
      sl = slice(slot, slot + h * w)
      assert np.all(pseg[sl] == k) and np.all(batch['patch_grid_h'][r, sl] == h)
      assert np.all(batch['patches'][r, sl] == pt[0, 0]), 'the right image in its slots'
      slot += h * w
    assert np.all(pseg[slot:] == 0)
  return seen


def test_invariants_and_waiting(tok):
  rng = np.random.default_rng(0)
  exs = [_example(tok, rng, i) for i in range(200)]
  by_index = {e.index: e for e in exs}
  stream = iter(exs)
  packer = _packer(tok)
  seen = []
  for _ in range(12):
    batch = packer.next_batch(lambda: next(stream))
    seen += _check_batch(tok, batch, by_index, packer.cfg)
    # Pending examples could not fit this batch; they lead the next one.
    pending = [e.index for e in packer.pending]
    assert len(pending) <= packer.cfg.lookahead
  pulled = seen + [e.index for e in packer.pending]
  assert sorted(pulled) == list(range(len(pulled))), 'nothing lost, nothing duplicated'
  assert packer.stats.tokens / packer.stats.slots > 0.8


def test_example_that_does_not_fit_waits(tok):
  rng = np.random.default_rng(1)
  big = _example(tok, rng, 1, n_images=0, words=54)
  small = [_example(tok, rng, i, n_images=0, words=3) for i in range(2, 40)]
  assert big.num_tokens <= 128 < big.num_tokens + small[0].num_tokens
  packer = _packer(tok, rows=1, lookahead=1)
  stream = iter([small[0], big] + small[1:])
  b1 = packer.next_batch(lambda: next(stream))
  assert [e.index for e in packer.pending] == [1]
  assert int(b1['segment_ids'].max()) == 1
  b2 = packer.next_batch(lambda: next(stream))
  np.testing.assert_array_equal(b2['tokens'][0, :big.num_tokens], big.tokens)


def test_truncate_never_splits_an_image(tok):
  rng = np.random.default_rng(2)
  ex = _example(tok, rng, 5, n_images=2, words=0)
  ex = Example(np.concatenate([ex.tokens[:3], ex.tokens]), np.concatenate([ex.loss_mask[:3],
               ex.loss_mask]), ex.patches, ex.grids, 0, 'f:5', 5)
  start = tok.token_id(st.MEDIA_START)
  s0, s1 = np.flatnonzero(ex.tokens == start)[:2]
  # A cut inside the second image moves to its <|media_start|>, keeping only the first image.
  cut = packing.fit_to_length(ex, int(s1) + 3, start, tok.token_id(st.MEDIA_END), 'truncate')
  assert cut.num_tokens == s1 and len(cut.grids) == 1 and len(cut.patches) == 1
  # A cut inside the first image leaves only the tokens before it.
  cut = packing.fit_to_length(ex, int(s0) + 2, start, tok.token_id(st.MEDIA_END), 'truncate')
  assert cut.num_tokens == s0 and cut.grids == []
  assert packing.fit_to_length(ex, 5, start, 0, 'drop') is None


def test_too_long_counted(tok):
  rng = np.random.default_rng(3)
  long = _example(tok, rng, 0, n_images=0, words=400)
  short = [_example(tok, rng, i, n_images=0, words=2) for i in range(1, 60)]
  for overflow, field in (('truncate', 'truncated'), ('drop', 'dropped_too_long')):
    packer = _packer(tok, overflow=overflow)
    stream = iter([long] + short)
    batch = packer.next_batch(lambda: next(stream))
    assert getattr(packer.stats, field) == 1
    if overflow == 'truncate':
      np.testing.assert_array_equal(batch['tokens'][0], long.tokens[:128])


def test_text_only_has_no_patch_arrays(tok):
  rng = np.random.default_rng(4)
  exs = iter([_example(tok, rng, i, n_images=0) for i in range(50)])
  batch = _packer(tok, max_patches=0).next_batch(lambda: next(exs))
  assert set(batch) == set(packing.TOKEN_FIELDS)


def test_bad_config():
  with pytest.raises(ValueError, match='overflow'):
    packing.PackConfig(rows=1, seq_len=8, overflow='wrap')
