"""Stage and run reports: a PNG of loss and eval curves, a markdown summary and ``report.json``.

``python -m kimi_vl_jax.train.report --workdir=DIR`` rewrites the run report from the
checkpoints (the loop also does after every stage).

``<workdir>/<stage>/metrics.jsonl`` (written by MetricsWriter) is the only input for the curves;
eval results come from each stage's final checkpoint metadata, so a resumed or partially re-run
curriculum still produces the full report.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from kimi_vl_jax.metrics.writer import read_jsonl


def stage_plot(stage_dir: str, stage: str) -> Optional[str]:
  """Writes ``<stage_dir>/curves.png`` (train loss; eval metrics if any); returns its path."""
  path = os.path.join(stage_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  # A resumed stage re-logs the steps after its checkpoint: keep the last record of each step.
  by_step = {}
  for r in read_jsonl(path):
    by_step.setdefault(r['step'], {}).update(r)
  rows = [by_step[k] for k in sorted(by_step)]
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  train = [(r['step'], r['loss']) for r in rows if 'loss' in r]
  evals = {}
  for r in rows:
    for k, v in r.items():
      if k.startswith('eval/'):
        evals.setdefault(k, []).append((r['step'], v))
  fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.5), squeeze=False)
  ax = axes[0][0]
  if train:
    ax.plot(*zip(*train), label='train loss')
  ax.set_title(f'{stage}: loss')
  ax.set_xlabel('step')
  ax.legend()
  if evals:
    ax = axes[0][1]
    for k, pts in sorted(evals.items()):
      ax.plot(*zip(*pts), marker='o', label=k[5:])
    ax.set_title(f'{stage}: eval')
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  fig.tight_layout()
  out = os.path.join(stage_dir, 'curves.png')
  fig.savefig(out, dpi=80)
  plt.close(fig)
  return out


def stage_markdown(stage_dir: str, stage: str, summary: dict) -> str:
  lines = [f'# Stage {stage}', '']
  for k, v in summary.items():
    if isinstance(v, dict):
      continue
    lines.append(f'- {k}: {v}')
  evals = summary.get('eval', {})
  if evals:
    lines += ['', '| eval | value |', '| --- | --- |']
    lines += [f'| {k} | {v:.4f} |' for k, v in sorted(evals.items())]
  lines += ['', '![curves](curves.png)', '']
  path = os.path.join(stage_dir, 'report.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))
  return path


def run_report(workdir: str, stage_summaries: dict, accuracy_tasks: dict,
               held_out: Optional[dict] = None) -> dict:
  """The run's ``report.json`` + ``report.md``: every stage's summary, and per task the held-out
  exact match before SFT (last pre-SFT stage with evals), after SFT (the last SFT or RL stage
  with evals) and chance;
  ``held_out`` ({task: text}) says which generated data each task was scored on."""
  pre = post = None
  for name, s in stage_summaries.items():
    if not s.get('eval'):
      continue
    if name.startswith(('sft', 'long_cot', 'rl')):   # post-training
      post = name
    else:
      pre = name
  tasks = {}
  for task, chance in accuracy_tasks.items():
    key = f'exact_match/{task}'
    row = {'chance': chance}
    if held_out and task in held_out:
      row['held_out'] = held_out[task]
    if pre is not None and key in stage_summaries[pre]['eval']:
      row['before_sft'] = stage_summaries[pre]['eval'][key]
    if post is not None and key in stage_summaries[post]['eval']:
      row['after_sft'] = stage_summaries[post]['eval'][key]
    tasks[task] = row
  report = {'stages': stage_summaries, 'pre_sft_stage': pre, 'final_stage': post, 'tasks': tasks}
  with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2, sort_keys=True)
  lines = ['# Run report', '', '| task | chance | before SFT | after SFT | held-out data |',
           '| --- | --- | --- | --- | --- |']
  fmt = lambda x: '-' if x is None else f'{x:.3f}'
  for task, row in tasks.items():
    lines.append(f'| {task} | {fmt(row["chance"])} | {fmt(row.get("before_sft"))} | '
                 f'{fmt(row.get("after_sft"))} | {row.get("held_out", "-")} |')
  lines += ['', '| stage | steps | final loss | tokens seen | wall s |', '| --- | --- | --- | --- | --- |']
  for name, s in stage_summaries.items():
    lines.append(f'| {name} | {s.get("steps")} | {fmt(s.get("final_loss"))} | {s.get("tokens_seen")} | '
                 f'{fmt(s.get("wall_s"))} |')
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return report


def main(argv):
  del argv
  from absl import flags
  from kimi_vl_jax.train import loop
  out = loop.write_run_report(flags.FLAGS.workdir)
  print(json.dumps(out['tasks'], indent=2))


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
  app.run(main)
