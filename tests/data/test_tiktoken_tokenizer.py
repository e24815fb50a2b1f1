"""The released Kimi tokenizer format on a tiny vocabulary: special ids after the ranks (named
by tokenizer_config.json, else at the release's offsets), Kimi's pre-tokenizer split, special
strings as single ids, errors that name the file and line, and loading through load_or_train."""
import base64
import json
import pickle

import pytest

from kimi_vl_jax.data import chat_template
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data import tiktoken_tokenizer as tt
from kimi_vl_jax.data.tokenizer import load_or_train

# Every byte, then merges that build 'hello', ' hello', the digit runs '123' and '1234', and
# two that cross a boundary of Kimi's pre-tokenizer: lower- to upper-case, letter to Han.
MERGES = [b'he', b'll', b'llo', b'hello', b' hello', b'12', b'123', b'1234', b'lC',
          'o世'.encode()]
NUM_RANKS = 256 + len(MERGES)


def _ranks_bytes() -> bytes:
  tokens = [bytes([i]) for i in range(256)] + MERGES
  return b''.join(base64.b64encode(t) + b' %d\n' % r for r, t in enumerate(tokens))


@pytest.fixture
def ckpt(tmp_path):
  """A checkpoint directory like the release's: ranks + a config naming a few special ids."""
  (tmp_path / 'tiktoken.model').write_bytes(_ranks_bytes())
  names = {NUM_RANKS + 0: '[BOS]', NUM_RANKS + 1: '[EOS]', NUM_RANKS + 2: '<|im_end|>',
           NUM_RANKS + 3: '<|im_user|>', NUM_RANKS + 4: '<|im_assistant|>',
           NUM_RANKS + 10: '<|im_system|>', NUM_RANKS + 17: '<|im_middle|>',
           NUM_RANKS + 18: '<|media_start|>', NUM_RANKS + 19: '<|media_content|>',
           NUM_RANKS + 20: '<|media_end|>', NUM_RANKS + 21: '<|media_pad|>',
           NUM_RANKS + 255: '[PAD]'}
  config = {'added_tokens_decoder': {str(i): {'content': c, 'special': True}
                                     for i, c in names.items()}}
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
  return tmp_path


def test_special_ids_follow_the_ranks_as_the_config_names_them(ckpt):
  tok = load_or_train(str(ckpt), vocab_size=NUM_RANKS + 256)
  assert isinstance(tok, tt.TiktokenTokenizer)
  assert tok.vocab_size == NUM_RANKS + 256 and tok.num_ranks == NUM_RANKS
  assert tok.token_id(st.IM_END) == NUM_RANKS + 2 and tok.bos_id == NUM_RANKS
  assert tok.token_id(st.MEDIA_PAD) == NUM_RANKS + 21 and tok.pad_id == NUM_RANKS + 255
  assert tok.token_id(f'<|reserved_token_{NUM_RANKS + 5}|>') == NUM_RANKS + 5
  with pytest.raises(KeyError, match='THINK|think'):
    tok.token_id(st.THINK_START)   # plain text in the release
  # A model whose vocabulary is smaller than the tokenizer's ids is refused.
  with pytest.raises(ValueError, match='model vocab'):
    load_or_train(str(ckpt), vocab_size=NUM_RANKS)


def test_without_a_config_the_released_offsets_name_the_specials(tmp_path):
  path = tmp_path / 'tiktoken.model'
  path.write_bytes(_ranks_bytes())
  tok = load_or_train(str(path), vocab_size=NUM_RANKS + 256)
  for piece, released in st.RELEASED_IDS.items():
    assert tok.token_id(piece) == NUM_RANKS + released - tt.RELEASED_FIRST_SPECIAL
  assert tok.pad_id == 0   # no [PAD] named: padding is masked, any id serves


def test_kimi_pre_tokenizer_split_and_special_strings(ckpt):
  tok = tt.TiktokenTokenizer.from_path(str(ckpt))
  r = {t: 256 + i for i, t in enumerate(MERGES)}
  # ' hello' is one pre-token (a word takes one leading non-letter), so its merge applies.
  assert tok.encode('hello hello') == [r[b'hello'], r[b' hello']]
  # Digits split in runs of at most 3: '1234' (a rank) is never formed, '123' is.
  assert tok.encode('1234') == [r[b'123'], ord('4')]
  # A word ends where a lower-case run meets a capital, and Han characters form their own
  # pre-token: the merges across those boundaries never apply.
  assert tok.encode('lC') == [ord('l'), ord('C')]
  assert tok.encode('o世') == [ord('o')] + list('世'.encode())
  ids = tok.encode('hello<|im_end|>')
  assert ids == [r[b'hello'], tok.token_id(st.IM_END)]
  for text in ('hello world, 1234!\n\n  x', 'naïve 日本語 text ◁think▷ok◁/think▷'):
    assert tok.decode(tok.encode(text)) == text
  assert tok.decode([r[b'hello'], tok.pad_id]) == 'hello'   # [PAD] decodes to nothing


def test_chat_rows_use_the_release_ids(ckpt):
  tok = tt.TiktokenTokenizer.from_path(str(ckpt))
  messages = [{'role': 'user', 'content': 'hello'}, {'role': 'assistant', 'content': 'hello'}]
  ids, _ = chat_template.encode_chat(messages, tok, [])
  expected = ([tok.token_id(st.IM_USER)] + tok.encode('user') + [tok.token_id(st.IM_MIDDLE)]
              + tok.encode('hello') + [tok.token_id(st.IM_END)]
              + [tok.token_id(st.IM_ASSISTANT)] + tok.encode('assistant')
              + [tok.token_id(st.IM_MIDDLE)] + tok.encode('hello') + [tok.token_id(st.IM_END)])
  assert list(ids) == expected


def test_pickles_for_data_workers(ckpt):
  tok = tt.TiktokenTokenizer.from_path(str(ckpt))
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode('hello 123<|im_end|>') == tok.encode('hello 123<|im_end|>')
  assert again.token_id(st.MEDIA_PAD) == tok.token_id(st.MEDIA_PAD)


def test_long_texts_are_encoded_in_pieces_without_losing_any(ckpt, monkeypatch):
  tok = tt.TiktokenTokenizer.from_path(str(ckpt))
  text = 'hello world\n' * 50
  whole = tok.encode(text)
  monkeypatch.setattr(tt, 'MAX_ENCODE_CHARS', 100)
  assert tok.encode(text) == whole and tok.decode(tok.encode(text)) == text


def test_bad_files_name_the_file_and_line(tmp_path):
  path = tmp_path / 'tiktoken.model'
  lines = _ranks_bytes().splitlines()
  lines[3] = b'not-base64! 3'
  path.write_bytes(b'\n'.join(lines))
  with pytest.raises(ValueError, match=r'tiktoken\.model:4: not a tiktoken rank line'):
    tt.TiktokenTokenizer.from_path(str(path))
  lines[3] = base64.b64encode(bytes([3])) + b' 300'
  path.write_bytes(b'\n'.join(lines))
  with pytest.raises(ValueError, match='ranks must be 0..'):
    tt.TiktokenTokenizer.from_path(str(path))
  path.write_bytes(_ranks_bytes())
  (tmp_path / 'tokenizer_config.json').write_text(
      json.dumps({'added_tokens_decoder': {'5': {'content': '[BOS]'}}}))
  with pytest.raises(ValueError, match='id 5 is outside the special ids'):
    tt.TiktokenTokenizer.from_path(str(tmp_path))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='holds no tiktoken.model'):
    load_or_train(str(empty))


def test_finetune_recipe_reads_the_checkpoints_own_tokenizer(ckpt, tmp_path_factory):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments',
                      'finetune_kimi_vl_a3b.py')
  spec = importlib.util.spec_from_file_location('finetune_recipe', path)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  assert recipe.get_config(f'{ckpt},chat.jsonl').data.tokenizer == str(ckpt)
  converted = tmp_path_factory.mktemp('orbax')   # no tiktoken.model: the default is kept
  assert recipe.get_config(f'{converted},chat.jsonl').data.tokenizer == ''


def test_training_rows_from_the_data_pipeline_carry_its_ids(ckpt):
  """config.data.tokenizer = a checkpoint directory: chat rows with images are encoded with
  the tiktoken vocabulary, one <|media_pad|> (its release-offset id) per image token."""
  from kimi_vl_jax.config import base_config
  from kimi_vl_jax.train import data as data_lib, stages as stages_lib
  tok = tt.TiktokenTokenizer.from_path(str(ckpt))
  c = base_config('tiny')
  c.model.lm.vocab_size = 1024
  c.data.tokenizer = str(ckpt)
  c.train.global_batch, c.train.seq_len = 2, 128
  c.data.sources = 'chat=generated:shapes@1#mm#qa'
  batch = data_lib.make_source(c, stages_lib.resolve(c, 'sft_1')).next()
  assert batch['tokens'].max() < tok.vocab_size and batch['loss_mask'].sum() > 0
  pads = int((batch['tokens'] == tok.token_id(st.MEDIA_PAD)).sum())
  assert pads > 0 and pads * 4 == int((batch['patch_segment_ids'] > 0).sum())
  assert (batch['tokens'] == tok.token_id(st.IM_END)).any()
