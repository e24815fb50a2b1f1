"""MetricsWriter: JSONL records, a readable TensorBoard event file, the progress/ETA line,
and a disabled writer (any process but 0) that writes nothing."""
import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from kimi_vl_jax.metrics import writer as writer_lib
from kimi_vl_jax.metrics.writer import MetricsWriter, read_jsonl


def read_tb_scalars(directory):
  """{tag: [(step, value)]} from the TFRecord event files in ``directory``, CRCs checked."""
  files = glob.glob(os.path.join(directory, 'events.out.tfevents.*'))
  assert files, f'no event file in {directory}'
  scalars = {}
  for path in files:
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack('Q', header)
      (header_crc,) = struct.unpack('I', data[pos + 8:pos + 12])
      assert header_crc == masked_crc32c(header), f'corrupt record header at byte {pos}'
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack('I', data[pos + 12 + length:pos + 16 + length])
      assert body_crc == masked_crc32c(body), f'corrupt record body at byte {pos}'
      pos += 16 + length
      event = event_pb2.Event.FromString(body)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_jsonl_and_tensorboard(tmp_path):
  stream = io.StringIO()
  with MetricsWriter(str(tmp_path), total_steps=3, stream=stream, enabled=True) as w:
    w.write(1, {'loss': jnp.float32(2.5), 'lr': 1e-4})
    w.write(2, {'loss': np.float32(2.0), 'lr': 2e-4, 'tokens': jnp.asarray(4096)})
  records = read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2]
  assert records[0]['loss'] == 2.5 and records[0]['lr'] == pytest.approx(1e-4)
  assert records[1]['tokens'] == 4096.0
  assert all(isinstance(r['time'], float) for r in records)
  scalars = read_tb_scalars(str(tmp_path / 'tb'))
  assert scalars['loss'] == [(1, 2.5), (2, 2.0)]
  assert [s for s, _ in scalars['lr']] == [1, 2]
  assert scalars['lr'][1][1] == pytest.approx(2e-4)
  assert scalars['tokens'] == [(2, 4096.0)]


def test_prefix_and_resume_appends(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False, progress=False, enabled=True,
                     prefix='eval/') as w:
    w.write(10, {'acc': 0.5})
  with MetricsWriter(str(tmp_path), tensorboard=False, progress=False, enabled=True) as w:
    w.write(11, {'loss': 1.0})
  records = read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert records[0]['eval/acc'] == 0.5 and records[1]['loss'] == 1.0
  assert not os.path.exists(tmp_path / 'tb')


class FakeClock:
  """Stands in for the writer's ``time`` module: monotonic() is set by the test."""

  def __init__(self, now):
    self.now = now

  def monotonic(self):
    return self.now

  def time(self):
    return 1.7e9


def test_progress_line_has_percent_and_eta(tmp_path, monkeypatch):
  clock = FakeClock(100.0)
  monkeypatch.setattr(writer_lib, 'time', clock)
  stream = io.StringIO()
  w = MetricsWriter(str(tmp_path), total_steps=10, tensorboard=False, stream=stream, enabled=True)
  w.write(0, {'loss': 3.0})
  clock.now = 110.0
  w.write(5, {'loss': 2.25, 'lr': 1e-5})  # 5 steps in 10 s: 5 left -> 10 s
  w.close()
  lines = stream.getvalue().splitlines()
  assert lines == ['[0/10   0.0% eta --:--] loss=3',
                   '[5/10  50.0% eta 00:10] loss=2.25 lr=1.000e-05']


def test_progress_without_total_and_time_format():
  w = MetricsWriter('/nonexistent', enabled=False, total_steps=None)
  assert w.progress_line(7, {'loss': 1.5}) == 'step 7 loss=1.5'
  assert writer_lib._fmt_time(3725) == '1:02:05'
  assert writer_lib._fmt_time(float('nan')) == '--:--'


def test_disabled_writer_writes_nothing(tmp_path):
  stream = io.StringIO()
  workdir = tmp_path / 'run'
  with MetricsWriter(str(workdir), total_steps=5, stream=stream, enabled=False) as w:
    w.write(1, {'loss': 1.0})
  assert not workdir.exists()
  assert stream.getvalue() == ''


def test_enabled_by_default_on_process_zero(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False, progress=False)
  assert w.enabled  # a single process is process 0
  w.write(0, {'x': 1})
  w.close()
  assert json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])['x'] == 1.0


def test_progress_line_puts_loss_first_among_many_metrics(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False, progress=False, enabled=True)
  values = {f'a{i}': float(i) for i in range(10)}
  values['loss'] = 2.5
  line = w.progress_line(3, values)
  w.close()
  assert line.startswith('step 3 loss=2.5 ')
  assert len(line.split()) == 2 + 8
