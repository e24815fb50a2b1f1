"""The Kimi-VL chat template (SPEC §7): messages -> token ids and a loss mask.

Template (no newlines between turns)::

  <|im_system|>system<|im_middle|>{text}<|im_end|><|im_user|>user<|im_middle|>{text or image}...
  <|im_end|><|im_assistant|>assistant<|im_middle|>{answer}<|im_end|>

An image item renders as ``<|media_start|>image<|media_content|>`` + (h/2)(w/2) x
``<|media_pad|>`` + ``<|media_end|>``. The loss mask is 1 exactly on the tokens of assistant
text content and the ``<|im_end|>`` closing each assistant turn (media tokens never; the role
header never). Plain documents (``encode_document``) have no turns: text and images in order
and a closing ``[EOS]``, with the loss on text and ``[EOS]``.

Each text piece is encoded on its own and specials are inserted by id, so a user cannot forge a
turn boundary by splitting text across items, and ``decode(ids) == render_*(...)`` exactly.

Messages: ``{'role': 'system'|'user'|'assistant', 'content': str | [item, ...]}`` with items
``{'type': 'text', 'text': str}`` or ``{'type': 'image', ...}`` (the image itself is not needed
here, only its LM token count, given in order of appearance).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.tokenizer import Tokenizer


class TemplateError(ValueError):
  """A conversation the template cannot render; the message names the message/item."""


def content_items(message: dict, where: str = 'message') -> list[dict]:
  """A message's content as a list of items (a plain string is one text item)."""
  content = message.get('content')
  if isinstance(content, str):
    return [{'type': 'text', 'text': content}]
  if not isinstance(content, list):
    raise TemplateError(f'{where}: content must be a string or a list of items, '
                        f'got {type(content).__name__}')
  for j, item in enumerate(content):
    if not isinstance(item, dict) or item.get('type') not in ('text', 'image'):
      raise TemplateError(f'{where}.content[{j}]: expected {{"type": "text"|"image", ...}}, '
                          f'got {item!r:.80}')
    if item['type'] == 'text' and not isinstance(item.get('text'), str):
      raise TemplateError(f'{where}.content[{j}]: text item without a string "text"')
  return content


def count_images(messages: Sequence[dict]) -> int:
  return sum(item['type'] == 'image' for i, m in enumerate(messages)
             for item in content_items(m, f'messages[{i}]'))


# A rendered piece: (kind, value, loss). kind: 'text' (value str) | 'special' (value str) |
# 'pad' (value = number of <|media_pad|> copies).
_Piece = tuple[str, Any, int]


def _image_pieces(n_tokens: int) -> list[_Piece]:
  if n_tokens < 1:
    raise TemplateError(f'an image needs at least one LM token, got {n_tokens}')
  return [('special', st.MEDIA_START, 0), ('text', st.MEDIA_KIND_IMAGE, 0),
          ('special', st.MEDIA_CONTENT, 0), ('pad', n_tokens, 0), ('special', st.MEDIA_END, 0)]


def _items_pieces(items: list[dict], counts: Sequence[int], k: int, loss: int,
                  where: str) -> tuple[list[_Piece], int]:
  pieces = []
  for item in items:
    if item['type'] == 'text':
      if item['text']:
        pieces.append(('text', item['text'], loss))
    else:
      if k >= len(counts):
        raise TemplateError(f'{where}: more image items than the {len(counts)} image token '
                            'counts given')
      pieces += _image_pieces(int(counts[k]))
      k += 1
  return pieces, k


def _chat_pieces(messages: Sequence[dict], counts: Sequence[int],
                 add_generation_prompt: bool) -> list[_Piece]:
  if not messages:
    raise TemplateError('empty conversation')
  pieces, k = [], 0
  for i, m in enumerate(messages):
    where = f'messages[{i}]'
    role = m.get('role') if isinstance(m, dict) else None
    if role not in st.ROLE_TOKENS:
      raise TemplateError(f'{where}: unknown role {role!r}; expected one of {st.ROLES}')
    loss = int(role == 'assistant')
    pieces += [('special', st.ROLE_TOKENS[role], 0), ('text', role, 0), ('special', st.IM_MIDDLE, 0)]
    body, k = _items_pieces(content_items(m, where), counts, k, loss, where)
    pieces += body
    pieces.append(('special', st.IM_END, loss))
  if k != len(counts):
    raise TemplateError(f'{len(counts)} image token counts given for {k} image items')
  if add_generation_prompt:
    pieces += [('special', st.IM_ASSISTANT, 0), ('text', 'assistant', 0), ('special', st.IM_MIDDLE, 0)]
  return pieces


def _document_pieces(items: list[dict], counts: Sequence[int], add_eos: bool) -> list[_Piece]:
  pieces, k = _items_pieces(content_items({'content': items}, 'document'), counts, 0, 1, 'document')
  if k != len(counts):
    raise TemplateError(f'{len(counts)} image token counts given for {k} image items')
  if not pieces:
    raise TemplateError('empty document')
  if add_eos:
    pieces.append(('special', st.EOS, 1))
  return pieces


def _render(pieces: list[_Piece], expand: bool) -> str:
  out = []
  for kind, value, _ in pieces:
    out.append(st.MEDIA_PAD * (value if expand else 1) if kind == 'pad' else value)
  return ''.join(out)


def _encode(pieces: list[_Piece], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = [], []
  pad_id = tok.token_id(st.MEDIA_PAD)
  for kind, value, loss in pieces:
    if kind == 'text':
      piece_ids = tok.encode(value)
    elif kind == 'special':
      piece_ids = [tok.token_id(value)]
    else:
      piece_ids = [pad_id] * value
    ids += piece_ids
    mask += [loss] * len(piece_ids)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def render_chat(messages: Sequence[dict], image_token_counts: Optional[Sequence[int]] = None,
                add_generation_prompt: bool = False) -> str:
  """The template text; with counts, each image's <|media_pad|> is expanded to its count."""
  counts = [1] * count_images(messages) if image_token_counts is None else image_token_counts
  return _render(_chat_pieces(messages, counts, add_generation_prompt),
                 expand=image_token_counts is not None)


def encode_chat(messages: Sequence[dict], tokenizer: Tokenizer,
                image_token_counts: Sequence[int] = (),
                add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """-> (ids [T] int32, loss_mask [T] int32); image_token_counts[k] = (h/2)(w/2) of image k."""
  return _encode(_chat_pieces(messages, image_token_counts, add_generation_prompt), tokenizer)


def render_document(items: Sequence[dict], image_token_counts: Optional[Sequence[int]] = None,
                    add_eos: bool = True) -> str:
  items = list(items)
  n = sum(it.get('type') == 'image' for it in items if isinstance(it, dict))
  counts = [1] * n if image_token_counts is None else image_token_counts
  return _render(_document_pieces(items, counts, add_eos), expand=image_token_counts is not None)


def encode_document(items: Sequence[dict], tokenizer: Tokenizer,
                    image_token_counts: Sequence[int] = (),
                    add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A plain (pretraining) document: text/image items then [EOS]; loss on text and [EOS]."""
  return _encode(_document_pieces(list(items), image_token_counts, add_eos), tokenizer)
