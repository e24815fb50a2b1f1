"""THE one place for special token strings (SPEC §7).

Chat turns: ``<|im_system|>system<|im_middle|>...<|im_end|>`` (role token, role name as text,
``<|im_middle|>``, content, ``<|im_end|>``), no newlines between turns. Each image is
``<|media_start|>image<|media_content|><|media_pad|><|media_end|>`` with the single
``<|media_pad|>`` expanded to (h/2)(w/2) copies. Thinking models write their reasoning between
``◁think▷`` and ``◁/think▷`` as plain text (the markers are still single tokens here).

Every string below is one piece of the project tokenizer (``tokenizer.py`` trains them as
user-defined symbols); ``RELEASED_IDS`` records the released tiktoken ids, which
``tiktoken_tokenizer.py`` gives these strings when no ``tokenizer_config.json`` names them. In
the release ◁think▷ / ◁/think▷ are plain text, not single tokens.
"""
from __future__ import annotations

PAD = '[PAD]'            # id 0 in the project tokenizer: padding tokens are zeros
UNK = '[UNK]'
BOS = '[BOS]'
EOS = '[EOS]'            # ends a plain-text (pretraining) document

IM_SYSTEM = '<|im_system|>'
IM_USER = '<|im_user|>'
IM_ASSISTANT = '<|im_assistant|>'
IM_MIDDLE = '<|im_middle|>'
IM_END = '<|im_end|>'    # ends every turn; generation stops here

MEDIA_START = '<|media_start|>'
MEDIA_CONTENT = '<|media_content|>'
MEDIA_PAD = '<|media_pad|>'
MEDIA_END = '<|media_end|>'
MEDIA_KIND_IMAGE = 'image'   # plain text between MEDIA_START and MEDIA_CONTENT

THINK_START = '◁think▷'
THINK_END = '◁/think▷'

# role -> (role token, role name written after it as text)
ROLE_TOKENS = {
    'system': IM_SYSTEM,
    'user': IM_USER,
    'assistant': IM_ASSISTANT,
}
ROLES = tuple(ROLE_TOKENS)

# Pieces the tokenizer must keep whole, in the order they get ids (after PAD=0, UNK=1).
USER_DEFINED = (BOS, EOS, IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE,
                MEDIA_START, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END, THINK_START, THINK_END)
ALL_SPECIAL = (PAD, UNK) + USER_DEFINED

# Tokens that are part of an image's span (never loss targets: the model cannot predict pixels).
MEDIA_TOKENS = (MEDIA_START, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END)

# Released Kimi-VL tiktoken ids (SPEC §7; media_start/content/end inferred).
RELEASED_IDS = {
    BOS: 163584, EOS: 163585, IM_END: 163586, IM_USER: 163587, IM_ASSISTANT: 163588,
    IM_SYSTEM: 163594, IM_MIDDLE: 163601, MEDIA_START: 163602, MEDIA_CONTENT: 163603,
    MEDIA_END: 163604, MEDIA_PAD: 163605,
}

# Placeholder that JSONL/LLaVA sources use inside text to mark where an image goes.
IMAGE_PLACEHOLDER = '<image>'
VIDEO_PLACEHOLDER = '<video>'
