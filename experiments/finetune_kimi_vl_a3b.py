"""SFT of Kimi-VL-A3B from a converted Hugging Face checkpoint on your own chat JSONL.

    python -m kimi_vl_jax.main --mode=train \\
      --config=experiments/finetune_kimi_vl_a3b.py:/ckpt/Kimi-VL-A3B-Instruct,/data/chat/*.jsonl \\
      --workdir=workdir/ft

``arg`` = '<checkpoint dir>,<jsonl glob>'. The checkpoint is a Hugging Face Kimi-VL directory
(config.json + safetensors) or the Orbax directory ``python -m kimi_vl_jax.convert`` wrote; the
model dims come from the A3B preset, which matches the release (SPEC §2, §3). JSONL records (format ``messages``) are
chat messages (``data/sources``: {'messages': [{'role', 'content'}]}, images by path); the loss
covers only assistant answers and the ``<|im_end|>`` ending them. Two stages as in the report's
SFT: 32K context at lr 2e-5 -> 2e-6, then 128K re-warmed to 1e-5 -> 1e-6 (budgets: one epoch of
your data; set ``--config.stages.sft_1.tokens``).

Chips: the mesh is expert 8 x fsdp (the rest). ``--mode=aot`` per chip of a v5p's 95.7 GiB:
on 16 chips (``--topology=v5p:2x2x4``) sft_1 takes 47.0 GiB and sft_2 79.3 GiB; on 8 chips
sft_1 fits with two microbatches (90.7 GiB, ``--config.stages.sft_1.microbatches=2``), sft_2
does not (104.4 GiB). As in kimi_vl_a3b.py, long rows use 'full' remat, the MoE routes 32K-token
slices and the loss 16K-token slices.

The released checkpoint's embeddings follow the released tokenizer (SPEC §7). A Hugging Face
directory ships it (``tiktoken.model`` + ``tokenizer_config.json``), and then it is used
(``data/tiktoken_tokenizer.py``); for a converted Orbax directory point
``--config.data.tokenizer`` at the original checkpoint directory.
"""
import os

from kimi_vl_jax.config import base_config

_MESH = dict(data=1, fsdp=-1, expert=8, tensor=1)


def get_config(arg=None):
  ckpt, _, data = (arg or ',').partition(',')
  c = base_config('kimi_vl_a3b')
  c.name = 'finetune_kimi_vl_a3b'
  for axis, size in _MESH.items():
    c.mesh[axis] = size
  c.model.lm.dtype = 'bfloat16'
  c.model.vision.dtype = 'bfloat16'
  c.model.lm.remat_policy = 'save_dots'
  c.model.vision.remat_policy = 'save_dots'
  c.model.lm.rope_theta = 800000.0
  c.train.init_from = ckpt
  if ckpt and os.path.exists(os.path.join(ckpt, 'tiktoken.model')):
    c.data.tokenizer = ckpt                 # the release's vocabulary: its embeddings' ids
  c.train.global_batch = 64
  c.train.seq_len = 8192
  # Long rows, as in kimi_vl_a3b.py: expert-parallel buffers for twice the mean load (drops
  # are counted), 128K rows routed in 32K slices, and the loss over 16K-token slices.
  c.model.lm.moe_capacity_factor = 2.0
  c.model.lm.moe_token_chunk = 32768
  c.train.loss_vocab_chunk = 16384
  c.train.loss_token_chunk = 16384
  c.train.checkpoint_every = 200
  c.data.sources = f'chat=messages:{data}@1#mm' if data else 'chat=generated:shapes@1#mm#qa'
  c.data.max_patches_per_row = 16384
  c.data.in_token_limit = 4096
  for name in c.stages:
    c.stages[name].enabled = name in ('sft_1', 'sft_2')
  # One row per chip per microbatch on 16 chips (v5p-32: expert 8 x fsdp 2); more chips need
  # at least one row each: raise the stages' global_batch.
  s = c.stages
  s.sft_1.tokens = 2 * 10 ** 9
  s.sft_1.seq_len_scale = 4
  s.sft_1.global_batch = 16
  s.sft_1.warmup_steps = 20
  s.sft_1.mixture = ''
  s.sft_2.tokens = 10 ** 9
  s.sft_2.seq_len_scale = 16
  s.sft_2.global_batch = 16
  s.sft_2.warmup_steps = 20
  for name in ('sft_1', 'sft_2'):
    s[name].remat_policy = 'full'           # 32K / 128K rows: keep only layer inputs
  return c
