import os
import pickle
import subprocess
import sys

import pytest

from kimi_vl_jax.config import presets
from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data import tokenizer as tokenizer_lib


def test_training_is_reproducible(tok):
  again = tokenizer_lib.train_sentencepiece(vocab_size=4096, seed=0)
  assert again.model_proto == tok.model_proto
  other = tokenizer_lib.train_sentencepiece(vocab_size=4096, seed=1)
  assert other.model_proto != tok.model_proto


def test_vocab_fits_small_preset(tok):
  assert tok.vocab_size == 4096 <= presets.get_preset('small').lm.vocab_size


def test_every_special_is_one_distinct_piece(tok):
  ids = tok.special_ids
  assert set(ids) == set(st.ALL_SPECIAL)
  assert len(set(ids.values())) == len(ids)
  assert ids[st.PAD] == 0
  for piece in st.USER_DEFINED:
    assert tok.encode(piece) == [ids[piece]], piece
  with pytest.raises(KeyError):
    tok.token_id('<|not_a_token|>')


@pytest.mark.parametrize('text', [
    'Hello world.', '  two  spaces\n\nand\ttabs\n', 'ünïcödé 漢字 🙂 ◁think▷x◁/think▷',
    '<|im_user|>user<|im_middle|>12345<|im_end|>', '', '\x00\x7f'])
def test_decode_encode_roundtrip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.token_id(st.UNK) not in ids     # byte fallback: nothing is unknown


def test_pickle_for_workers(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode('The red circle.') == tok.encode('The red circle.')


def test_load_or_train_caches(tmp_path):
  a = tokenizer_lib.load_or_train('', 1024, str(tmp_path))
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].endswith('.model')
  mtime = os.path.getmtime(tmp_path / files[0])
  b = tokenizer_lib.load_or_train('', 1024, str(tmp_path))
  assert os.path.getmtime(tmp_path / files[0]) == mtime
  assert a.model_proto == b.model_proto
  c = tokenizer_lib.load_or_train(str(tmp_path / files[0]), 1024)
  assert c.model_proto == a.model_proto
  with pytest.raises(ValueError, match='model vocab'):
    tokenizer_lib.load_or_train(str(tmp_path / files[0]), 512)
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizer_lib.load_or_train(str(tmp_path / 'nope.model'))


def test_cli(tmp_path, tok):
  out = tmp_path / 'spm.model'
  subprocess.run([sys.executable, '-m', 'kimi_vl_jax.data.tokenizer', f'--out={out}',
                  '--vocab_size=4096'], check=True, capture_output=True)
  assert out.read_bytes() == tok.model_proto
