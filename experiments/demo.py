"""Demo: the whole curriculum (SPEC §6) on the small preset and generated data, on CPU.

What `make demo` runs. Stages (steps): MoonViT CoCa pretraining with progressive resolution ->
alignment (LM frozen) -> joint pretraining (text-only warm-up, rising image share) -> cooldown ->
long context x4 then x16 (rope theta 50k -> 800k, 25% long needle rows) -> SFT (answers only) at
the base and x4 context -> long-CoT SFT on the math traces -> RL (policy mirror descent) on
counting problems. Held-out exact match on VQA,
counting and OCR (64 examples each, drawn like the training views: train.eval_sources) is
measured after cooldown (pre-SFT) and after the last stage; `<workdir>/report.{json,md}` puts
them beside each task's chance level and names the held-out data.
"""
from kimi_vl_jax.config import base_config

# Max image side in pixels (<= 16 LM tokens) of every generated image: ViT pretraining, the
# image sources below and the held-out evals (train.image_max_side).
_IMAGE_SIDE = 112

# Image views. Shapes are drawn on fixed 112 px canvases; words stand upright and fill a
# 112 x 56 text-line canvas. A from-scratch ViT learns little at this budget when sizes and
# layout vary (`python -m kimi_vl_jax.bench.vision_probe`, supervised, 64 images a step): OCR
# words stay at 0.04 held-out with the full tier-0 layout, reach 0.58 upright and filling a
# square 112 px canvas and 0.71 on the 112 x 56 line (150 steps); counts reach 0.35 on
# 56-112 px vs 0.62 on 112 px canvases (100 steps).
_FIXED = f'min_side={_IMAGE_SIDE}&max_side={_IMAGE_SIDE}'
_UPRIGHT = f'{_FIXED}&max_angle=0&min_fill=0.95&aspect=2'

_SOURCES = ';'.join([
    'text=generated:text@2#text',
    'math=generated:math@1#text#qa',
    'needle=generated:needle@0#text#long',
    f'shapes=generated:shapes?{_FIXED}@3#mm#qa',
    f'ocr=generated:ocr?{_UPRIGHT}@2#mm#qa',
    f'charts=generated:charts?max_side={_IMAGE_SIDE}@1#mm#qa',
    # Single-task views for the SFT mixtures (weight 0: not in pretraining).
    f'counting=generated:shapes?tasks=count&{_FIXED}@0#mm#qa',
    f'kinds=generated:shapes?tasks=shape&{_FIXED}@0#mm#qa',
    f'scenes=generated:shapes?tasks=caption&{_FIXED}@0#mm#qa',
    f'words=generated:ocr?tasks=ocr_word&{_UPRIGHT}@0#mm#qa',
])

_EVAL = ('vqa', 'counting', 'ocr', 'caption_ppl')

# The image SFT mixture. Math only as a trace of replay: the loss is a mean over answer tokens,
# and one math trace has ~100 of them to a word answer's 2, so with math=1 of 10 in the mixture
# ~90% of the gradient went to math and held-out OCR reached 0.31 after 120 steps (0.69
# without math, same steps). With no math at all the LM forgot it (math loss 8.4, above
# uniform, at the end of long-CoT SFT); math=0.05 kept it near 1.3 at ~1/3 of the tokens.
_SFT_IMAGES = 'shapes=2,counting=2,words=3,charts=1,math=0.05'


def _fine_tune(stage, *, steps, lr, end_lr, warmup, mixture, evals=None):
  """One SFT-style stage: budget, lr schedule, mixture and (optionally) its evals."""
  stage.steps = steps
  stage.lr = lr
  stage.end_lr = end_lr
  stage.warmup_steps = warmup
  stage.mixture = mixture
  if evals is not None:
    stage.eval = evals


def get_config(arg=None):
  del arg
  c = base_config('small')
  c.name = 'demo'
  c.mesh.data = -1
  c.train.global_batch = 8
  c.train.seq_len = 256
  c.train.image_max_side = _IMAGE_SIDE
  c.train.eval_examples = 64
  c.train.caption_len = 20       # the longest answer caption (a scene) is 18 tokens + BOS/EOS
  c.train.eval_sources = 'vqa=shapes,counting=counting,ocr=words'   # held out like the views
  c.train.checkpoint_every = 50
  c.optim.lr = 3e-3            # small model, few steps: a higher peak than Moonlight's 4.2e-4
  c.optim.warmup_steps = 10
  c.model.lm.router_bias_update_rate = 1e-2   # few steps: a faster aux-loss-free balance
  c.data.sources = _SOURCES
  c.data.max_patches_per_row = 512   # several images per row: more image-question pairs per step
  c.data.in_token_limit = 256
  c.metrics.log_every = 5
  s = c.stages
  s.vit_pretrain.steps = 170
  s.vit_pretrain.global_batch = 64          # one image + caption per row: many small rows
  s.vit_pretrain.max_patches_per_row = 64   # a 112 x 112 image (8 x 8 patches) fills a row
  s.vit_pretrain.image_sides = (56, 112, 112, 112)   # equal phases: a quarter at 56 px
  s.vit_pretrain.mixture = 'shapes=1,words=3,counting=2,charts=1'
  # Answer-only captions: every caption token depends on the image, and SigLIP negatives in a
  # batch differ in content, not in question template.
  s.vit_pretrain.caption_text = 'answer'
  s.alignment.steps = 10
  s.alignment.mixture = 'shapes=1,ocr=1,charts=1'
  s.joint_pretrain.steps = 30
  # Mostly text: rows held ~5 real image patches of 512 slots (cooldown ~50), and the tower runs
  # on every slot; fewer slots make a step cheaper (1.93 -> 1.55 s with 160), and 256 leaves
  # room for the image-richer end of the stage.
  s.joint_pretrain.max_patches_per_row = 256
  s.joint_pretrain.text_only_fraction = 0.1
  s.joint_pretrain.multimodal_share_start = 0.3
  s.joint_pretrain.multimodal_share_end = 0.8
  s.cooldown.steps = 15
  s.cooldown.max_patches_per_row = 256
  s.cooldown.eval = _EVAL
  s.long_context_1.steps = 2
  s.long_context_1.mixture = 'text=1,needle=1,shapes=1,ocr=1'
  s.long_context_2.steps = 2
  s.long_context_2.global_batch = 2
  s.long_context_2.mixture = 'text=1,needle=1,shapes=1,ocr=1'
  s.sft_1.max_patches_per_row = 448   # its rows held at most 448 real patches (mean 352)
  _fine_tune(s.sft_1, steps=190, lr=2e-3, end_lr=2e-4, warmup=5, mixture=_SFT_IMAGES, evals=())
  _fine_tune(s.sft_2, steps=5, lr=1e-4, end_lr=1e-5, warmup=2, mixture=_SFT_IMAGES)
  # sft_1's row shape (and rope theta): the two run one compiled program (train/step.py).
  s.long_cot_sft.max_patches_per_row = 448
  _fine_tune(s.long_cot_sft, steps=5, lr=1e-4, end_lr=1e-5, warmup=2,
             mixture='math=2,shapes=1,counting=1,words=1')
  # RL (SPEC §5): counting problems drawn like the 'counting' view, 4 problems x 4 samples an
  # iteration scored by their verifier (exact count), with the length penalty.
  s.rl.enabled = True
  s.rl.steps = 4
  s.rl.global_batch = 16
  s.rl.lr = 1e-5
  s.rl.max_patches_per_row = 64            # one 112 px image
  s.rl.eval = _EVAL
  c.rl.source = 'counting'
  c.rl.tasks = ('count',)
  c.rl.difficulties = (0,)
  c.rl.problems_per_difficulty = 64
  c.rl.samples_per_prompt = 4
  c.rl.max_response_tokens = 8
  c.rl.length_penalty_weight = 0.1
  return c
