"""Parsers from the JSON objects users have to the common record (see ``base.py``).

Every parser is ``parse(obj, origin, base_dir) -> record`` and raises ``BadRecord`` with a
reason. Relative image paths resolve against ``base_dir`` (the JSONL file's directory);
``<image>`` in text marks where the next image of an ``images`` list goes (LLaVA convention).

Formats (``FORMATS``):
- messages:    {"messages": [{"role", "content": str | [items]}], "images": [path, ...]}
- llava:       {"image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
                "value": str}]}  (the newline LLaVA puts after ``<image>`` is dropped)
- caption:     {"image": path, "caption" | "text": str}      -> document [image, caption]
- interleaved: {"content" | "items": [items with "image": path]} or OBELICS-style
               {"texts": [str|null], "images": [path|null]}  -> document
- text:        {"text": str}                                  -> document
- video:       {"frames": [paths], "timestamps": [s] | "fps": f, and "messages" with a
               "<video>" placeholder, or "caption"}; each frame renders as "[t.ttS]" + image
- grounding:   {"image" | "screenshot": path, "instruction": str, "action": {"type": "click",
               "x", "y"} | {"type": "box", "box": [x0, y0, x1, y1]} | {"type": "type", "text"}}
               coordinates normalized to [0, 1]; the answer is ``click(x=0.412, y=0.770)``,
               ``box(x0=..., y0=..., x1=..., y1=...)`` or ``type(text="...")``
- auto:        any of the above, told apart by their keys
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from kimi_vl_jax.data import special_tokens as st
from kimi_vl_jax.data.sources.base import BadRecord

LLAVA_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
               'bot': 'assistant', 'system': 'system'}


def _resolve(path: Any, base_dir: str, origin: str, what: str = 'image') -> str:
  if not isinstance(path, str) or not path:
    raise BadRecord('invalid_record', f'{what} path must be a non-empty string, got {path!r:.60}',
                    origin)
  full = path if os.path.isabs(path) else os.path.join(base_dir, path)
  if not os.path.isfile(full):
    raise BadRecord('missing_image', f'{what} file {path!r} not found', origin)
  return full


def _text(value: Any, field: str, origin: str) -> str:
  if not isinstance(value, str):
    raise BadRecord('invalid_record', f'"{field}" must be a string, got {type(value).__name__}',
                    origin)
  return value


def _split_placeholders(text: str, images: list, used: list, origin: str,
                        strip_newline: bool = False) -> list[dict]:
  """Text with <image> markers -> items; each marker takes the next path of ``images``."""
  items = []
  parts = text.split(st.IMAGE_PLACEHOLDER)
  for k, part in enumerate(parts):
    if k > 0:
      if used[0] >= len(images):
        raise BadRecord('image_count_mismatch', f'more {st.IMAGE_PLACEHOLDER} placeholders than '
                        f'the {len(images)} images', origin)
      items.append({'type': 'image', 'image': images[used[0]]})
      used[0] += 1
      if strip_newline and part.startswith('\n'):
        part = part[1:]
    if part:
      items.append({'type': 'text', 'text': part})
  return items


def _chat(messages: Any, images: list, origin: str, role_map=None, strip_newline=False,
          content_key='content', role_key='role') -> dict:
  if not isinstance(messages, list) or not messages:
    raise BadRecord('empty_conversation', 'no messages', origin)
  used = [0]
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise BadRecord('invalid_record', f'message {i} is not an object', origin)
    role = m.get(role_key)
    role = role_map.get(role) if role_map is not None else role
    if role not in st.ROLE_TOKENS:
      raise BadRecord('unknown_role', f'message {i}: unknown role {m.get(role_key)!r}', origin)
    content = m.get(content_key)
    items = []
    if isinstance(content, str):
      items = _split_placeholders(content, images, used, origin, strip_newline)
    elif isinstance(content, list):
      for j, item in enumerate(content):
        kind = item.get('type') if isinstance(item, dict) else None
        if kind == 'text':
          items += _split_placeholders(_text(item.get('text'), 'text', origin), images, used, origin)
        elif kind == 'image':
          ref = item.get('image', item.get('image_url', item.get('path')))
          if ref is None:            # takes the next entry of "images"
            if used[0] >= len(images):
              raise BadRecord('image_count_mismatch', f'more image items than the {len(images)} '
                              'images', origin)
            ref = images[used[0]]
            used[0] += 1
          items.append({'type': 'image', 'image': ref})
        else:
          raise BadRecord('invalid_record', f'message {i} item {j}: unknown item {item!r:.60}',
                          origin)
    else:
      raise BadRecord('invalid_record', f'message {i}: content must be a string or a list', origin)
    out.append({'role': role, 'content': items})
  if used[0] != len(images):
    raise BadRecord('image_count_mismatch', f'{len(images)} images for {used[0]} placeholders',
                    origin)
  if not any(item for m in out for item in m['content']):
    raise BadRecord('empty_conversation', 'every message is empty', origin)
  return {'kind': 'chat', 'messages': out}


def _image_list(value: Any, base_dir: str, origin: str) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list):
    raise BadRecord('invalid_record', f'images must be a path or a list, got {value!r:.60}', origin)
  return [_resolve(p, base_dir, origin) for p in value]


def _resolve_inline(record: dict, base_dir: str, origin: str) -> dict:
  """Resolves path refs of image items given inline (not through an "images" list)."""
  items = record['items'] if record['kind'] == 'document' else [
      it for m in record['messages'] for it in m['content']]
  for it in items:
    if it['type'] == 'image' and isinstance(it['image'], str) and not os.path.isabs(it['image']):
      it['image'] = _resolve(it['image'], base_dir, origin)
    elif it['type'] == 'image' and isinstance(it['image'], str):
      _resolve(it['image'], base_dir, origin)
  return record


def parse_messages(obj, origin, base_dir):
  images = _image_list(obj.get('images'), base_dir, origin)
  return _resolve_inline(_chat(obj.get('messages'), images, origin), base_dir, origin)


def parse_llava(obj, origin, base_dir):
  images = _image_list(obj.get('image'), base_dir, origin)
  return _chat(obj.get('conversations'), images, origin, role_map=LLAVA_ROLES,
               strip_newline=True, content_key='value', role_key='from')


def parse_caption(obj, origin, base_dir):
  caption = obj.get('caption', obj.get('text'))
  if caption is None:
    raise BadRecord('invalid_record', 'caption record without "caption" or "text"', origin)
  caption = _text(caption, 'caption', origin)
  if not caption:
    raise BadRecord('empty_conversation', 'empty caption', origin)
  image = _resolve(obj.get('image'), base_dir, origin)
  return {'kind': 'document', 'items': [{'type': 'image', 'image': image},
                                        {'type': 'text', 'text': caption}]}


def parse_interleaved(obj, origin, base_dir):
  if 'texts' in obj:
    texts, images = obj.get('texts'), obj.get('images')
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
      raise BadRecord('image_count_mismatch', '"texts" and "images" must be lists of equal length',
                      origin)
    items = []
    for t, im in zip(texts, images):
      if (t is None) == (im is None):
        raise BadRecord('invalid_record', 'each position needs exactly one of text or image', origin)
      items.append({'type': 'text', 'text': _text(t, 'texts', origin)} if t is not None else
                   {'type': 'image', 'image': _resolve(im, base_dir, origin)})
  else:
    raw = obj.get('content', obj.get('items'))
    if not isinstance(raw, list):
      raise BadRecord('invalid_record', 'interleaved record needs a "content" list', origin)
    items = []
    for j, it in enumerate(raw):
      kind = it.get('type') if isinstance(it, dict) else None
      if kind == 'text':
        items.append({'type': 'text', 'text': _text(it.get('text'), 'text', origin)})
      elif kind == 'image':
        items.append({'type': 'image', 'image': _resolve(it.get('image'), base_dir, origin)})
      else:
        raise BadRecord('invalid_record', f'item {j}: unknown item {it!r:.60}', origin)
  if not any(it['type'] == 'image' or it['text'] for it in items):
    raise BadRecord('empty_conversation', 'empty document', origin)
  return {'kind': 'document', 'items': items}


def parse_text(obj, origin, base_dir):
  del base_dir
  text = _text(obj.get('text'), 'text', origin)
  if not text:
    raise BadRecord('empty_conversation', 'empty text', origin)
  return {'kind': 'document', 'items': [{'type': 'text', 'text': text}]}


def _video_items(obj, origin, base_dir) -> list[dict]:
  video = obj.get('video', obj)
  if not isinstance(video, dict):
    raise BadRecord('invalid_record', '"video" must be an object with "frames"', origin)
  frames = video.get('frames')
  if not isinstance(frames, list) or not frames:
    raise BadRecord('invalid_record', 'video needs a non-empty "frames" list', origin)
  if 'timestamps' in video:
    ts = video['timestamps']
    if not isinstance(ts, list) or len(ts) != len(frames):
      raise BadRecord('invalid_timestamps', f'{len(frames)} frames but timestamps {ts!r:.60}', origin)
  elif isinstance(video.get('fps'), (int, float)) and video['fps'] > 0:
    ts = [k / video['fps'] for k in range(len(frames))]
  else:
    raise BadRecord('invalid_timestamps', 'video needs "timestamps" or a positive "fps"', origin)
  if not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in ts) or any(
      b < a for a, b in zip(ts, ts[1:])):
    raise BadRecord('invalid_timestamps', 'timestamps must be finite, >= 0 and non-decreasing',
                    origin)
  items = []
  for t, f in zip(ts, frames):
    items += [{'type': 'text', 'text': f'[{float(t):.2f}s]'},
              {'type': 'image', 'image': _resolve(f, base_dir, origin, 'frame')}]
  return items


def parse_video(obj, origin, base_dir):
  frame_items = _video_items(obj, origin, base_dir)
  if 'messages' in obj:
    record = _chat(obj['messages'], [], origin)
    n = 0
    for m in record['messages']:
      new = []
      for it in m['content']:
        if it['type'] == 'text' and st.VIDEO_PLACEHOLDER in it['text']:
          parts = it['text'].split(st.VIDEO_PLACEHOLDER)
          for k, part in enumerate(parts):
            if k:
              new += [dict(x) for x in frame_items]
              n += 1
            if part:
              new.append({'type': 'text', 'text': part})
        else:
          new.append(it)
      m['content'] = new
    if n != 1:
      raise BadRecord('image_count_mismatch', f'one video for {n} {st.VIDEO_PLACEHOLDER} '
                      'placeholders', origin)
    return record
  caption = obj.get('caption')
  if not isinstance(caption, str) or not caption:
    raise BadRecord('invalid_record', 'video record needs "messages" or a non-empty "caption"', origin)
  return {'kind': 'document', 'items': frame_items + [{'type': 'text', 'text': caption}]}


def _unit(v, name, origin) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
    raise BadRecord('invalid_action', f'{name}={v!r} is not a normalized coordinate in [0, 1]',
                    origin)
  return float(v)


def action_text(action: Any, origin: str = '') -> str:
  """The assistant's answer for a grounding/agent action (see the module docstring)."""
  if not isinstance(action, dict):
    raise BadRecord('invalid_action', f'action must be an object, got {action!r:.60}', origin)
  kind = action.get('type')
  if kind == 'click':
    x, y = _unit(action.get('x'), 'x', origin), _unit(action.get('y'), 'y', origin)
    return f'click(x={x:.3f}, y={y:.3f})'
  if kind == 'box':
    box = action.get('box')
    if not isinstance(box, list) or len(box) != 4:
      raise BadRecord('invalid_action', f'box must be [x0, y0, x1, y1], got {box!r:.60}', origin)
    x0, y0, x1, y1 = (_unit(v, n, origin) for v, n in zip(box, ('x0', 'y0', 'x1', 'y1')))
    if not (x0 < x1 and y0 < y1):
      raise BadRecord('invalid_action', f'box {box} is empty or inverted', origin)
    return f'box(x0={x0:.3f}, y0={y0:.3f}, x1={x1:.3f}, y1={y1:.3f})'
  if kind == 'type':
    return f'type(text={json.dumps(_text(action.get("text"), "text", origin), ensure_ascii=False)})'
  raise BadRecord('invalid_action', f'unknown action type {kind!r} (click, box, type)', origin)


def parse_grounding(obj, origin, base_dir):
  image = _resolve(obj.get('image', obj.get('screenshot')), base_dir, origin, 'screenshot')
  instruction = _text(obj.get('instruction'), 'instruction', origin)
  if not instruction:
    raise BadRecord('empty_conversation', 'empty instruction', origin)
  answer = action_text(obj.get('action'), origin)
  return {'kind': 'chat', 'messages': [
      {'role': 'user', 'content': [{'type': 'image', 'image': image},
                                   {'type': 'text', 'text': instruction}]},
      {'role': 'assistant', 'content': [{'type': 'text', 'text': answer}]}]}


def sniff(obj: dict) -> str:
  """The format of one JSON object, from its keys."""
  if 'messages' in obj and ('frames' in obj or 'video' in obj):
    return 'video'
  for key, fmt in (('messages', 'messages'), ('conversations', 'llava'), ('frames', 'video'),
                   ('video', 'video'), ('action', 'grounding'), ('caption', 'caption'),
                   ('content', 'interleaved'), ('items', 'interleaved'), ('texts', 'interleaved')):
    if key in obj:
      return fmt
  if 'text' in obj:
    return 'caption' if 'image' in obj else 'text'
  return ''


def parse_auto(obj, origin, base_dir):
  fmt = sniff(obj)
  if not fmt:
    raise BadRecord('invalid_record', f'cannot tell the format from keys {sorted(obj)[:8]}', origin)
  return PARSERS[fmt](obj, origin, base_dir)


PARSERS: dict[str, Callable[[dict, str, str], dict]] = {
    'messages': parse_messages, 'llava': parse_llava, 'caption': parse_caption,
    'interleaved': parse_interleaved, 'text': parse_text, 'video': parse_video,
    'grounding': parse_grounding, 'auto': parse_auto,
}
FORMATS = tuple(PARSERS) + ('arrayrecord', 'generated')
