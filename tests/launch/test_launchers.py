"""launch/*: --dry-run prints exactly the commands each launcher would run (no gcloud/srun
needed), the printed lines survive a shell round trip, mistakes are one error line, and
multiprocess_cpu.sh really starts a 2-process job."""
import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, 'launch')


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'KVJ_')) and k != 'XLA_FLAGS'}
  env['PYTHON'] = 'python'
  env.update(extra)
  return env


def _run(script, *args, env=None, timeout=60):
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], cwd=REPO,
                        env=env if env is not None else _env(), capture_output=True, text=True,
                        timeout=timeout)


def _dry(script, *args, env=None):
  result = _run(script, '--dry-run', *args, env=env)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ''
  return result.stdout.splitlines()


ARGS = ['--config=experiments/demo.py', '--workdir=runs/it s', "--config.name=a'b"]


def test_local_dry_run():
  assert _dry('local.sh', '--', *ARGS) == [
      "python -m kimi_vl_jax.main --config=experiments/demo.py '--workdir=runs/it s' "
      "'--config.name=a'\\''b'"]
  # Without '--' the flags pass through too, and the line parses back to the same argv.
  line, = _dry('local.sh', *ARGS)
  assert shlex.split(line) == ['python', '-m', 'kimi_vl_jax.main', *ARGS]


def test_multiprocess_cpu_dry_run():
  lines = _dry('multiprocess_cpu.sh', '-n', '3', '--devices-per-process', '4', '--port', '4567',
               '--', '--config=experiments/demo.py', '--mode=describe')
  assert lines == [
      f'env XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu '
      f'KVJ_COORDINATOR=127.0.0.1:4567 KVJ_NUM_PROCESSES=3 KVJ_PROCESS_ID={i} '
      f'KVJ_CPU_COLLECTIVES=gloo python -m kimi_vl_jax.main --config=experiments/demo.py '
      f'--mode=describe' for i in range(3)]


def test_multiprocess_cpu_keeps_existing_xla_flags():
  line = _dry('multiprocess_cpu.sh', '-n', '1', env=_env(XLA_FLAGS='--xla_dump_to=/x'))[0]
  assert "'XLA_FLAGS=--xla_dump_to=/x --xla_force_host_platform_device_count=2'" in line


def test_tpu_pod_dry_run():
  lines = _dry('tpu_pod.sh', '--name', 'v5p-pod', '--zone=us-east5-a', '--project', 'p1', '--',
               *ARGS)
  assert len(lines) == 1
  argv = shlex.split(lines[0])
  assert argv[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v5p-pod',
                      '--zone=us-east5-a', '--project=p1', '--worker=all']
  assert argv[9].startswith('--command=')
  remote = argv[9][len('--command='):]
  assert remote.startswith('cd kimi-vl-jax && env KVJ_AUTO_DISTRIBUTED=1 .venv/bin/python ')
  # What each worker's shell runs parses back to the exact entry-point argv.
  remote_argv = shlex.split(remote.split(' && ', 1)[1])
  assert remote_argv == ['env', 'KVJ_AUTO_DISTRIBUTED=1', '.venv/bin/python', '-m',
                         'kimi_vl_jax.main', *ARGS]


def test_tpu_pod_options():
  line, = _dry('tpu_pod.sh', '--name=n', '--zone=z', '--remote-dir', 'src/kvj',
               '--remote-python=/opt/venv/bin/python', '--config=experiments/demo.py')
  assert line == ("gcloud compute tpus tpu-vm ssh n --zone=z --worker=all '--command=cd src/kvj "
                  "&& env KVJ_AUTO_DISTRIBUTED=1 /opt/venv/bin/python -m kimi_vl_jax.main "
                  "--config=experiments/demo.py'")


def test_slurm_submit_dry_run():
  lines = _dry('slurm_gpu.sbatch', '--nodes', '4', '--partition=a100', '--time=2:00:00', '--',
               '--config=experiments/demo.py')
  assert lines == [
      'sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --partition=a100 --time=2:00:00 '
      'launch/slurm_gpu.sbatch --nodes=4 --gpus-per-node=8 --per=gpu -- '
      '--config=experiments/demo.py']


@pytest.mark.parametrize('per,tasks', [('gpu', 4), ('node', 1)])
def test_slurm_inside_allocation_dry_run(per, tasks):
  """What the submitted job runs: srun with one task per GPU or per node."""
  env = _env(SLURM_JOB_ID='123', SLURM_SUBMIT_DIR=REPO)
  lines = _dry('slurm_gpu.sbatch', '--nodes=2', '--gpus-per-node=4', f'--per={per}', '--',
               '--config=experiments/demo.py', env=env)
  assert lines == [
      f'srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node={tasks} env KVJ_SLURM_MODE={per} '
      'python -m kimi_vl_jax.main --config=experiments/demo.py']


def test_slurm_inside_allocation_defaults_to_the_allocation():
  """`sbatch --nodes=3 launch/slurm_gpu.sbatch -- ...` (no script options) fills the allocation."""
  env = _env(SLURM_JOB_ID='9', SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NUM_NODES='3',
             SLURM_GPUS_ON_NODE='2')
  assert _dry('slurm_gpu.sbatch', '--', '--config=experiments/demo.py', env=env) == [
      'srun --kill-on-bad-exit=1 --nodes=3 --ntasks-per-node=2 env KVJ_SLURM_MODE=gpu '
      'python -m kimi_vl_jax.main --config=experiments/demo.py']


def test_slurm_header_requests_gpus():
  with open(os.path.join(LAUNCH, 'slurm_gpu.sbatch')) as f:
    header = [l for l in f if l.startswith('#SBATCH')]
  assert any('--gpus-per-node=' in l for l in header)
  assert any('--ntasks-per-node=' in l for l in header)


@pytest.mark.parametrize('script,args,message', [
    ('tpu_pod.sh', ['--zone=z'], 'error: tpu_pod.sh: --name (the TPU VM name) is required'),
    ('tpu_pod.sh', ['--name=n'], 'error: tpu_pod.sh: --zone is required'),
    ('slurm_gpu.sbatch', ['--per=core'], "error: slurm_gpu.sbatch: --per must be gpu or node, got 'core'"),
    ('multiprocess_cpu.sh', ['-n', '0'], "error: multiprocess_cpu.sh: -n must be a positive integer, got '0'"),
])
def test_mistakes_are_one_error_line(script, args, message):
  result = _run(script, '--dry-run', *args)
  assert result.returncode == 2
  assert result.stderr.strip() == message
  assert result.stdout == ''


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_multiprocess_cpu_runs_a_2_process_job():
  """The real thing: 2 processes join one jax.distributed job and run the entry point."""
  import sys
  env = _env(PYTHON=sys.executable)
  result = _run('multiprocess_cpu.sh', '-n', '2', '--port', str(_free_port()), '--',
                '--config=experiments/demo.py', '--mode=describe', env=env, timeout=180)
  out = result.stdout + result.stderr
  assert 'jax.distributed initialized (explicit): process 0 of 2' in out, out[-3000:]
  assert 'jax.distributed initialized (explicit): process 1 of 2' in out, out[-3000:]
  assert result.returncode == 0, out[-3000:]
  assert out.count('model preset: small') == 1  # describe prints from process 0 only
  assert '(4 devices)' in out


@pytest.mark.slow
def test_multiprocess_cpu_stops_on_a_failing_process():
  import sys
  env = _env(PYTHON=sys.executable)
  result = _run('multiprocess_cpu.sh', '-n', '2', '--port', str(_free_port()), '--',
                '--config=experiments/demo.py', '--config.train.stepz=1', env=env, timeout=180)
  assert result.returncode == 2
  assert "error: --config.train.stepz=1: unknown key 'stepz'" in result.stderr
  assert 'a process exited with status 2; stopping the others' in result.stderr
