"""RL rollouts on the host: problems -> prompt rows -> sampled responses -> training rows.

A problem is a chat record with a verifiable answer: a generated one (``data/generated``) or a
user's (``rl.problems``, ``rl/problems.py``); either way its last message is the reference
answer and ``scoring.is_correct`` the verifier. One iteration takes P
problems, repeats each prompt k times (rows p*k .. p*k+k-1), samples the responses with the
current policy (``evaluate.make_decoder`` at the RL temperature), and turns each (prompt,
response) into one training row: tokens = prompt ids + response ids (up to and including
``<|im_end|>`` when it was produced), ``loss_mask`` = 1 on the response tokens only, so a
row's sequence log-probability is the sum of its response tokens' log-probabilities.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from kimi_vl_jax.data import patch_packing
from kimi_vl_jax.data.generated import get_dataset, is_correct
from kimi_vl_jax.rl import problems as problems_lib
from kimi_vl_jax.train import evaluate


@dataclasses.dataclass
class ProblemPool:
  """The user problems of ``rl.problems`` when set, else the generated problems of
  ``rl.dataset`` / ``rl.tasks`` (train split); either at each of ``rl.difficulties``."""
  records: list
  difficulty: np.ndarray        # [N] int: the difficulty label (curriculum order)

  @classmethod
  def from_config(cls, config) -> 'ProblemPool':
    """``rl.problems``: the JSONL problems whose difficulty is in ``rl.difficulties``, at most
    ``rl.problems_per_difficulty`` of each (``problems.load_pool``; a bad line raises).
    Generated: exactly ``rl.problems_per_difficulty`` of each difficulty; images are drawn like
    the ``data.sources`` view ``rl.source`` names (its dataset and layout options; ``rl.tasks``
    picks the tasks), else at most ``train.image_max_side``."""
    rl = config.rl
    if rl.get('problems', ''):
      records, difficulty = problems_lib.load_pool(
          rl.problems, tuple(rl.difficulties), int(rl.problems_per_difficulty),
          text_only=rl.model == 'lm')
      return cls(records, difficulty)
    dataset, view = problem_view(config)
    records, difficulty = [], []
    for d in rl.difficulties:
      ds = get_dataset(dataset, 'train', config.data.seed,
                       **{**view, 'tasks': tuple(rl.tasks), 'difficulty': int(d)})
      records += [ds[i] for i in range(int(rl.problems_per_difficulty))]
      difficulty += [int(d)] * int(rl.problems_per_difficulty)
    return cls(records, np.asarray(difficulty, np.int32))

  def check_fits(self, stage_name: str, global_batch: int, k: int) -> None:
    """An iteration's ``global_batch // k`` distinct problems must fit the pool (the config
    check can only bound a user pool's size; its real size is known here)."""
    from kimi_vl_jax.config.validate import ConfigError
    need = global_batch // k
    if need > len(self.records):
      raise ConfigError(f'config.stages.{stage_name}.global_batch: {global_batch} rows need '
                        f'{need} distinct problems an iteration, but the pool holds '
                        f'{len(self.records)} (rl.problems filtered by rl.difficulties, at most '
                        'rl.problems_per_difficulty each)')


def problem_view(config) -> tuple[str, dict]:
  """(generated dataset, generator keyword args) of the RL problems."""
  rl = config.rl
  if rl.source:
    from kimi_vl_jax.data.mixture import generated_views
    dataset, kw = generated_views(config.data.sources)[rl.source]
    return dataset, {k: v for k, v in kw.items() if k != 'tasks'}
  return rl.dataset, {'max_side': int(config.train.image_max_side)}


@dataclasses.dataclass
class Rollout:
  """One iteration's samples: rows p*k + j hold sample j of problem p."""
  problems: list                # [P] records
  prompt_ids: list              # [P*k] prompt token ids
  images: list                  # [P*k] processed images of the prompt
  response_ids: list            # [P*k] response ids (ending with the stop token if produced)
  texts: list                   # [P*k] decoded responses (before the stop token)
  correct: np.ndarray           # [P, k] float {0, 1}
  lengths: np.ndarray           # [P, k] int response tokens
  finished: np.ndarray          # [P, k] bool: produced the stop token


def prompt_rows(problems, k: int, tok, image_cfg, seq_len: int, max_new: int, patches: int):
  """Decoder rows for ``problems`` repeated k times: (prompts, rows) as ``evaluate`` builds them
  (tokens [P*k, S] right-padded, lens, patch buffers when ``patches``)."""
  prompts = [evaluate._prompt(r, tok, image_cfg, seq_len - max_new) for r in problems]
  prompts = [p for p in prompts for _ in range(k)]
  return prompts, decoder_rows(prompts, max_new, seq_len, patches)


def decoder_rows(prompts, max_new: int, seq_len: int, patches: int) -> dict:
  """Rows holding each (ids, images) prompt plus ``max_new`` new tokens (``evaluate._rows``)."""
  seq, slots = evaluate._eval_shape(prompts, max_new, seq_len, patches)
  return evaluate._rows(prompts, seq, len(prompts), slots if patches else 0)


def collect(problems, k: int, prompts, new_tokens: np.ndarray, tok, stop_id: int) -> Rollout:
  """Scores sampled ``new_tokens`` [P*k, max_new] against each problem's verifier."""
  responses = []
  for row in np.asarray(new_tokens)[:len(prompts)]:
    ids = [int(i) for i in row]
    responses.append(ids[:ids.index(stop_id) + 1] if stop_id in ids else ids)
  return score(problems, k, prompts, responses, tok, stop_id)


def score(problems, k: int, prompts, responses, tok, stop_id: int) -> Rollout:
  """The Rollout of whole responses (token ids [P*k], ending with ``stop_id`` when it was
  produced) to ``problems`` [P], each prompt ((ids, images) [P*k]) sampled k times."""
  texts, finished = [], []
  for ids in responses:
    done = bool(ids) and ids[-1] == stop_id
    finished.append(done)
    texts.append(tok.decode(ids[:-1] if done else ids))
  p = len(problems)
  correct = np.array([float(is_correct(problems[i // k], t)) for i, t in enumerate(texts)])
  lengths = np.array([len(r) for r in responses])
  return Rollout(problems, [ids for ids, _ in prompts], [im for _, im in prompts],
                 [list(r) for r in responses], texts, correct.reshape(p, k),
                 lengths.reshape(p, k), np.array(finished).reshape(p, k))


def training_rows(rollout: Rollout, seq_len: int, patches: int, batch: int) -> dict:
  """Rows of prompt + response for the RL loss: the LM keys (``tasks.LM_KEYS``), patch buffers
  when ``patches``, and 'rl_weight' [batch] (1 real row, 0 padding up to ``batch``)."""
  n = len(rollout.prompt_ids)
  if n > batch:
    raise ValueError(f'{n} rollout rows exceed the stage batch {batch}')
  out = {key: np.zeros((batch, seq_len), np.int32)
         for key in ('tokens', 'segment_ids', 'positions', 'loss_mask', 'source_ids')}
  out['rl_weight'] = np.zeros((batch,), np.float32)
  packs = []
  for i in range(batch):
    j = i if i < n else 0            # padding rows repeat row 0 with weight 0
    prompt, response = rollout.prompt_ids[j], rollout.response_ids[j]
    ids = (list(prompt) + list(response))[:seq_len]
    t = len(ids)
    out['tokens'][i, :t] = ids
    out['segment_ids'][i, :t] = 1
    out['positions'][i, :t] = np.arange(t)
    out['loss_mask'][i, len(prompt):t] = 1
    out['rl_weight'][i] = 1.0 if i < n else 0.0
    if patches:
      packs.append(patch_packing.pack_images(rollout.images[j], patches))
  if patches:
    stacked = patch_packing.stack_packs(packs)
    out['patches'] = stacked['patches']
    for key in patch_packing.PATCH_FIELDS[1:]:
      out['patch_' + key] = stacked[key]
  return out
