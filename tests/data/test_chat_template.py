import numpy as np
import pytest

from kimi_vl_jax.data import chat_template as ct
from kimi_vl_jax.data import special_tokens as st

SPEC_EXAMPLE = ('<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user'
                '<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>Describe.'
                '<|im_end|><|im_assistant|>assistant<|im_middle|>')

MESSAGES = [
    {'role': 'system', 'content': 'You are a helpful assistant'},
    {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Describe.'}]},
]


def test_spec_text_exactly():
  assert ct.render_chat(MESSAGES, add_generation_prompt=True) == SPEC_EXAMPLE


def test_expanded_pads_roundtrip_and_mask(tok):
  msgs = MESSAGES + [
      {'role': 'assistant', 'content': 'A red circle.'},
      {'role': 'user', 'content': [{'type': 'text', 'text': 'And this?'}, {'type': 'image'}]},
      {'role': 'assistant', 'content': '◁think▷two images◁/think▷A square.'},
  ]
  ids, mask = ct.encode_chat(msgs, tok, image_token_counts=[6, 4])
  text = ct.render_chat(msgs, image_token_counts=[6, 4])
  assert tok.decode(ids) == text
  assert text.count(st.MEDIA_PAD) == 10
  assert int(np.sum(ids == tok.token_id(st.MEDIA_PAD))) == 10
  assert ids.dtype == np.int32 and mask.shape == ids.shape
  # The loss covers exactly both answers and the <|im_end|> that closes each.
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(int(i))
    elif cur:
      runs.append(tok.decode(cur))
      cur = []
  if cur:
    runs.append(tok.decode(cur))
  assert runs == ['A red circle.<|im_end|>', '◁think▷two images◁/think▷A square.<|im_end|>']
  # The final token is the closing <|im_end|> and it is a target.
  assert ids[-1] == tok.token_id(st.IM_END) and mask[-1] == 1


def test_user_im_end_not_in_loss(tok):
  ids, mask = ct.encode_chat([{'role': 'user', 'content': 'hi'}], tok)
  assert mask.sum() == 0
  assert tok.decode(ids) == '<|im_user|>user<|im_middle|>hi<|im_end|>'


def test_generation_prompt(tok):
  ids, mask = ct.encode_chat(MESSAGES, tok, [1], add_generation_prompt=True)
  assert tok.decode(ids) == SPEC_EXAMPLE
  assert mask.sum() == 0


def test_document(tok):
  items = [{'type': 'text', 'text': 'A cat.'}, {'type': 'image'}, {'type': 'text', 'text': ' Next.'}]
  ids, mask = ct.encode_document(items, tok, [3])
  assert tok.decode(ids) == ('A cat.<|media_start|>image<|media_content|>' + st.MEDIA_PAD * 3 +
                             '<|media_end|> Next.[EOS]')
  assert ids[-1] == tok.eos_id and mask[-1] == 1
  media = np.isin(ids, [tok.token_id(t) for t in st.MEDIA_TOKENS])
  assert not np.any(mask[media])
  assert tok.decode(ids[mask == 1]) == 'A cat. Next.[EOS]'


@pytest.mark.parametrize('msgs,counts,match', [
    ([], [], 'empty conversation'),
    ([{'role': 'robot', 'content': 'x'}], [], "unknown role 'robot'"),
    ([{'role': 'user', 'content': [{'type': 'image'}]}], [], 'more image items'),
    ([{'role': 'user', 'content': 'x'}], [4], '1 image token counts given for 0'),
    ([{'role': 'user', 'content': 3}], [], 'content must be'),
    ([{'role': 'user', 'content': [{'type': 'audio'}]}], [], r'messages\[0\].content\[0\]'),
])
def test_template_errors(tok, msgs, counts, match):
  with pytest.raises(ct.TemplateError, match=match):
    ct.encode_chat(msgs, tok, counts)
