"""The released Kimi tokenizer: tiktoken byte-level BPE ranks plus 256 special ids (SPEC §7).

A Kimi-VL checkpoint directory ships ``tiktoken.model`` (one ``<base64 token> <rank>`` a line;
163584 ranks in the release) and ``tokenizer_config.json``, whose ``added_tokens_decoder``
names the special ids. The special ids follow the ranks: ``num_ranks .. num_ranks + 255``, so
the vocabulary is ``num_ranks + 256`` (163840). Ids without a name in the config are
``<|reserved_token_{id}|>``; without a config the names come from
``special_tokens.RELEASED_IDS`` (at the same offsets after the ranks).

Text is split by Kimi's pre-tokenizer pattern (``PAT_STR``: Han runs, cased words with
English contractions, up to 3 digits, punctuation runs, whitespace) before the BPE merges,
as the release's ``tokenization_moonshot.py`` does. Special token strings in the text become
their single ids. Fine-tuning a released checkpoint needs this vocabulary: the embeddings are
indexed by its ids. Point ``config.data.tokenizer`` at the checkpoint directory (or the
``tiktoken.model`` file); ``tokenizer.load_or_train`` picks this class for it.
"""
from __future__ import annotations

import base64
import json
import os
from typing import Optional, Sequence

import tiktoken

from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.tokenizer import Tokenizer

PAT_STR = '|'.join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_SPECIAL = 256
RANKS_FILE = 'tiktoken.model'
CONFIG_FILE = 'tokenizer_config.json'
RELEASED_FIRST_SPECIAL = 163584   # the release's first special id (= its number of ranks)
# tiktoken's core rejects very long inputs; longer texts are encoded in pieces cut after a
# newline (a pre-tokenizer boundary), or at the limit when a piece has none.
MAX_ENCODE_CHARS = 400_000


def is_tiktoken_path(path: str) -> bool:
  """A checkpoint directory holding ``tiktoken.model``, or such a file (any ``.tiktoken`` too)."""
  if os.path.isdir(path):
    return os.path.exists(os.path.join(path, RANKS_FILE))
  return os.path.basename(path) == RANKS_FILE or path.endswith('.tiktoken')


def parse_ranks(data: bytes, name: str) -> dict[bytes, int]:
  """``<base64 token> <rank>`` lines -> {token bytes: rank}; errors name ``name:line``."""
  ranks = {}
  for n, line in enumerate(data.splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    try:
      if len(parts) != 2:
        raise ValueError('expected "<base64 token> <rank>"')
      token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
    except ValueError as e:   # binascii.Error is a ValueError
      raise ValueError(f'{name}:{n}: not a tiktoken rank line ({e}): {line[:80]!r}') from None
    if token in ranks:
      raise ValueError(f'{name}:{n}: token {token!r} already has rank {ranks[token]}')
    ranks[token] = rank
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f'{name}: ranks must be 0..{len(ranks) - 1} with none missing or repeated')
  return ranks


def special_names(num_ranks: int, config: Optional[dict], name: str) -> dict[str, int]:
  """{special token string: id} for the ids after the ranks (module doc)."""
  first = num_ranks
  names = {first + i: f'<|reserved_token_{first + i}|>' for i in range(NUM_SPECIAL)}
  if config is None:
    for piece, released in st.RELEASED_IDS.items():
      names[first + released - RELEASED_FIRST_SPECIAL] = piece
  else:
    for key, entry in (config.get('added_tokens_decoder') or {}).items():
      i = int(key)
      if not first <= i < first + NUM_SPECIAL:
        raise ValueError(f'{name}: added_tokens_decoder id {i} is outside the special ids '
                         f'{first}..{first + NUM_SPECIAL - 1} after the {num_ranks} ranks')
      names[i] = entry['content'] if isinstance(entry, dict) else str(entry)
  out = {piece: i for i, piece in names.items()}
  if len(out) != NUM_SPECIAL:
    raise ValueError(f'{name}: two special ids share a name')
  return out


class TiktokenTokenizer(Tokenizer):
  """Kimi's tiktoken vocabulary (module doc). Picklable (for grain's worker processes)."""

  def __init__(self, ranks_data: bytes, config: Optional[dict] = None, name: str = RANKS_FILE):
    self._data, self._config, self.name = bytes(ranks_data), config, name
    ranks = parse_ranks(self._data, name)
    self._special = special_names(len(ranks), config, name)
    self._num_ranks = len(ranks)
    self._enc = tiktoken.Encoding(name=os.path.basename(name) or 'kimi', pat_str=PAT_STR,
                                  mergeable_ranks=ranks, special_tokens=self._special)

  @classmethod
  def from_path(cls, path: str) -> 'TiktokenTokenizer':
    """A checkpoint directory (``tiktoken.model`` + optional ``tokenizer_config.json``) or a
    ranks file (with ``tokenizer_config.json`` beside it, if there is one)."""
    ranks_path = os.path.join(path, RANKS_FILE) if os.path.isdir(path) else path
    config_path = os.path.join(os.path.dirname(ranks_path), CONFIG_FILE)
    config = None
    if os.path.exists(config_path):
      try:
        with open(config_path) as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{config_path}: not JSON ({e})') from None
    with open(ranks_path, 'rb') as f:
      return cls(f.read(), config, name=ranks_path)

  def __getstate__(self):
    return {'data': self._data, 'config': self._config, 'name': self.name}

  def __setstate__(self, state):
    self.__init__(state['data'], state['config'], state['name'])

  @property
  def vocab_size(self) -> int:
    return self._num_ranks + NUM_SPECIAL

  @property
  def num_ranks(self) -> int:
    return self._num_ranks

  def encode(self, text: str) -> list[int]:
    ids = []
    while len(text) > MAX_ENCODE_CHARS:
      cut = text.rfind('\n', 0, MAX_ENCODE_CHARS) + 1 or MAX_ENCODE_CHARS
      ids += self._enc.encode(text[:cut], allowed_special='all')
      text = text[cut:]
    return ids + self._enc.encode(text, allowed_special='all')

  def decode(self, ids: Sequence[int]) -> str:
    pad = self._special.get(st.PAD)
    return self._enc.decode([int(i) for i in ids if int(i) != pad])

  def token_id(self, piece: str) -> int:
    if piece not in self._special:
      raise KeyError(f'{piece!r} is not a special token of {self.name}')
    return self._special[piece]

  @property
  def pad_id(self) -> int:
    # Padding positions are masked everywhere (segment id 0, loss mask 0); the release may
    # name no [PAD], and then any id serves.
    return self._special.get(st.PAD, 0)
