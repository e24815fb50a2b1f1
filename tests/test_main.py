"""The CLI end to end (subprocess): --mode=describe on the demo and the A3B configs."""
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=300):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('KVJ_', 'SLURM_'))}
  env.update(JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'kimi_vl_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _main_with_peak_rss(*args):
  """Runs the CLI; returns (returncode, stdout, stderr, this child's own peak RSS in KiB).

  os.wait4 reports the rusage of this one child; RUSAGE_CHILDREN would be the maximum over
  every subprocess the test session ever waited for (the multi-process tests reach 4 GB).
  """
  env = {k: v for k, v in os.environ.items() if not k.startswith(('KVJ_', 'SLURM_'))}
  env.update(JAX_PLATFORMS='cpu')
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen([sys.executable, '-m', 'kimi_vl_jax.main', *args], cwd=REPO,
                            env=env, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read(), usage.ru_maxrss


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
