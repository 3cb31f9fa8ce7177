"""The mistakes a user makes, each answered in one line: a broken config file, a bad flag (refused before jax is
imported), a splash-trained workdir on a CPU host, an incomplete checkpoint, libtpu and library noise."""

from __future__ import annotations

import logging as py_logging
import os
import random
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from transformer_jax import commands
from transformer_jax import config_checks
from transformer_jax.training import faults
from transformer_jax import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, 'tests', 'data')

# Runs the CLI's main in a fresh interpreter and, when it exits, says whether jax was ever imported.
_DRIVER = (
  'import sys\nfrom transformer_jax import cli\ntry:\n  cli.main(sys.argv)\nexcept SystemExit:\n'
  '  print("jax imported:", "jax" in sys.modules)\n  raise\n'
)


def run_cli(*args: str, cwd: str = REPO, stdin: str = '', env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', _DRIVER, *args], capture_output=True, text=True, cwd=cwd, input=stdin, timeout=300, env=env
  )


def one_error_line(result: subprocess.CompletedProcess) -> str:
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# Config files


@pytest.mark.parametrize(
  'source, expected',
  [
    ('import ml_collections\n\ndef get_config(:\n  pass\n', r'error: bad\.py:3: SyntaxError: invalid syntax'),
    ('import no_such_module_here\n', r"error: bad\.py:1: ModuleNotFoundError: No module named 'no_such_module_here'"),
    ('def get_config():\n  x = 1\n  return x / 0\n', r'error: bad\.py:3: ZeroDivisionError: division by zero'),
    (
      'import ml_collections\nCONFIG = 1\n',
      r'error: bad\.py: no get_config\(\) \(a config file defines get_config\(\) returning .*\)',
    ),
  ],
)
def test_a_broken_config_file_is_one_line_naming_file_and_line(tmp_path, source, expected):
  (tmp_path / 'bad.py').write_text(source)
  result = run_cli('info', '--config=bad.py', cwd=str(tmp_path))
  assert result.returncode == 2, result.stderr
  assert re.fullmatch(expected, one_error_line(result)), result.stderr
  assert 'jax imported: False' in result.stdout


def test_a_broken_default_config_is_one_line_too(tmp_path):
  """Commands that default to configs/tiny.py read the one under the working directory first: a user edits it."""
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'tiny.py').write_text('import ml_collections\n\n\ndef get_config()\n  return None\n')
  result = run_cli('info', cwd=str(tmp_path))
  assert result.returncode == 2
  assert re.fullmatch(r"error: configs/tiny\.py:4: SyntaxError: expected ':'", one_error_line(result)), result.stderr


def test_an_error_in_a_module_the_config_imports_names_that_module(tmp_path):
  (tmp_path / 'configs_helper.py').write_text('VALUE = 1\nBROKEN = undefined_name\n')
  (tmp_path / 'bad.py').write_text(
    'import sys, os\nsys.path.insert(0, os.path.dirname(__file__))\n'
    'import configs_helper\ndef get_config():\n  return None\n'
  )
  result = run_cli('info', '--config=bad.py', cwd=str(tmp_path))
  assert result.returncode == 2
  assert re.fullmatch(
    r"error: configs_helper\.py:2: NameError: name 'undefined_name' is not defined", one_error_line(result)
  ), result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Flags: refused before jax is imported, nothing written


@pytest.mark.parametrize(
  'args, flag',
  [
    (['generate', '--temperature=-1', '--prompt=x'], '--temperature'),
    (['generate', '--top_p=0'], '--top_p'),
    (['generate', '--top_k=-3'], '--top_k'),
    (['generate', '--max_new_tokens=0'], '--max_new_tokens'),
    (['translate', '--beam_size=0'], '--beam_size'),
    (['evaluate', '--batch_size=0'], '--batch_size'),
    (['evaluate', '--alpha=nan'], '--alpha'),
    (['average', '--last=0', '--out={tmp}/averaged'], '--last'),
    (['attention', '--text=one', '--max_tokens=0'], '--max_tokens'),
  ],
)
def test_a_bad_flag_is_refused_before_jax_and_nothing_is_written(tmp_path, args, flag):
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('x')
  result = run_cli(*[a.format(tmp=tmp_path) for a in args], f'--workdir={workdir}', stdin='a prompt\n')
  assert result.returncode == 2
  assert one_error_line(result).startswith(f'error: {flag}='), result.stderr
  assert 'jax imported: False' in result.stdout
  assert sorted(os.listdir(tmp_path)) == ['workdir'] and os.listdir(workdir) == ['keep.txt']


@pytest.mark.parametrize(
  'command, flag, choices',
  [
    ('evaluate', '--quantize=int4', '<none|int8>'),
    ('translate', '--quantize=INT8', '<none|int8>'),
    ('generate', '--weights_dtype=float16', '<float32|bfloat16>'),
    ('evaluate', '--weights_dtype=bf16', '<float32|bfloat16>'),
  ],
)
def test_a_bad_weights_choice_is_refused_before_jax_naming_the_choices(tmp_path, command, flag, choices):
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  result = run_cli(command, f'--workdir={workdir}', flag, stdin='a prompt\n')
  assert result.returncode == 2
  assert one_error_line(result) == f'error: flag {flag}: value should be one of {choices}', result.stderr
  assert 'jax imported: False' in result.stdout and os.listdir(workdir) == []


@pytest.mark.parametrize('command', ['evaluate', 'translate', 'generate', 'export'])
def test_a_workdir_without_checkpoints_is_refused_before_jax(tmp_path, command):
  extra = ['--format=msgpack', f'--out={tmp_path / "out.msgpack"}'] if command == 'export' else []
  result = run_cli(command, f'--workdir={tmp_path / "missing"}', *extra, stdin='x\n')
  assert result.returncode == 2
  assert one_error_line(result) == f'error: no checkpoint in {tmp_path / "missing" / "checkpoints"}: train first'
  assert 'jax imported: False' in result.stdout and os.listdir(tmp_path) == []


def _define(command: str) -> tuple[flags.FlagValues, list[str]]:
  fv = flags.FlagValues()
  names = commands.define_flags(command, fv, argv=['transformer-jax', command])
  return fv, names


def test_every_numeric_flag_of_every_command_is_range_checked():
  """For each command and each flag it takes that FLAG_RULES covers: a value the rule refuses is named in one error,
  the default is accepted."""
  bad = {
    'beam_size': ['0', '-1'],
    'batch_size': ['0', '-8'],
    'alpha': ['nan', 'inf'],
    'max_new_tokens': ['0'],
    'temperature': ['-0.5', 'nan'],
    'top_k': ['-1'],
    'top_p': ['0', '1.5', 'nan'],
    'seed': ['-1'],
    'last': ['0'],
    'num_devices': ['0'],
    'max_tokens': ['0'],
    'num_slices': ['0'],
    'num_processes': ['0'],
    'process_id': ['-1'],
  }
  assert set(bad) == set(commands.FLAG_RULES)
  checked = 0
  for command in commands.COMMANDS:
    fv, names = _define(command)
    required = {
      'attention': ['--text=one'],
      'compile': ['--topology=v5e-8'],
      'export': ['--format=msgpack', '--out=x'],
      'import': ['--path=x'],
      'average': ['--out=x'],
    }.get(command, [])
    base = ['prog', '--workdir=w', *required]
    fv(base)
    assert commands.flag_errors(command, names, fv) == [], command
    for name in set(names) & set(bad):
      for value in bad[name]:
        fv.unparse_flags()
        fv([*base, f'--{name}={value}'])
        errors = commands.flag_errors(command, names, fv)
        assert len(errors) == 1 and errors[0].startswith(f'--{name}='), (command, name, value, errors)
        checked += 1
  assert checked >= 20


def test_help_lists_every_flag_of_every_command():
  for command in commands.COMMANDS:
    fv, names = _define(command)
    text = commands.help_text(command, names, fv)
    assert {'config', 'workdir'} <= set(names)
    for name in names:
      assert re.search(rf'^  --(\[no\])?{name}[:=]', text, re.M), (command, name, text)


def test_generate_help_on_the_command_line_lists_its_own_flags():
  result = run_cli('generate', '--help')
  assert result.returncode == 0
  for name in ('prompt', 'temperature', 'top_p', 'top_k', 'max_new_tokens', 'seed', '[no]jsonl'):
    assert f'--{name}' in result.stdout, name
  assert 'jax imported: False' in result.stdout


def test_the_export_formats_named_without_jax_are_exports():
  from transformer_jax import export

  assert commands.EXPORT_FORMATS == {name: module.WRITES_DIRECTORY for name, module in export.FORMATS.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Splash blocks: the message names a length that passes


def _attention_config(kind: str, block: int, length: int):
  return ml_collections.ConfigDict(
    dict(max_length=length, model=dict(attention=kind, attention_block_size=block, d_model=16, num_heads=2))
  )


def test_a_refused_block_length_names_a_length_that_is_accepted():
  rng = random.Random(0)
  refused = 0
  for _ in range(300):
    kind = rng.choice(['blockwise', 'splash'])
    block = 128 * rng.randint(1, 6) if kind == 'splash' else rng.randint(1, 700)
    length = rng.randint(2, 1500)
    errors = config_checks.config_errors(_attention_config(kind, block, length), platform_checks=False)
    assert 'exceed' not in ' '.join(errors)
    if not errors:
      continue
    refused += 1
    assert len(errors) == 1 and '\n' not in errors[0], errors
    if kind == 'splash':
      multiple = int(re.search(r'must be a multiple of (\d+)', errors[0]).group(1))
      fixed = -(-length // multiple) * multiple
    else:
      assert f'must divide max_length={length}, or be at least max_length' in errors[0]
      fixed = -(-length // block) * block
    assert not config_checks.config_errors(_attention_config(kind, block, fixed), platform_checks=False), (
      kind,
      block,
      length,
      fixed,
    )
  assert refused > 50


# ---------------------------------------------------------------------------------------------------------------------
# A splash workdir off TPU, an incomplete checkpoint, library noise


def test_a_splash_workdir_translates_on_cpu_with_blockwise_and_says_so_once(tmp_path):
  """tests/data/workdir_v1 (dense) run as splash: off TPU it attends with blockwise (the same exact attention), so
  the greedy translations are the stored ones. Its unfinished save of step 20 is one warning line; orbax's
  read-only chatter is not shown."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(os.path.join(DATA, 'workdir_v1'), workdir)
  (workdir / 'checkpoints' / '20.orbax-checkpoint-tmp-1796000000').mkdir()
  result = run_cli(
    'translate',
    f'--workdir={workdir}',
    '--beam_size=1',
    '--config.model.attention=splash',
    '--config.model.attention_block_size=128',
    stdin='one hundred and five\ntwenty-one\n',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  expected = open(os.path.join(DATA, 'workdir_v1_greedy.txt')).read().splitlines()
  assert result.stdout.splitlines()[:2] == expected
  lines = result.stderr.splitlines()
  assert len(lines) == 2, result.stderr
  assert re.fullmatch(
    r"note: model.attention='splash' is a TPU kernel and this host runs cpu: attending with "
    r"'blockwise' \(the same exact attention\)",
    lines[1],
  ), lines
  assert re.fullmatch(
    rf'warning: checkpoint 20 in {re.escape(str(workdir))}/checkpoints is incomplete \(its save '
    r'did not finish: 20\.orbax-checkpoint-tmp-1796000000\): ignored',
    lines[0],
  ), lines


def test_splash_stays_splash_on_a_tpu_and_other_kinds_stay_everywhere():
  from transformer_jax.inference import workdir

  config = ml_collections.ConfigDict(dict(model=dict(attention='splash')))
  assert workdir.attention_for_this_host(config, 'tpu') is config
  assert workdir.attention_for_this_host(config, 'cpu').model.attention == 'blockwise'
  assert config.model.attention == 'splash'  # the caller's config is left as it was
  for kind in ('auto', 'dense', 'cudnn', 'blockwise'):
    config.model.attention = kind
    assert workdir.attention_for_this_host(config, 'cpu') is config


def test_incomplete_steps_local_and_gcs(tmp_path, monkeypatch):
  from transformer_jax.training import checkpoint

  for name in ('6', '12', '18.orbax-checkpoint-tmp-99', '12.orbax-checkpoint-tmp-98'):
    (tmp_path / name).mkdir()
  assert [s for s, _ in checkpoint.incomplete_steps(str(tmp_path))] == [18]  # 12 was committed after all
  # gs://: the step directory is there from the start; the commit marker is written last.
  objects = {'gs://b/c': ['12', '18', '6'], 'gs://b/c/6/commit_success.txt': [], 'gs://b/c/12/commit_success.txt': []}
  monkeypatch.setattr(checkpoint.paths, 'listdir', lambda p: objects.get(p, []))
  monkeypatch.setattr(checkpoint.paths, 'exists', lambda p: p in objects)
  assert checkpoint.incomplete_steps('gs://b/c') == [(18, 'no commit marker commit_success.txt')]


def test_a_run_killed_in_its_first_save_is_reported_not_restarted_silently(tmp_path, capsys):
  from transformer_jax.training import checkpoint

  (tmp_path / 'checkpoints' / '20.orbax-checkpoint-tmp-5').mkdir(parents=True)
  writer = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  assert writer.all_steps() == []
  writer.close()
  checkpoint.Checkpointer(str(tmp_path), read_only=True).close()  # already said: not again
  err = capsys.readouterr().err
  assert err.count('checkpoint 20 in') == 1 and 'is incomplete' in err and err.rstrip().endswith('ignored')


def test_library_warnings_are_quiet_unless_verbose():
  quiet = faults._QuietLibraryWarnings()

  def record(path, level):
    return py_logging.LogRecord('absl', level, path, 1, 'Given directory is read only=%s', ('x',), None)

  site = '/venv/lib/python3.11/site-packages'
  assert not quiet.filter(record(f'{site}/orbax/checkpoint/checkpoint_manager.py', py_logging.WARNING))
  assert not quiet.filter(record(f'{site}/gcsfs/credentials.py', py_logging.WARNING))
  assert quiet.filter(record(f'{site}/orbax/checkpoint/checkpoint_manager.py', py_logging.ERROR))
  assert quiet.filter(record(f'{REPO}/transformer_jax/training/train.py', py_logging.WARNING))


def test_the_platform_is_chosen_before_jax_only_where_there_is_no_tpu(monkeypatch):
  for name in ('JAX_PLATFORMS', *host._TPU_ENV):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host.importlib.util, 'find_spec', lambda name: object() if name == 'libtpu' else None)
  monkeypatch.setattr(host, 'tpu_present', lambda: False)
  assert host.choose_platform() == 'cpu' and os.environ['JAX_PLATFORMS'] == 'cpu'
  assert host.libtpu_host_env('v5e', 16) == {
    'TPU_WORKER_HOSTNAMES': 'localhost',
    'TPU_ACCELERATOR_TYPE': 'v5litepod-16',
  }
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu')  # the user's choice stays
  assert host.choose_platform() is None and os.environ['JAX_PLATFORMS'] == 'tpu'
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setattr(host, 'tpu_present', lambda: True)
  assert host.choose_platform() is None and 'JAX_PLATFORMS' not in os.environ
  assert host.libtpu_host_env('v5e', 16) == {}  # a TPU host's own variables are libtpu's to find


def test_tpu_present_reads_device_files_and_variables(monkeypatch):
  for name in host._TPU_ENV:
    monkeypatch.delenv(name, raising=False)
  real_glob = host.glob.glob
  monkeypatch.setattr(
    host.glob, 'glob', lambda pattern: [] if pattern.startswith(('/dev/', '/sys/')) else real_glob(pattern)
  )
  assert not host.tpu_present()
  monkeypatch.setenv('TPU_ACCELERATOR_TYPE', 'v5litepod-8')
  assert host.tpu_present()
  monkeypatch.delenv('TPU_ACCELERATOR_TYPE')
  monkeypatch.setattr(host.glob, 'glob', lambda pattern: ['/dev/accel0'] if pattern == '/dev/accel*' else [])
  assert host.tpu_present()


@pytest.mark.skipif(__import__('importlib').util.find_spec('libtpu') is None, reason='libtpu is not installed')
def test_with_libtpu_installed_a_command_on_a_cpu_host_prints_no_tpu_noise():
  if host.tpu_present():
    pytest.skip('this host has a TPU')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = run_cli('info', '--config.model.num_layers=1', env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stderr == '', result.stderr
  assert 'params=' in result.stdout
