"""Tokenizers: a small ``Tokenizer`` interface and the project's sentencepiece model (the
released Kimi tiktoken vocabulary is ``tiktoken_tokenizer.py``).

The sentencepiece model is trained reproducibly (fixed seed, deterministic input order, one
thread) from ``tokenizer_corpus.corpus_lines`` -- text this project generates, no downloads --
with every special token of ``special_tokens`` as a single user-defined piece, byte fallback
(any UTF-8 text encodes without ``[UNK]``) and identity normalization, so
``decode(encode(text)) == text`` exactly. ``[PAD]`` is id 0.

CLI: ``python -m kimi_vl_jax.data.tokenizer --out=/path/spm.model --vocab_size=4096``.
Programs use ``load_or_train(path_or_empty, vocab_size, cache_dir)``: a given path is loaded;
otherwise the model is trained once into ``cache_dir`` (file name keyed by vocab, seed and a
hash of the corpus and options) and reused.
"""
from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import tempfile
from typing import Optional, Sequence

import sentencepiece as spm

from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data import tokenizer_corpus


class Tokenizer(abc.ABC):
  """What the data pipeline needs from a tokenizer (another vocabulary can plug in here)."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids; every id is < vocab_size."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Text -> ids; special token strings in the text become their single ids."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text (special tokens rendered as their strings, ``[PAD]`` as nothing)."""

  @abc.abstractmethod
  def token_id(self, piece: str) -> int:
    """The id of a special token string; KeyError if it is not a single piece."""

  @property
  def special_ids(self) -> dict[str, int]:
    return {piece: self.token_id(piece) for piece in st.ALL_SPECIAL}

  @property
  def pad_id(self) -> int:
    return self.token_id(st.PAD)

  @property
  def eos_id(self) -> int:
    return self.token_id(st.EOS)

  @property
  def bos_id(self) -> int:
    return self.token_id(st.BOS)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model held as its serialized proto (picklable for grain workers)."""

  def __init__(self, model_proto: bytes, name: str = 'sentencepiece'):
    self._proto = bytes(model_proto)
    self.name = name
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._ids = {}
    for piece in st.ALL_SPECIAL:
      i = self._sp.piece_to_id(piece)
      if self._sp.id_to_piece(i) != piece:
        raise ValueError(f'{name}: special token {piece!r} is not a single piece of this model')
      self._ids[piece] = i
    if self._ids[st.PAD] != 0:
      raise ValueError(f'{name}: {st.PAD} must be id 0 (padding is zeros), got {self._ids[st.PAD]}')

  @classmethod
  def from_file(cls, path: str) -> 'SentencePieceTokenizer':
    with open(path, 'rb') as f:
      return cls(f.read(), name=path)

  def __getstate__(self):
    return {'proto': self._proto, 'name': self.name}

  def __setstate__(self, state):
    self.__init__(state['proto'], state['name'])

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_id(self, piece: str) -> int:
    if piece not in self._ids:
      i = self._sp.piece_to_id(piece)
      if self._sp.id_to_piece(i) != piece:
        raise KeyError(f'{piece!r} is not a single piece of {self.name}')
      self._ids[piece] = i
    return self._ids[piece]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _train_options(vocab_size: int, seed: int) -> dict:
  return dict(
      vocab_size=vocab_size, model_type='bpe', character_coverage=1.0, byte_fallback=True,
      # Identity normalization, no dummy prefix, whitespace kept: decode(encode(x)) == x.
      normalization_rule_name='identity', add_dummy_prefix=False, remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True,
      user_defined_symbols=list(st.USER_DEFINED),
      pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece=st.PAD, unk_piece=st.UNK,
      # Determinism: one thread, every sentence, in the given order.
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      random_seed=seed, minloglevel=2)


def train_sentencepiece(vocab_size: int = 4096, seed: int = 0,
                        lines: Optional[Sequence[str]] = None) -> SentencePieceTokenizer:
  """Trains the project tokenizer; same arguments -> byte-identical model."""
  if vocab_size < 512:
    raise ValueError(f'vocab_size={vocab_size}: byte fallback and specials need at least 512')
  lines = list(tokenizer_corpus.corpus_lines(seed) if lines is None else lines)
  # sentencepiece's own RNG (used by some trainers) is process-global: pin it too.
  spm.set_random_generator_seed(seed)
  out = io.BytesIO()
  opts = _train_options(vocab_size, seed)
  opts.pop('random_seed')
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, **opts)
  except RuntimeError as e:
    raise ValueError(f'training a {vocab_size}-piece tokenizer failed: {e}') from e
  return SentencePieceTokenizer(out.getvalue(), name=f'project-bpe-{vocab_size}-seed{seed}')


def _cache_key(vocab_size: int, seed: int) -> str:
  h = hashlib.sha256()
  h.update(json.dumps(_train_options(vocab_size, seed), sort_keys=True).encode())
  h.update(spm.__version__.encode())
  for line in tokenizer_corpus.corpus_lines(seed):
    h.update(line.encode())
    h.update(b'\0')
  return f'spm_bpe_v{vocab_size}_s{seed}_{h.hexdigest()[:12]}.model'


def default_cache_dir() -> str:
  return os.environ.get('KIMI_VL_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'kimi_vl_jax')


def load_or_train(path: str = '', vocab_size: int = 4096, cache_dir: str = '',
                  seed: int = 0) -> Tokenizer:
  """Loads ``path`` if given; else the cached project model (training it if missing).

  ``path``: a sentencepiece model, or the released Kimi tokenizer: a checkpoint directory
  holding ``tiktoken.model`` or that file (``tiktoken_tokenizer.TiktokenTokenizer``).

  The cache write is atomic (temp file + rename), so concurrent processes that both train
  (to identical bytes) cannot leave a torn file.
  """
  if path:
    from kimi_vl_jax.data import tiktoken_tokenizer   # imports this module
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer model {path!r} does not exist')
    if os.path.isdir(path) and not tiktoken_tokenizer.is_tiktoken_path(path):
      raise FileNotFoundError(f'tokenizer directory {path!r} holds no '
                              f'{tiktoken_tokenizer.RANKS_FILE} (the released Kimi tokenizer)')
    if tiktoken_tokenizer.is_tiktoken_path(path):
      tok = tiktoken_tokenizer.TiktokenTokenizer.from_path(path)
    else:
      tok = SentencePieceTokenizer.from_file(path)
  else:
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, _cache_key(vocab_size, seed))
    if os.path.exists(cached):
      tok = SentencePieceTokenizer.from_file(cached)
    else:
      tok = train_sentencepiece(vocab_size, seed)
      os.makedirs(cache_dir, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.tmp')
      with os.fdopen(fd, 'wb') as f:
        f.write(tok.model_proto)
      os.replace(tmp, cached)
      tok.name = cached
  if tok.vocab_size > vocab_size:
    raise ValueError(f'tokenizer {tok.name} has {tok.vocab_size} ids but the model vocab is '
                     f'{vocab_size}')
  return tok


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  tok = train_sentencepiece(f.vocab_size, f.seed)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  with open(f.out, 'wb') as fh:
    fh.write(tok.model_proto)
  print(json.dumps({'out': f.out, 'vocab_size': tok.vocab_size,
                    'sha256': hashlib.sha256(tok.model_proto).hexdigest()}))


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('out', None, 'where to write the .model file', required=True)
  flags.DEFINE_integer('vocab_size', 4096, 'number of pieces (the small preset has 4096)')
  flags.DEFINE_integer('seed', 0, 'corpus and trainer seed')
  app.run(main)
