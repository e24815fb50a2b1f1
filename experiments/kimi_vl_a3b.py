"""Kimi-VL-A3B at release scale: the released dims (SPEC §2, §3), the report's curriculum and
token budgets (SPEC §6) on a pod mesh.

``arg`` picks the pod mesh: ``v5p-256`` (default, 128 chips: fsdp 16 x expert 8) or
``v5p-64`` (32 chips: fsdp 4 x expert 8).

Budgets (tokens): MoonViT CoCa pretraining 2.0T, alignment 0.1T, joint pretraining 1.4T; the
report's ~4.4T total leaves ~0.9T for cooldown and the two long-context stages, whose split is
not published (here 0.6T / 0.2T / 0.1T). Base rows are 8K tokens with rope theta 50,000; the
long-context stages raise theta to 800,000 and rows to 32K then 128K (25% long / 75% short),
keeping ~8.4M tokens per step. SFT: one epoch at 32K (lr 2e-5 -> 2e-6), one at 128K (re-warm
1e-5 -> 1e-6), then long-CoT SFT; their data sizes are not published, so their budgets here are
placeholders to set from your data (``--config.stages.sft_1.tokens=...``).

Data: ``config.data.sources`` defaults to the generated sets so that the recipe runs (and
describes) anywhere; a production run passes its corpora, e.g.
``--config.data.sources='web=text:/data/web/*.txt@6#text;caps=jsonl:/data/caps/*.jsonl@3#mm;...'``.
"""
from kimi_vl_jax.config import base_config

_MESHES = {
    'v5p-256': dict(data=1, fsdp=16, expert=8, tensor=1),
    'v5p-64': dict(data=1, fsdp=4, expert=8, tensor=1),
}
T = 10 ** 12
B = 10 ** 9

# The ``:arg`` values this file accepts (the golden-config test snapshots each one).
ARGS = tuple(_MESHES)


def _one_row_per_device(c):
  """Gradient accumulation so that each microbatch holds one row per data-parallel chip.

  ``--mode=aot`` per chip of 95.7 GiB HBM (arguments + temporaries + outputs - aliased), on
  v5p-64 for every stage:
  - vit_pretrain: 49.4 GiB (4096 patch slots a row and 'full' remat; 16384 slots: 380 GB of
    temporaries). Its SigLIP loss still pairs each image with all 32768 captions of the step
    (an embeddings pass over the 32 microbatches of 1024 pairs first, ``train/step.py``);
  - alignment 45.7 GiB; joint_pretrain and cooldown 57.7 GiB at one 8K row per chip (two
    rows, 16 microbatches: 97.6 GiB); on v5p-256 joint_pretrain takes 45.2 GiB;
  - long_context_1, sft_1, long_cot_sft (32K rows, 'full' remat): 37.8 GiB (save_dots: the
    compiler refuses, 97.5 GB of temporaries);
  - long_context_2 and sft_2 (128K rows, 'full' remat): 73.0 GiB, with the MoE routing 32K-token
    slices of a row at a time (``model.lm.moe_token_chunk``; whole rows: 102.0 GiB, above HBM,
    from 6 GiB all-to-all buffers) and the loss reading 16K-token slices.
  A stage with fewer rows than chips gets one row per chip (sft_2 and long_context_2 on
  v5p-256: 128 rows of 128K, not the report's 64).
  """
  dp = c.mesh.data * c.mesh.fsdp * c.mesh.expert
  c.train.microbatches = max(c.train.global_batch // dp, 1)
  for name in c.stages:
    s = c.stages[name]
    if name == 'vit_pretrain':
      continue                  # single-image rows: 32768 pairs in train.microbatches steps
    rows = s.global_batch or c.train.global_batch
    if rows < dp:
      s.global_batch = rows = dp
    s.microbatches = rows // dp


def get_config(arg=None):
  if arg is not None and arg not in _MESHES:
    raise ValueError(f'unknown pod mesh {arg!r}; choose one of {", ".join(_MESHES)}')
  c = base_config('kimi_vl_a3b')
  c.name = 'kimi_vl_a3b'
  mesh = _MESHES[arg or 'v5p-256']
  for axis, size in mesh.items():
    c.mesh[axis] = size
  c.model.lm.dtype = 'bfloat16'
  c.model.vision.dtype = 'bfloat16'
  c.model.lm.remat_policy = 'save_dots'
  c.model.vision.remat_policy = 'save_dots'
  c.model.lm.rope_theta = 50000.0           # pretraining theta; long-context stages raise it
  c.train.global_batch = 1024
  c.train.seq_len = 8192
  c.train.steps = 500_000
  c.train.loss_vocab_chunk = 16384          # never materialize [B, S, 163840] fp32 logits
  c.train.loss_token_chunk = 16384          # nor a 128K row's [1, S, 16384] slice (8 GiB)
  # Expert-parallel all-to-all buffers sized for twice the mean load per destination (drops
  # past it are counted, metric 'moe_dropped'); dropless sizing (0) reserves every token's
  # k assignments at every destination: 39 GiB a chip of saved buffers on v5p-64.
  c.model.lm.moe_capacity_factor = 2.0
  # 128K rows route 32K-token slices one at a time: whole, their all-to-all buffers (6 GiB
  # each) alone overflowed a v5p chip.
  c.model.lm.moe_token_chunk = 32768
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.image_max_side = 896
  c.optim.lr = 4.2e-4
  c.optim.warmup_steps = 2000
  c.data.sources = ';'.join([
      'text=generated:text@6#text', 'math=generated:math@1#text#qa',
      'needle=generated:needle@0#text#long', 'interleaved=generated:interleaved@1#mm',
      'shapes=generated:shapes@1#mm#qa', 'ocr=generated:ocr@1#mm#qa',
      'charts=generated:charts@1#mm#qa', 'gui=generated:gui@1#mm#qa',
      'video=generated:video@1#mm#qa'])
  c.data.max_patches_per_row = 16384
  c.data.in_token_limit = 4096
  c.data.workers = 8
  s = c.stages
  s.vit_pretrain.tokens = 2 * T
  s.vit_pretrain.global_batch = 32768        # image-text pairs per step (SigLIP-style batch)
  s.vit_pretrain.image_sides = (224, 448, 896)
  s.vit_pretrain.mixture = 'shapes=1,ocr=1,charts=1,gui=1'
  s.vit_pretrain.max_patches_per_row = 4096  # one image of <= 896 px a row: 64 x 64 patches
  s.vit_pretrain.remat_policy = 'full'
  s.alignment.tokens = T // 10
  s.joint_pretrain.tokens = 14 * T // 10
  s.joint_pretrain.text_only_fraction = 0.1
  s.joint_pretrain.multimodal_share_start = 0.1
  s.joint_pretrain.multimodal_share_end = 0.5
  s.cooldown.tokens = 6 * T // 10
  s.cooldown.lr = 1e-4                       # Moonlight cooldown: re-warm to 1e-4, linear to 0
  s.cooldown.warmup_steps = 500
  s.long_context_1.tokens = 2 * T // 10
  s.long_context_1.global_batch = 256        # 32K rows, same tokens per step
  s.long_context_2.tokens = T // 10
  s.long_context_2.global_batch = 64         # 128K rows
  s.long_context_2.seq_len_scale = 16
  s.sft_1.tokens = 20 * B
  s.sft_1.seq_len_scale = 4
  s.sft_1.global_batch = 256
  s.sft_1.warmup_steps = 50
  s.sft_1.mixture = 'math=1,shapes=1,ocr=1,charts=1,gui=1,video=1,interleaved=1'
  s.sft_2.tokens = 10 * B
  s.sft_2.seq_len_scale = 16
  s.sft_2.global_batch = 64
  s.sft_2.warmup_steps = 50
  s.sft_2.mixture = s.sft_1.mixture
  s.long_cot_sft.tokens = 2 * B
  s.long_cot_sft.seq_len_scale = 4
  s.long_cot_sft.global_batch = 256
  s.long_cot_sft.mixture = 'math=1'
  _one_row_per_device(c)
  for name in ('cooldown', 'sft_1', 'sft_2', 'long_cot_sft'):
    s[name].eval = ('vqa', 'counting', 'ocr', 'caption_ppl')
  for name in ('long_context_1', 'long_context_2'):
    s[name].eval = ('needle',)
  for name in ('long_context_1', 'long_context_2', 'sft_1', 'sft_2', 'long_cot_sft'):
    s[name].remat_policy = 'full'           # 32K / 128K rows: keep only layer inputs
  return c
