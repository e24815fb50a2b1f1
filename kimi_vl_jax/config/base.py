"""The experiment schema: every key an experiment may set, with its default.

Experiment files (``experiments/*.py``) start from ``base_config(preset)`` and override
values; ``validate`` rejects any key that is not in this schema, so a typo in an
experiment or a ``--config.x.y=`` override is an error, not a silently ignored setting.
"""
from __future__ import annotations

import ml_collections

from kimi_vl_jax.config import presets


def base_config(preset: str = 'small') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'experiment'
  c.model = presets.get_preset(preset)

  # Mesh axis sizes; -1 takes the devices the other axes leave (at most one -1).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))

  c.train = ml_collections.ConfigDict(dict(
      seed=0,
      global_batch=8,          # sequences per step, over all processes
      seq_len=256,             # tokens per packed row
      steps=10,
      microbatches=1,          # gradient accumulation
      grad_clip_norm=1.0,      # 0 = off
      max_consecutive_nonfinite=3,
      # Trainer (kimi_vl_jax/train/).
      param_cast_dtype='none',   # none | bfloat16: bf16 forward/backward from fp32 master weights
      loss_vocab_chunk=0,        # > 0: CE over vocabulary chunks of this size (no full logits)
      loss_token_chunk=0,        # > 0 (with loss_vocab_chunk): and over sequence slices of this
                                 # many tokens (long rows: one logits block is [B, this, vocab chunk])
      checkpoint_every=0,        # steps between checkpoints inside a stage (0 = stage end only)
      keep_checkpoints=2,        # last N per stage (each stage's final is kept as well)
      async_checkpoints=True,
      # Persistent XLA compilation cache: 'auto' = <workdir>/compilation_cache unless
      # jax_compilation_cache_dir is already set (env or jax.config); '' = off; else a path.
      # Stages that run the same program (step.py) and resumed runs skip compiling.
      compilation_cache='auto',
      profile_start=-1,          # step (within each stage) of the first traced step (-1 = off)
      profile_steps=3,
      image_max_side=224,        # max image side in pixels of vit_pretrain (stage image_sides
                                 # override) and of the held-out eval images (train/evaluate.py)
      caption_len=32,            # caption tokens per example in vit_pretrain
      eval_examples=32,          # held-out examples per eval set (train/evaluate.py)
      eval_sources='',           # 'ocr=words,...': an eval set draws images like that data.sources
                                 # view (sides, layout); default: image_max_side only
      init_from='',              # first stage starts from: HF Kimi-VL dir or converted Orbax dir
  ))
  c.stages = stages_schema()

  c.optim = ml_collections.ConfigDict(dict(
      name='muon',             # muon | adamw
      lr=4.2e-4,
      end_lr_ratio=0.1,        # cosine floor as a fraction of lr (4.2e-5 / 4.2e-4)
      warmup_steps=2,
      schedule='cosine',       # cosine | linear | constant
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      momentum=0.95,
      ns_steps=5,
      # Newton-Schulz operands: bfloat16 (Moonlight's and Keller Jordan's reference choice;
      # products accumulate in fp32) or float32. bf16 NS is ~3x faster on the bench preset's
      # CPU (AMX) and on accelerators; its directions differ from fp32's by ~2% (rounding).
      ns_dtype='bfloat16',     # bfloat16 | float32
  ))

  # Data pipeline (kimi_vl_jax/data/): sources, tokenizer, packing, workers.
  c.data = ml_collections.ConfigDict(dict(
      # 'name=format:path@weight#tag;...' (data/mixture.py); tags text|mm|long|qa. Default: the
      # embedded generated datasets (no downloads).
      sources=('shapes=generated:shapes@2;ocr=generated:ocr@2;charts=generated:charts@1;'
               'gui=generated:gui@1;video=generated:video@1;interleaved=generated:interleaved@1;'
               'needle=generated:needle@1#text#long;math=generated:math@1#text#qa;'
               'text=generated:text@2#text'),
      split='train',           # split of generated sources
      seed=0,                  # example i of process p is a pure function of (seed, p, i)
      tokenizer='',            # sentencepiece .model; '' = the project tokenizer (trained once, cached)
      tokenizer_cache='',      # '' = $KIMI_VL_JAX_CACHE or ~/.cache/kimi_vl_jax
      workers=0,               # grain mp_prefetch worker processes (0 = in this process)
      worker_buffer=4,         # examples buffered per worker (and per reader thread pool)
      read_threads=2,          # threads per process that build examples (grain ReadOptions)
      max_patches_per_row=1024,  # patch slots per packed row (0 = text only)
      in_token_limit=1024,     # image processor's patch limit per image (released: 4096)
      max_images_per_example=64,
      overflow='truncate',     # examples longer than seq_len: truncate | drop
      pack_lookahead=8,        # a batch is emitted once this many examples wait for room
      examples_per_step=0,     # schedule clock: stream examples per step (0 = estimated from data)
      qa_share_cap=-1.0,       # cap on the share of 'qa' sources (cooldown: 0.1); < 0 = off
      strict=False,            # the first bad record raises (naming file:line) instead of skipping
  ))

  # Reinforcement learning (SPEC §5; the 'rl' stage, kimi_vl_jax/rl/). tau, k and the length
  # penalty's weight are not published: set them per experiment.
  # User problems: rl.problems names JSONL files (a path, glob or comma-separated list), one
  # chat problem a line with "answer", "verifier" (exact | numeric | choice | click) and an
  # integer "difficulty" (format: kimi_vl_jax/rl/problems.py). When set, it replaces the
  # generated pool: dataset/source/tasks are ignored, difficulties keeps the lines with those
  # labels, and problems_per_difficulty is the most taken of each (first in file order).
  c.rl = ml_collections.ConfigDict(dict(
      model='kimi_vl',           # the policy: kimi_vl | lm
      problems='',               # user problems (JSONL path/glob/list); '' = generated ones
      dataset='math',            # generated dataset of the problems (its verifier scores them)
      source='',                 # or a generated data.sources entry: its dataset and image view
      tasks=('arithmetic', 'word_problem'),
      difficulties=(0, 1, 2),    # the pool holds problems of each difficulty (curriculum order)
      problems_per_difficulty=256,   # generated: exactly this many each; rl.problems: at most
      samples_per_prompt=8,      # k responses per problem; stage global_batch = problems * k
      tau=0.1,                   # mirror-descent regularization toward the sampling policy
      temperature=1.0,
      top_p=1.0,
      max_response_tokens=64,
      partial_rollout_tokens=0,  # > 0: decode at most this many a row per iteration; unfinished
                                 # responses continue next iteration (kimi_vl_jax/rl/partial.py)
      updates_per_iteration=1,   # train steps on one iteration's rollouts
      length_penalty_weight=0.0,
      length_penalty_warmup=0,   # iterations before the length penalty applies
      sampling='prioritized',    # uniform | curriculum | prioritized
  ))

  c.metrics = ml_collections.ConfigDict(dict(
      log_every=1,
      tensorboard=True,
      progress=True,
  ))
  return c


# The curriculum of SPEC §6, in order. Each stage starts from the previous one's last checkpoint.
STAGE_NAMES = ('vit_pretrain', 'alignment', 'joint_pretrain', 'cooldown', 'long_context_1',
               'long_context_2', 'sft_1', 'sft_2', 'long_cot_sft', 'rl')


def stage_block(**overrides) -> ml_collections.ConfigDict:
  """One stage's block (``config.stages.<name>``); 0 / -1 / '' mean "inherit from train/optim"."""
  block = dict(
      enabled=True,
      task='kimi_vl',            # kimi_vl | lm | vit_pretrain | rl
      steps=0,                   # budget in optimizer steps (0: derive from tokens); rl: iterations
      tokens=0,                  # budget in (padded) tokens = steps * global_batch * seq_len
      global_batch=0,            # 0 = train.global_batch
      microbatches=0,            # gradient accumulation in this stage (0 = train.microbatches)
      seq_len_scale=1,           # rows of train.seq_len * scale tokens (long context: 4, 16)
      max_patches_per_row=0,     # patch slots per row in this stage (0 = data.max_patches_per_row)
      lr=0.0,                    # peak lr (0 = optim.lr)
      end_lr=-1.0,               # final lr (-1 = lr * optim.end_lr_ratio)
      warmup_steps=-1,           # -1 = optim.warmup_steps
      schedule='',               # '' = optim.schedule
      trainable=(),              # regexes over '/'-joined param paths; () = everything trains
      rope_theta=0.0,            # LM rope theta in this stage (0 = model.lm.rope_theta)
      remat_policy='',           # '' = the model's; none | full | save_dots for LM and vision here
      router_bias_rate=-1.0,     # -1 = model.lm.router_bias_update_rate; 0 freezes the bias
      mixture='',                # 'source=weight,...' over the data sources
      text_only_fraction=0.0,    # first fraction of the stage is text-only
      multimodal_share_start=1.0,  # multimodal share right after the text-only warm-up ...
      multimodal_share_end=1.0,    # ... rising linearly to this at the stage end
      long_fraction=0.0,         # share of rows that are long documents (rest: short replay)
      image_sides=(),            # progressive resolution: max image side per equal phase
      loss_on='all',             # all | assistant (SFT: answers and the tokens that end them)
      caption_text='question_answer',  # vit_pretrain text of a QA record: question_answer | answer
      eval=(),                   # eval sets: vqa, ocr, counting, caption_ppl, needle
      eval_every=0,              # steps between evals (0 = stage end only)
  )
  block.update(overrides)
  return ml_collections.ConfigDict(block)


def stages_schema() -> ml_collections.ConfigDict:
  """The recipe's stage defaults (SPEC §6); experiments set budgets and mixtures."""
  vision_side = (r'^vision_tower/', r'^multi_modal_projector/')
  return ml_collections.ConfigDict(dict(
      vit_pretrain=stage_block(task='vit_pretrain', image_sides=(112, 224)),
      alignment=stage_block(trainable=vision_side),
      joint_pretrain=stage_block(text_only_fraction=0.2, multimodal_share_start=0.1,
                                 multimodal_share_end=0.5),
      cooldown=stage_block(router_bias_rate=0.0, schedule='linear', end_lr=0.0,
                           multimodal_share_start=0.5, multimodal_share_end=0.5),
      long_context_1=stage_block(rope_theta=800000.0, seq_len_scale=4, long_fraction=0.25,
                                 multimodal_share_start=0.5, multimodal_share_end=0.5),
      long_context_2=stage_block(rope_theta=800000.0, seq_len_scale=16, long_fraction=0.25,
                                 multimodal_share_start=0.5, multimodal_share_end=0.5),
      sft_1=stage_block(rope_theta=800000.0, lr=2e-5, end_lr=2e-6, loss_on='assistant',
                        router_bias_rate=0.0),
      sft_2=stage_block(rope_theta=800000.0, lr=1e-5, end_lr=1e-6, seq_len_scale=4,
                        loss_on='assistant', router_bias_rate=0.0),
      long_cot_sft=stage_block(rope_theta=800000.0, lr=1e-5, end_lr=1e-6, loss_on='assistant',
                               router_bias_rate=0.0),
      # Off unless an experiment turns it on (it needs an SFT'd policy and a budget in steps).
      rl=stage_block(enabled=False, task='rl', rope_theta=800000.0, lr=1e-6, schedule='constant',
                     warmup_steps=0, router_bias_rate=0.0, global_batch=64),
  ))
