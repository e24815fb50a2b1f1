"""One metrics interface for everything: JSONL + TensorBoard events + a console line.

Only process 0 writes (on multi-host every process may call ``write``; the others do
nothing), so a pod run yields one log, not one per host.

    with MetricsWriter(workdir, total_steps=100) as w:
      w.write(step, {'loss': 2.3, 'lr': 1e-4})
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping, Optional, TextIO

import jax
import numpy as np


def _to_float(value) -> float:
  return float(np.asarray(jax.device_get(value)))


class MetricsWriter:
  """Writes scalars to ``<workdir>/metrics.jsonl``, TensorBoard and a progress line.

  Args:
    workdir: directory for ``metrics.jsonl`` and TensorBoard events (``tb/``).
    total_steps: enables ETA and percentage in the progress line.
    tensorboard: also write TensorBoard event files.
    progress: print a one-line progress/ETA message per write.
    stream: where the progress line goes (default stderr).
    enabled: override for tests; default ``jax.process_index() == 0``.
  """

  def __init__(self, workdir: str, total_steps: Optional[int] = None, tensorboard: bool = True,
               progress: bool = True, stream: Optional[TextIO] = None,
               enabled: Optional[bool] = None, prefix: str = ''):
    self.enabled = (jax.process_index() == 0) if enabled is None else enabled
    self.total_steps = total_steps
    self.progress = progress
    self.prefix = prefix
    self._stream = stream if stream is not None else sys.stderr
    self._start = time.monotonic()
    self._first_step: Optional[int] = None
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, scalars: Mapping[str, object]) -> None:
    """Records ``scalars`` (python numbers or 0-d arrays) at ``step``."""
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    record = {'step': int(step), 'time': time.time(), **{self.prefix + k: v for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(self.prefix + k, v, int(step))
    if self.progress:
      self._stream.write(self.progress_line(step, values) + '\n')
      self._stream.flush()

  def progress_line(self, step: int, values: Mapping[str, float]) -> str:
    if self._first_step is None:
      self._first_step = step
      self._start = time.monotonic()
    # The line has room for 8 values: the headline ones first, then the rest in order.
    ordered = sorted(values.items(), key=lambda kv: (kv[0] not in _HEADLINE, _HEADLINE.index(kv[0])
                                                      if kv[0] in _HEADLINE else 0))
    shown = ' '.join(f'{k}={_fmt(v)}' for k, v in ordered[:8])
    if not self.total_steps:
      return f'step {step} {shown}'
    done = step - self._first_step
    elapsed = time.monotonic() - self._start
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else float('nan')
    pct = 100.0 * step / self.total_steps
    return f'[{step}/{self.total_steps} {pct:5.1f}% eta {_fmt_time(eta)}] {shown}'

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_HEADLINE = ('loss', 'lr', 'grad_norm', 'tokens_per_s', 'mfu')


def _fmt(v: float) -> str:
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f'{v:.3e}'
  return f'{v:.4g}'


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '--:--'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
