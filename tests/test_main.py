"""The CLI end to end (subprocess): --mode=describe on the demo and the A3B configs."""
import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=300):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('KVJ_', 'SLURM_'))}
  env.update(JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'kimi_vl_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


# Runs the CLI and, at exit, records the process's own peak RSS. VmHWM belongs to the address
# space made at exec, so it excludes the parent: a child's ru_maxrss (wait4, RUSAGE_CHILDREN)
# does not, because Linux folds the pre-exec address space (a copy of the multi-GB pytest
# process) into it.
_PEAK_RSS_WRAPPER = """
import atexit, os, runpy, sys
def _record():
  with open('/proc/self/status') as f:
    hwm = next(line for line in f if line.startswith('VmHWM:'))
  with open(os.environ['KVJ_TEST_PEAK_RSS_FILE'], 'w') as f:
    f.write(hwm.split()[1])
atexit.register(_record)
sys.argv[0] = 'kimi_vl_jax.main'
runpy.run_module('kimi_vl_jax.main', run_name='__main__', alter_sys=True)
"""


def _main_with_peak_rss(*args):
  """Runs the CLI; returns (returncode, stdout, stderr, the CLI process's own peak RSS in KiB)."""
  if not os.path.exists('/proc/self/status'):
    pytest.skip('peak RSS is read from /proc (Linux)')
  env = {k: v for k, v in os.environ.items() if not k.startswith(('KVJ_', 'SLURM_'))}
  with tempfile.TemporaryDirectory() as tmp:
    peak_file = os.path.join(tmp, 'peak_kib')
    env.update(JAX_PLATFORMS='cpu', KVJ_TEST_PEAK_RSS_FILE=peak_file)
    result = subprocess.run([sys.executable, '-c', _PEAK_RSS_WRAPPER, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    with open(peak_file) as f:
      peak_kib = int(f.read())
  return result.returncode, result.stdout, result.stderr, peak_kib


def test_describe_demo(tmp_path):
  workdir = tmp_path / 'demo'
  result = _main('--config=experiments/demo.py', '--mode=describe', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert out.startswith('model preset: small   mesh: data=8 x fsdp=1 x expert=1 x tensor=1 '
                        '(8 devices)'), out[:300]
  for component in ('lm', 'vision', 'projector'):
    assert f'\n== {component}: total ' in out
  assert 'all components: total ' in out
  assert workdir.is_dir()


def test_describe_a3b_is_abstract_and_small():
  """The 16B preset describes without allocating it: well under this machine's memory."""
  returncode, stdout, stderr, peak_kib = _main_with_peak_rss(
      '--config=experiments/kimi_vl_a3b.py', '--mode=describe')
  assert returncode == 0, stderr[-3000:]
  assert '== lm: total 15.96B' in stdout
  assert '(128 devices)' in stdout
  # 16B float32 parameters would be 64 GB; an abstract build stays around 1 GB.
  assert peak_kib < 4 * 1024 * 1024, f'peak RSS {peak_kib} KiB'
