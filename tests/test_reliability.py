"""Nothing a user or the machine does wrong corrupts a run: the workdir lock, config range checks, damaged artifacts,
a full disk during a save, SIGTERM at any phase, and rerunning a finished run.

The CLI tests run `python -m transformer_jax.cli` in subprocesses (test_checkpoint's helpers and its shared JAX
compilation cache) on one small trained workdir (module fixture); cheap invocations run side by side.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import helpers
from helpers import Run, committed_steps, error_lines, load_state, seed_workdir
from transformer_jax.training import checkpoint as checkpoint_lib
from transformer_jax import config_checks
from transformer_jax.storage import lock as workdir_lock

NUM_STEPS = 8
EVERY = 4
CONFIG_FILE = helpers.small_config_file(
  eval_translate_examples=16,
  num_train_steps=NUM_STEPS,
  checkpoint_every_steps=EVERY,
  eval_every_steps=1000,
  log_every_steps=1000,
)


def tree_hash(directory: str) -> dict[str, str]:
  """Every file and directory under `directory` by relative path -> sha256 of its bytes ('dir' for directories)."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory)] = 'dir'
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def tree_stat(directory: str) -> dict[str, tuple[int, int]]:
  """Every file and directory under `directory` by relative path -> (size, mtime in ns). The root's own mtime is
  left out: the workdir lock file is made and removed there by design."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      st = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), directory)] = (st.st_size if name in files else 0, st.st_mtime_ns)
  return out


def tmp_dirs(workdir: str) -> list[str]:
  path = os.path.join(workdir, 'checkpoints')
  return [n for n in os.listdir(path) if 'tmp' in n] if os.path.isdir(path) else []


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('config') / 'small.py'
  path.write_text(CONFIG_FILE)
  return str(path)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, env, config_path):
  workdir = str(tmp_path_factory.mktemp('runs') / 'trained')
  run = Run(workdir, env, config=config_path)
  assert run.wait() == 0, run.describe()
  assert committed_steps(workdir) == [EVERY, NUM_STEPS] and not os.path.exists(os.path.join(workdir, '.lock'))
  # where the time went, one stderr line per finished run
  assert re.search(
    rf'^time: data .*; first step \(compiles\) .*; steps 2\.\.{NUM_STEPS} .*; final evaluation ', run.stderr, re.M
  ), run.describe()
  return workdir


# ---------------------------------------------------------------------------------------------------------------------
# Config checks (in-process)


def _tiny_config():
  from configs import tiny

  return tiny.get_config()


def _bad_values(key: str):
  """Values each rule must refuse, by what it accepts."""
  _, what = dict(config_checks.RULES)[key]
  if what.startswith('an integer >= 1, or -1'):
    return [0, -2, True]
  if what.startswith('an integer >= '):
    low = int(what.split('>= ')[1].split()[0])
    return [low - 1, low - 5, True] + ([1.5] if low <= 1 else [])
  if what == 'a finite number > 0':
    return [0.0, -1e-3, math.nan, math.inf]
  if what == 'a finite number >= 0':
    return [-1.0, math.nan, math.inf]
  if what == 'a number in [0, 1)':
    return [1.0, -0.1, math.nan]
  raise AssertionError(what)


@pytest.mark.parametrize('key', [k for k, _ in config_checks.RULES])
def test_each_bad_value_is_one_line_naming_its_key(key):
  assert config_checks.config_errors(_tiny_config()) == []
  for value in _bad_values(key):
    config = _tiny_config().to_dict()  # a plain dict (as a stored config is): any value goes in
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
    errors = config_checks.config_errors(config)
    assert len(errors) == 1 and errors[0].startswith(f'config {key}={value!r}: must be '), (value, errors)


def test_cross_key_rules_and_many_bad_keys():
  config = _tiny_config()
  config.model.num_heads = 3  # 128 % 3
  config.packed_targets_length = 16  # < max_length 32
  config.grad_accum_steps = 5  # does not divide 32
  errors = config_checks.config_errors(config)
  assert [e.split(':')[0] for e in errors] == [
    'config model.d_model=128',
    'config packed_targets_length=16',
    'config grad_accum_steps=5',
  ]
  config = _tiny_config()
  config.num_train_steps, config.learning_rate, config.warmup_steps = -5, 0.0, -1
  assert len(config_checks.config_errors(config)) == 3


def test_directory_and_file_paths(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  assert config_checks.directory_error(str(a_file), '--workdir') == f'--workdir={a_file} is a file, not a directory'
  assert f': {a_file} is a file' in config_checks.directory_error(str(a_file / 'sub' / 'x'), '--out')
  assert config_checks.directory_error(str(tmp_path / 'new' / 'dir'), '--workdir') is None
  assert config_checks.file_error(str(tmp_path), '--input') == f'--input={tmp_path} is a directory, not a file'
  assert config_checks.file_error(str(a_file), '--input') is None


# ---------------------------------------------------------------------------------------------------------------------
# Locks (in-process)


def test_posix_lock_refuses_a_second_writer_and_leaves_nothing_behind(tmp_path):
  workdir = str(tmp_path / 'new')
  first = workdir_lock.PosixLock(workdir, 'transformer-jax train --workdir=new')
  first.acquire()
  assert first.holder()['pid'] == os.getpid() and first.holder()['command'] == 'transformer-jax train --workdir=new'
  second = workdir_lock.PosixLock(workdir, 'second')
  with pytest.raises(
    workdir_lock.WorkdirLockedError,
    match=rf'in use by another writer: pid {os.getpid()} on host '
    r'\S+, started \S+ \(transformer-jax train --workdir=new\)',
  ):
    second.acquire()
  first.release()
  assert not os.path.exists(workdir)  # it made the directory and left it empty: removed
  os.makedirs(workdir)
  with second:
    assert second.holder()['command'] == 'second'
  assert os.listdir(workdir) == []  # not made by it: kept, and empty


def test_a_killed_holder_leaves_a_lock_file_that_does_not_block(tmp_path):
  workdir = str(tmp_path)
  code = (
    'import sys, time; from transformer_jax.storage import lock as w; '
    f'w.PosixLock({workdir!r}, "child").acquire(); print("locked", flush=True); time.sleep(60)'
  )
  child = subprocess.Popen(
    [os.sys.executable, '-c', code],
    stdout=subprocess.PIPE,
    text=True,
    env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))),
  )
  try:
    assert child.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {child.pid} '):
      workdir_lock.PosixLock(workdir).acquire()
  finally:
    child.kill()
    child.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # stale file, released flock
  with workdir_lock.PosixLock(workdir, 'after') as lock:
    assert lock.holder()['command'] == 'after'


def test_object_store_lock_heartbeat_timeout_and_takeover(capfd):
  store, now = workdir_lock.MemoryStore(), [1000.0]
  clock = lambda: now[0]
  first = workdir_lock.ObjectStoreLock('gs://b/run', 'first', store=store, timeout_s=60, heartbeat_s=10, clock=clock)
  first.acquire(start_heartbeat=False)
  second = workdir_lock.ObjectStoreLock('gs://b/run', 'second', store=store, timeout_s=60, heartbeat_s=10, clock=clock)
  now[0] += 50
  with pytest.raises(
    workdir_lock.WorkdirLockedError, match=r'\(first\), last heartbeat 50 s ago \(taken over after 60'
  ):
    second.acquire(start_heartbeat=False)
  assert first.heartbeat()  # the holder is alive: its heartbeat resets the age
  now[0] += 50
  with pytest.raises(workdir_lock.WorkdirLockedError):
    second.acquire(start_heartbeat=False)
  now[0] += 61  # no heartbeat for longer than the timeout: taken over
  second.acquire(start_heartbeat=False)
  assert 'took over the lock of gs://b/run' in capfd.readouterr().err
  assert not first.heartbeat()
  with pytest.raises(workdir_lock.WorkdirLockedError, match='lost the lock of gs://b/run'):
    first.check()
  first.release()  # must not delete the new holder's object
  assert store.read('gs://b/run/.lock') is not None
  second.check()
  second.release()
  assert store.read('gs://b/run/.lock') is None


# ---------------------------------------------------------------------------------------------------------------------
# The CLI: bad inputs, damaged artifacts, a finished run


def _damage_tokenizer(workdir):
  path = os.path.join(workdir, 'spm.model')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 3)


def _damage_config(workdir):
  for step in committed_steps(workdir):
    with open(os.path.join(workdir, 'checkpoints', str(step), 'config', 'metadata'), 'w') as f:
      f.write('{"model": {"d_model": 3')


def _damage_every_state(workdir):
  """Every step's state item emptied, its metadata included: no checkpoint can be checked or restored."""
  for step in committed_steps(workdir):
    for path in glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', '**', '*'), recursive=True):
      if os.path.isfile(path):
        open(path, 'w').close()


def test_bad_inputs_are_one_line_each_and_change_nothing(tmp_path, env, config_path, trained):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory')
  damaged_spm, damaged_config = str(tmp_path / 'damaged_spm'), str(tmp_path / 'damaged_config')
  other_arch = str(tmp_path / 'other_arch')  # a train with another d_model: the eval cache it would need is absent
  damaged_all = str(tmp_path / 'damaged_all')  # the same: refused before that cache is written
  for target, damage in (
    (damaged_spm, _damage_tokenizer),
    (damaged_config, _damage_config),
    (other_arch, lambda _: None),
    (damaged_all, _damage_every_state),
  ):
    shutil.copytree(trained, target)
    damage(target)
  sentences = tmp_path / 'sentences.txt'
  sentences.write_text('one hundred\n')
  cases = {  # name: (workdir, args, command, config, expected error lines (regexes))
    'steps_and_rate': (
      trained,
      ['--config.num_train_steps=-5', '--config.learning_rate=0'],
      'train',
      config_path,
      [
        r'config num_train_steps=-5: must be an integer >= 1',
        r'config learning_rate=0\.0: must be a finite number > 0',
      ],
    ),
    'nan_rate_dropout': (
      trained,
      ['--config.learning_rate=nan', '--config.model.dropout_rate=1.0', '--config.model.num_heads=3'],
      'train',
      config_path,
      [
        r'config learning_rate=nan: must be a finite number > 0',
        r'config model.dropout_rate=1\.0: must be a number in \[0, 1\)',
        r'config model.d_model=32: must be divisible by model.num_heads=3',
      ],
    ),
    'workdir_is_a_file': (str(a_file), [], 'train', config_path, [r'--workdir=\S+a_file is a file, not a directory']),
    'input_is_a_directory': (
      trained,
      [f'--input={tmp_path}'],
      'translate',
      None,
      [r'--input=\S+ is a directory, not a file'],
    ),
    'translate_damaged_spm': (
      damaged_spm,
      [f'--input={sentences}'],
      'translate',
      None,
      [
        r"the workdir's tokenizer is damaged: the SentencePiece model \S+spm.model is "
        r'damaged \(\d+ bytes that do not parse as a model\)'
      ],
    ),
    'export_damaged_spm': (
      damaged_spm,
      ['--format=hf-marian', f'--out={tmp_path / "hf"}'],
      'export',
      None,
      [r"the workdir's tokenizer is damaged"],
    ),
    'train_damaged_spm': (
      damaged_spm,
      [],
      'train',
      config_path,
      [r'SentencePiece model \S+ is damaged .*; delete it and rerun to retrain the tokenizer'],
    ),
    'train_other_architecture': (
      other_arch,
      ['--config.model.d_model=64', '--config.model.d_ff=128', '--config.max_eval_examples=64'],
      'train',
      config_path,
      [
        r'checkpoint step 8 in \S+: parameter \S+ has shape \([\d, ]+\) but the model '
        r'expects \([\d, ]+\): the checkpoint was made with another architecture'
      ],
    ),
    'train_every_checkpoint_damaged': (
      damaged_all,
      ['--config.max_eval_examples=64'],
      'train',
      config_path,
      [
        r'no readable checkpoint in \S+: step \d+: .*; step \d+: .*move the '
        r'checkpoints away or use a new --workdir'
      ],
    ),
    'translate_damaged_config': (
      damaged_config,
      [f'--input={sentences}'],
      'translate',
      None,
      [r'no readable config in \S+ \(step 4: JSONDecodeError: .*\); pass --config=FILE'],
    ),
  }
  before = {name: tree_hash(case[0]) for name, case in cases.items()}
  before_stat = {name: tree_stat(case[0]) for name, case in cases.items() if os.path.isdir(case[0])}
  runs = {
    name: Run(workdir, env, *args, command=command, config=config, log=str(tmp_path / name))
    for name, (workdir, args, command, config, _) in cases.items()
  }
  # Beside them, not a bad input: rerunning the finished run reports its held-out metrics and writes nothing.
  rerun = Run(trained, env, config=config_path, log=str(tmp_path / 'rerun'))
  codes = {name: run.wait() for name, run in runs.items()}  # all ended before any workdir is compared
  assert rerun.wait() == 0, rerun.describe()
  assert f'the run is already complete at step {NUM_STEPS} (num_train_steps={NUM_STEPS})' in rerun.stdout
  last = rerun.stdout.strip().splitlines()[-1]
  assert re.fullmatch(rf'final: step={NUM_STEPS}( \w+=-?\d+\.\d+)+', last), last
  keys = [kv.split('=')[0] for kv in last.split()[1:]]
  assert 'loss' not in keys and {'eval_loss', 'bleu', 'chrf', 'exact_match'} <= set(keys)
  for name, (workdir, _, _, _, expected) in cases.items():
    run = runs[name]
    assert codes[name] != 0, (name, run.describe())
    errors = error_lines(run)
    assert len(errors) == len(expected), (name, run.describe())
    for line, pattern in zip(errors, expected):
      assert re.search(pattern, line), (name, pattern, line)
    assert 'Traceback' not in run.stderr, (name, run.describe())
    assert tree_hash(workdir) == before[name], name
    if name in before_stat and workdir != trained:  # the finished run's rerun beside them may read the trained one
      assert tree_stat(workdir) == before_stat[name], name  # names, sizes, mtimes: nothing rewritten either
  assert not os.path.exists(tmp_path / 'hf')


# ---------------------------------------------------------------------------------------------------------------------
# Two writers


def test_a_second_trainer_is_refused_at_once_and_kill_9_leaves_no_blocking_lock(tmp_path, env, config_path, trained):
  workdir = str(tmp_path / 'shared')
  seed_workdir(trained, workdir)
  first = Run(workdir, env, '--config.num_train_steps=100000', config=config_path, log=str(tmp_path / 'first'))
  try:
    lock_path = os.path.join(workdir, workdir_lock.LOCK_NAME)
    deadline = time.time() + 300
    while not committed_steps(workdir):  # it holds the lock and has committed a checkpoint
      assert first.proc.poll() is None and time.time() < deadline, first.describe()
      time.sleep(0.05)
    assert f'"pid": {first.proc.pid}' in open(lock_path).read()
    start = time.time()
    second = Run(workdir, env, config=config_path, log=str(tmp_path / 'second'))
    assert second.wait(timeout=120) == 1, second.describe()
    refused_after = time.time() - start
    errors = error_lines(second)
    assert len(errors) == 1 and f'is in use by another writer: pid {first.proc.pid} on host ' in errors[0], errors
    assert '--config.num_train_steps=100000' in errors[0]  # the holder's command
    assert 'resumed from' not in second.stdout  # refused before touching the checkpoints
    assert refused_after < 60, refused_after  # start-up (imports) only, with room for a loaded machine
  finally:
    first.proc.kill()
    first.wait()
  reached = max(committed_steps(workdir))
  third = Run(workdir, env, f'--config.num_train_steps={EVERY}', config=config_path, log=str(tmp_path / 'third'))
  assert third.wait() == 0, third.describe()
  assert f'already complete at step {reached}' in third.stdout
  assert not tmp_dirs(workdir) and not os.path.exists(lock_path)  # orbax's tmp dirs cleaned; lock released


# ---------------------------------------------------------------------------------------------------------------------
# A full disk during a save


@pytest.fixture
def small_disk(tmp_path):
  mount_point = tmp_path / 'disk'
  mount_point.mkdir()
  result = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(mount_point)], capture_output=True, text=True, check=False
  )
  if result.returncode != 0:
    pytest.skip(f'cannot mount a small tmpfs to fill (needs root): {result.stderr.strip()}')
  try:
    yield str(mount_point)
  finally:
    subprocess.run(['umount', str(mount_point)], check=False)


def _fill(disk: str, leave: int) -> str:
  filler = os.path.join(disk, 'filler')
  free = shutil.disk_usage(disk).free
  fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    os.posix_fallocate(fd, 0, free - leave)
  finally:
    os.close(fd)
  return filler


def test_callbacks_on_a_closed_event_loop_go_to_the_detail_log_and_other_errors_do_not(tmp_path, monkeypatch, capsys):
  """After a failed save, tensorstore callbacks hit orbax's closed event loop and are printed through sys.excepthook
  at any moment (a disk-full run's output would vary with them): the CLI's hooks send exactly those to the detail log."""
  import asyncio
  import sys
  from transformer_jax.training import faults

  monkeypatch.setattr(faults, 'detail_log_path', lambda: str(tmp_path / 'detail.log'))
  monkeypatch.setattr(faults, '_detail_file', None)
  monkeypatch.setattr(sys, 'excepthook', sys.__excepthook__)
  monkeypatch.setattr(sys, 'unraisablehook', sys.__unraisablehook__)
  faults.divert_library_errors()
  faults.divert_library_errors()  # idempotent: the default hooks are not wrapped twice
  loop = asyncio.new_event_loop()
  loop.close()
  for error in ('closed', 'other'):
    try:
      if error == 'closed':
        loop.call_soon_threadsafe(print)
      raise RuntimeError('something else failed')
    except RuntimeError:
      sys.excepthook(*sys.exc_info())
  err = capsys.readouterr().err
  assert 'something else failed' in err and 'Event loop is closed' not in err
  log = open(tmp_path / 'detail.log').read()
  assert log.count('Event loop is closed') >= 1 and 'something else failed' not in log


def test_disk_full_during_a_background_save_is_one_line_and_the_last_checkpoint_restores(
  tmp_path, env, config_path, trained, small_disk
):
  workdir = os.path.join(small_disk, 'run')
  shutil.copytree(trained, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(NUM_STEPS)))  # resume from EVERY, save NUM_STEPS
  state_bytes = checkpoint_lib.tree_nbytes(load_state(workdir, EVERY)[0])
  on_disk = checkpoint_lib._disk_usage(os.path.join(workdir, 'checkpoints', str(EVERY)))
  # blocks and metadata: room for the arrays alone is not room for a checkpoint (1.6x the arrays' bytes here)
  assert on_disk > 1.25 * state_bytes
  # Room for the arrays (the up-front check passes) and an eighth of the rest: the save fails while writing. (With
  # half of the rest, the whole save once fitted, in CI: a checkpoint's footprint here varies from save to save.)
  _fill(small_disk, state_bytes + (on_disk - state_bytes) // 8)
  run = Run(workdir, env, config=config_path, log=str(tmp_path / 'full'))
  assert run.wait() == 1, run.describe()
  errors = error_lines(run)
  assert len(errors) == 1, run.describe()
  match = re.search(
    rf'no space left in {re.escape(workdir)}/checkpoints to save checkpoint step {NUM_STEPS}: it '
    r'needs about (\d+) bytes .*, (\d+) bytes are free; .*training resumes from checkpoint step '
    rf'{EVERY}; details in (\S+)\)',
    errors[0],
  )
  assert match, errors[0]
  assert int(match.group(1)) >= on_disk > int(match.group(2))
  assert 'Traceback' not in run.stderr and 'RESOURCE_EXHAUSTED' not in run.stderr, run.describe()
  assert 'No space left on device' in open(match.group(3)).read()  # the details went to the log
  assert committed_steps(workdir) == [EVERY] and not tmp_dirs(workdir)  # no half-written step left
  _, data_state, step = load_state(workdir)
  assert step == EVERY and data_state['step'] == EVERY


def test_a_save_certain_not_to_fit_is_refused_before_writing(tmp_path, small_disk):
  import jax

  _fill(small_disk, 64 << 10)
  checkpointer = checkpoint_lib.Checkpointer(small_disk, async_save=True)
  state = {'w': jax.numpy.zeros((256, 1024), np.float32)}  # 1 MB
  with pytest.raises(
    checkpoint_lib.CheckpointSaveError,
    match=r'to save checkpoint step 1: it needs about 1048576 '
    r'bytes \(1\.0 MB\), \d+ bytes are free.*no checkpoint was committed yet',
  ):
    checkpointer.save(1, state, {'step': 1}, {})
  assert not os.listdir(checkpoint_lib.checkpoint_dir(small_disk))
  checkpointer.manager.close()


# ---------------------------------------------------------------------------------------------------------------------
# Signals


def test_sigterm_during_data_preparation_exits_0_with_nothing_saved(tmp_path, env, config_path):
  workdir = str(tmp_path / 'fresh')
  run = Run(workdir, env, '--verbosity=0', config=config_path, log=str(tmp_path / 'data'))
  deadline = time.time() + 300
  while 'Generated' not in run.stderr:  # the data is being made: the tokenizer comes next
    assert run.proc.poll() is None and time.time() < deadline, run.describe()
    time.sleep(0.02)
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait() == 0, run.describe()
  assert 'preempted: before the first training step; nothing new to save (newest checkpoint: none)' in run.stdout
  assert not committed_steps(workdir) and 'final:' not in run.stdout and 'Traceback' not in run.stderr


def test_sigterm_during_the_final_evaluation_commits_the_final_checkpoint(tmp_path, env, config_path, trained):
  workdir = str(tmp_path / 'final_eval')
  seed_workdir(trained, workdir)
  run = Run(
    workdir,
    env,
    '--config.max_eval_examples=256',
    '--config.eval_translate_examples=256',
    '--config.eval_translate_batch_size=16',
    config=config_path,
    log=str(tmp_path / 'final_eval'),
  )
  deadline = time.time() + 300
  while NUM_STEPS not in committed_steps(workdir):  # the final save commits while the final evaluation runs
    assert run.proc.poll() is None and time.time() < deadline, run.describe()
    time.sleep(0.01)
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait() == 0, run.describe()
  assert (
    f'preempted: during the final evaluation; checkpoint step {NUM_STEPS} is committed in '
    f'{os.path.join(os.path.abspath(workdir), "checkpoints")} (rerun to evaluate it)'
  ) in run.stdout, run.describe()
  assert 'final:' not in run.stdout and 'Traceback' not in run.stderr
  assert committed_steps(workdir) == [EVERY, NUM_STEPS] and not tmp_dirs(workdir)
  assert load_state(workdir)[2] == NUM_STEPS


def test_train_help_documents_the_signal_convention(env):
  out = subprocess.run(
    [os.sys.executable, '-m', 'transformer_jax.cli', 'train', '--help'],
    capture_output=True,
    text=True,
    env=env,
    check=True,
  ).stdout
  assert 'SIGTERM or SIGINT (Ctrl-C) at any phase end the run with exit 0' in out


# ---------------------------------------------------------------------------------------------------------------------
# Damaged artifacts read in-process


def test_a_garbage_generated_data_cache_is_ignored_not_a_traceback(tmp_path, caplog):
  from transformer_jax.data import sources

  path = str(tmp_path / 'cache.tsv')
  sources._write_tsv_cache(path, [('one', 'eins'), ('two', 'zwei')])
  assert sources._read_tsv_cache(path) == [('one', 'eins'), ('two', 'zwei')]
  for damaged in (open(path, 'rb').read()[:-3], b'\xff\xfe\x00garbage\x80\n\x81'):
    with open(path, 'wb') as f:
      f.write(damaged)
    assert sources._read_tsv_cache(path) is None
  assert 'damaged cache file' in caplog.text


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty'])
def test_a_damaged_export_file_is_one_exporterror(tmp_path, damage):
  from transformer_jax import export

  path = str(tmp_path / 'model.safetensors')
  export.write_safetensors(path, {'a.b': np.arange(1000, dtype=np.float32)}, {'step': '3'})
  params, metadata = export.load_params(path)
  assert metadata['step'] == '3' and params['a']['b'].shape == (1000,)
  data = open(path, 'rb').read()
  data = {'truncate': data[: len(data) // 2], 'garbage': bytes(range(256)) * 8, 'empty': b''}[damage]
  with open(path, 'wb') as f:
    f.write(data)
  with pytest.raises(
    export.ExportError, match=r'model\.safetensors is (damaged or not a transformer_jax export|not a)'
  ):
    export.load_params(path)
