"""Answer a prompt about your own images with a trained checkpoint.

    python -m kimi_vl_jax.generate --workdir=workdir/demo --image=cat.png [--image=dog.png] \\
        --prompt="How many shapes are there?"

Loads the last completed (or latest) Kimi-VL stage checkpoint in ``--workdir`` (its config is in
the checkpoint metadata), renders one user turn with the chat template (one image block per
``--image``, then the prompt), and decodes greedily until ``<|im_end|>``.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (with checkpoints/).')
_IMAGES = flags.DEFINE_multi_string('image', [], 'Image file; repeat for several images.')
_PROMPT = flags.DEFINE_string('prompt', None, 'The question.')
_STAGE = flags.DEFINE_string('stage', '', 'Stage checkpoint to use (default: the last one).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate at most.')


def find_stage(workdir: str, stage: str = '') -> str:
  from kimi_vl_jax.config.base import STAGE_NAMES
  from kimi_vl_jax.train import checkpoint as ckpt_lib
  names = [stage] if stage else [n for n in reversed(STAGE_NAMES) if n != 'vit_pretrain']
  for name in names:
    ck = ckpt_lib.StageCheckpoints(workdir, name)
    found = ck.latest_step() is not None
    ck.close()
    if found:
      return name
  raise FileNotFoundError(f'--workdir={workdir}: no Kimi-VL stage checkpoint under '
                          f'{workdir}/checkpoints/ (looked for {", ".join(names)})')


def answer(workdir: str, images, prompt: str, stage: str = '', max_new_tokens: int = 32) -> str:
  import jax
  import ml_collections
  import numpy as np
  from kimi_vl_jax.data import chat_template, image_processor as ip, patch_packing
  from kimi_vl_jax.data import special_tokens as st
  from kimi_vl_jax.data.tokenizer import load_or_train
  from kimi_vl_jax.train import checkpoint as ckpt_lib, evaluate, stages as stages_lib, tasks

  name = find_stage(workdir, stage)
  ck = ckpt_lib.StageCheckpoints(workdir, name)
  meta = ck.read_meta()
  raw = ck.restore_raw()
  ck.close()
  config = ml_collections.ConfigDict(json.loads(meta['config']))
  s = stages_lib.resolve(config, name)
  tok = load_or_train(config.data.tokenizer, config.model.lm.vocab_size, config.data.tokenizer_cache)
  image_cfg = ip.ImageProcessorConfig.from_vision_config(config.model.vision, config.data.in_token_limit)
  processed = [ip.process_image(path, image_cfg, name=path) for path in images]
  content = [{'type': 'image', 'image': path} for path in images] + [{'type': 'text', 'text': prompt}]
  ids, _ = chat_template.encode_chat([{'role': 'user', 'content': content}], tok,
                                     [im.num_patches // 4 for im in processed],
                                     add_generation_prompt=True)
  task = tasks.kimi_vl_task(s.model, config.train, media_pad_id=tok.token_id(st.MEDIA_PAD))
  seq = len(ids) + max_new_tokens
  batch = {'tokens': np.zeros((1, seq), np.int32), 'lens': np.array([len(ids)], np.int32)}
  batch['tokens'][0, :len(ids)] = ids
  if processed:
    slots = -(-sum(im.num_patches for im in processed) // 4) * 4
    packed = patch_packing.stack_packs([patch_packing.pack_images(processed, slots)])
    batch['patches'] = packed['patches']
    for k in patch_packing.PATCH_FIELDS[1:]:
      batch['patch_' + k] = packed[k]
  fn = jax.jit(evaluate.make_greedy(task, max_new_tokens))
  new = list(np.asarray(fn(raw['params'], raw.get('extra', {}), batch))[0])
  end = tok.token_id(st.IM_END)
  if end in new:
    new = new[:new.index(end)]
  return tok.decode([int(t) for t in new])


def main(argv):
  del argv
  if not _WORKDIR.value or _PROMPT.value is None:
    print('error: --workdir and --prompt are required', file=sys.stderr)
    return 2
  try:
    print(answer(_WORKDIR.value, _IMAGES.value, _PROMPT.value, _STAGE.value, _MAX_NEW.value))
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
