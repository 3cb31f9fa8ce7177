"""Checkpoints: bit-exact resume after SIGKILL, SIGTERM saves, restore onto other meshes, damage, averaging.

The end-to-end tests run `python -m transformer_jax.cli train` in subprocesses (8 simulated CPU devices, inherited
from conftest) on a 1-layer d_model=32 model: one straight run, and one run interrupted three times (SIGTERM,
SIGKILL, SIGKILL) and resumed each time, whose final parameters must equal the straight run's bit for bit. The
subprocesses share a JAX compilation cache, so only the first compiles the train step.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from transformer_jax.training import checkpoint as checkpoint_lib
from transformer_jax.training import optim
from transformer_jax import parallel
from transformer_jax.training import run_control
from transformer_jax.training import train as train_lib
from transformer_jax.training import train_state
from transformer_jax.inference import workdir as workdir_lib
from transformer_jax.model.transformer import Transformer
import helpers
from helpers import (
  Run,
  bitwise_equal,
  committed_steps,
  error_lines,
  interrupt,
  load_state,  # noqa: F401
  seed_workdir,
  snapshot,
)
import testenv

NUM_STEPS = 20
EVERY = 4

# The small run every test shares (configs/tiny.py with helpers.SMALL_MODEL at 8 heads).
OVERRIDES = dict(helpers.SMALL_MODEL, num_heads=8)
CONFIG_FILE = helpers.small_config_file(
  OVERRIDES,
  max_eval_examples=64,
  num_train_steps=NUM_STEPS,
  checkpoint_every_steps=EVERY,
  eval_every_steps=1000,
  log_every_steps=1000,
  keep_checkpoints=3,
)


def small_config() -> ml_collections.ConfigDict:
  return helpers.load_config_file(CONFIG_FILE)


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('config') / 'small.py'
  path.write_text(CONFIG_FILE)
  return str(path)


@pytest.fixture(scope='module')
def straight(tmp_path_factory, env, config_path):
  """NUM_STEPS steps without interruption (checkpoints every EVERY steps, keep 3)."""
  workdir = str(tmp_path_factory.mktemp('runs') / 'straight')
  run = Run(workdir, env, config=config_path)
  assert run.wait() == 0, run.describe()
  assert f'final: step={NUM_STEPS}' in run.stdout, run.describe()
  assert committed_steps(workdir) == [NUM_STEPS - 2 * EVERY, NUM_STEPS - EVERY, NUM_STEPS]
  return workdir


@pytest.fixture(scope='module')
def chain(tmp_path_factory, env, config_path, straight):
  """One workdir interrupted three times, then finished: SIGTERM after its first checkpoint; SIGKILL right after the
  resumed run's first new checkpoint; SIGKILL a random 0-0.3 s after the next run's first new checkpoint; resume."""
  root = tmp_path_factory.mktemp('chain')
  workdir = str(root / 'workdir')
  seed_workdir(straight, workdir)
  rng = random.Random(2017)
  out = {}
  for name, sig, delay in (
    ('sigterm', signal.SIGTERM, 0.0),
    ('kill_1', signal.SIGKILL, 0.0),
    ('kill_2', signal.SIGKILL, rng.uniform(0.0, 0.3)),
  ):
    out[name] = interrupt(workdir, env, config_path, sig, delay, str(root / name))
  final = Run(workdir, env, config=config_path, log=str(root / 'final'))
  assert final.wait() == 0, final.describe()
  out['final'] = (final, 0, committed_steps(workdir))
  out['workdir'] = workdir
  return out


def _resumed_from(run: Run) -> int:
  match = re.findall(r'^resumed from step (\d+)$', run.stdout, re.M)
  assert len(match) == 1, run.describe()
  return int(match[0])


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume and preemption


def test_sigterm_saves_where_it_stopped_and_exits_0(chain):
  run, rc, steps = chain['sigterm']
  assert rc == 0, run.describe()
  match = re.findall(r'^preempted: saved checkpoint at step (\d+) in (\S+)$', run.stdout, re.M)
  assert len(match) == 1, run.describe()
  stopped, directory = int(match[0][0]), match[0][1]
  assert directory == os.path.join(os.path.abspath(chain['workdir']), 'checkpoints')
  assert max(steps) == stopped and EVERY <= stopped < NUM_STEPS
  assert 'final:' not in run.stdout
  assert _resumed_from(chain['kill_1'][0]) == stopped  # the next run continues from there


def test_sigkill_twice_then_resume_is_bitwise_equal_to_a_straight_run(chain, straight):
  kill_points = []
  for name, following in (('kill_1', 'kill_2'), ('kill_2', 'final')):
    run, rc, steps = chain[name]
    assert rc == -signal.SIGKILL, run.describe()
    assert 'final:' not in run.stdout
    assert _resumed_from(chain[following][0]) == max(steps)  # the newest committed checkpoint
    kill_points.append(max(steps))
  assert kill_points[0] < kill_points[1] < NUM_STEPS
  final = chain['final'][0]
  assert f'final: step={NUM_STEPS}' in final.stdout
  want, want_data, _ = load_state(straight, NUM_STEPS)
  got, got_data, _ = load_state(chain['workdir'], NUM_STEPS)
  assert got_data == want_data and want_data['step'] == NUM_STEPS
  assert bitwise_equal(got.params, want.params)
  assert bitwise_equal(got.opt_state, want.opt_state)
  # Not vacuous: the parameters moved between checkpoints.
  assert not bitwise_equal(got.params, load_state(straight, NUM_STEPS - EVERY)[0].params)


# ---------------------------------------------------------------------------------------------------------------------
# Faults


def test_other_architecture_is_refused_by_the_cli_and_nothing_is_overwritten(tmp_path, env, config_path, straight):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(straight, workdir)
  before = snapshot(workdir)
  run = Run(workdir, env, '--config.model.d_model=64', config=config_path, log=str(tmp_path / 'mismatch'))
  assert run.wait() != 0, run.describe()
  errors = error_lines(run)
  assert len(errors) == 1, run.describe()
  match = re.search(r'parameter (\[\S+\]) has shape (\([\d, ]+\)) but the model expects (\([\d, ]+\))', errors[0])
  assert match, errors[0]
  assert '32' in match.group(2) and '64' in match.group(3) and match.group(2) != match.group(3)
  assert 'Traceback' not in run.stderr
  assert snapshot(workdir) == before


def _truncate_arrays(step_dir: str) -> None:
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True) if os.path.isfile(f)]
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(step_dir: str) -> None:
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True) if os.path.isfile(f)]
  for path in files:
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2] ^= 0xFF
    open(path, 'wb').write(bytes(data))


def _empty_everything(step_dir: str) -> None:
  for path in glob.glob(os.path.join(step_dir, '**', '*'), recursive=True):
    if os.path.isfile(path):
      open(path, 'w').close()


# A failed tensorstore read can finish after orbax closed its event loop: Python reports it as unraisable. Harmless.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [_truncate_arrays, _flip_bytes, _empty_everything])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, capfd, damage):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(straight, workdir)
  damage(os.path.join(workdir, 'checkpoints', str(NUM_STEPS)))
  capfd.readouterr()
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3, async_save=False)
  config = ml_collections.ConfigDict(checkpointer.restore_config())
  abstract, mesh = workdir_lib.trainer_abstract_state(config)
  with jax.set_mesh(mesh):
    state, data_state, step = checkpointer.restore(abstract)
    err = capfd.readouterr().err
    assert step == NUM_STEPS - EVERY
    assert f'warning: checkpoint step {NUM_STEPS} ' in err and 'damaged' in err
    want, want_data, _ = load_state(straight, NUM_STEPS - EVERY)
    assert bitwise_equal(jax.device_get(state), want) and data_state == want_data
    # The damaged step is moved aside (not deleted), so training can save that step again.
    assert checkpointer.all_steps() == [NUM_STEPS - 2 * EVERY, NUM_STEPS - EVERY]
    assert os.listdir(os.path.join(workdir, checkpoint_lib.DAMAGED_DIR))[0].startswith(f'{NUM_STEPS}-')
    checkpointer.save(NUM_STEPS, state, data_state, config.to_dict())
    checkpointer.wait()
  checkpointer.close()
  assert committed_steps(workdir)[-1] == NUM_STEPS


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_read_only_restore_falls_back_but_moves_nothing(tmp_path, straight, capfd):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(straight, workdir)
  _truncate_arrays(os.path.join(workdir, 'checkpoints', str(NUM_STEPS)))
  _, _, step = load_state(workdir)
  assert step == NUM_STEPS - EVERY and 'damaged' in capfd.readouterr().err
  assert committed_steps(workdir)[-1] == NUM_STEPS and not os.path.exists(
    os.path.join(workdir, checkpoint_lib.DAMAGED_DIR)
  )


def test_non_finite_update_stops_with_the_step_and_saves_nothing(tmp_path, env, config_path, straight):
  """A finite checkpoint whose next Adam update overflows (first moment near float32's max, second moment 0): loss
  and gradients at that step are finite, the new parameters are not. The run must stop naming the step and keep
  the last good checkpoint."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(straight, workdir)
  state, data_state, _ = load_state(workdir, NUM_STEPS)
  config = small_config()
  abstract, mesh = workdir_lib.trainer_abstract_state(config)

  def poison(path, x):
    name = jax.tree_util.keystr(path)
    if '.mu' in name or "'mu'" in name:
      return np.full_like(x, 3e38)
    if '.nu' in name or "'nu'" in name:
      return np.zeros_like(x)
    return x

  opt_state = jax.tree_util.tree_map_with_path(poison, state.opt_state)
  assert not bitwise_equal(opt_state, state.opt_state)
  poisoned = state.replace(opt_state=opt_state)
  assert checkpoint_lib.tree_all_finite(poisoned)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(NUM_STEPS)))
  with jax.set_mesh(mesh):
    poisoned = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), poisoned, abstract)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3, async_save=False)
    checkpointer.save(NUM_STEPS, poisoned, data_state, config.to_dict())
    checkpointer.close()
  before = snapshot(os.path.join(workdir, 'checkpoints'))
  run = Run(
    workdir,
    env,
    f'--config.num_train_steps={NUM_STEPS + 4}',
    '--config.checkpoint_every_steps=1',
    config=config_path,
    log=str(tmp_path / 'nan'),
  )
  assert run.wait() == 1, run.describe()
  errors = error_lines(run)
  assert len(errors) == 1, run.describe()
  assert f'at step {NUM_STEPS + 1}; stopping without saving (last good checkpoint: step {NUM_STEPS})' in errors[0]
  assert snapshot(os.path.join(workdir, 'checkpoints')) == before  # nothing saved, nothing left half-written


def test_stop_if_not_finite_names_the_step_and_waits_for_pending_saves():
  calls = []

  class FakeCheckpointer:
    def wait(self):
      calls.append('wait')

    def latest_step(self):
      return 8

  run_control.stop_if_not_finite({'loss': 1.0, 'grad_norm': 2.0}, 9, FakeCheckpointer())
  with pytest.raises(run_control.NonFiniteLossError, match=r'loss=nan at step 10; .*last good checkpoint: step 8'):
    run_control.stop_if_not_finite({'loss': float('nan'), 'grad_norm': 1.0}, 10, FakeCheckpointer())
  with pytest.raises(run_control.NonFiniteLossError, match=r'grad_norm=inf at step 11'):
    run_control.stop_if_not_finite({'loss': 1.0, 'grad_norm': float('inf')}, 11, FakeCheckpointer())
  assert calls == ['wait', 'wait']


# ---------------------------------------------------------------------------------------------------------------------
# Restore onto another mesh


def _train_pieces(config, mesh):
  model = Transformer(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  shardings = parallel.logical_shardings(train_state.state_logical_specs(model, tx, config), mesh)
  return model, tx, shardings


def _batch(config, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {
    'inputs': rng.integers(
      4, config.model.vocab_size, (config.batch_size, config.packed_inputs_length), dtype=np.int32
    ),
    'targets': rng.integers(
      4, config.model.vocab_size, (config.batch_size, config.packed_targets_length), dtype=np.int32
    ),
  }


def test_checkpoint_from_a_2x2x2_mesh_restores_on_one_device_and_on_4x1x1_and_trains_on(tmp_path):
  config = small_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  devices = jax.devices()
  assert len(devices) == 8
  mesh = parallel.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    model, tx, shardings = _train_pieces(config, mesh)
    # Any values of the right shapes will do (and need no compilation): random floats, step 7.
    rng = np.random.default_rng(0)
    saved = jax.tree.map(
      lambda a: (
        rng.normal(size=a.shape).astype(a.dtype)
        if jnp.issubdtype(a.dtype, jnp.floating)
        else np.full(a.shape, 7, a.dtype)
      ),
      train_state.abstract_state(model, tx, config, shardings),
    )
    state = jax.device_put(saved, shardings)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))  # really sharded
    assert {x.sharding.spec for x in jax.tree.leaves(state.params)} >= {P('fsdp', 'tensor')}
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), async_save=True)
    checkpointer.save(7, state, {'step': 7}, config.to_dict())
    checkpointer.wait()
    checkpointer.close()

  losses = []
  for shape, n in (((1, 1, 1), 1), ((4, 1, 1), 4)):
    target_config = small_config()
    target_config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
    target_mesh = parallel.make_mesh(target_config.mesh, devices=devices[:n])
    with jax.set_mesh(target_mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
      model, tx, shardings = _train_pieces(target_config, target_mesh)
      abstract = train_state.abstract_state(model, tx, target_config, shardings)
      checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
      restored, data_state, step = checkpointer.restore(abstract)
      checkpointer.close()
      assert step == 7 and data_state == {'step': 7}
      assert all(x.sharding.mesh.devices.size == n for x in jax.tree.leaves(restored))
      assert bitwise_equal(jax.device_get(restored), saved)
      train_step = train_lib.jit_train_step(model, tx, target_config, target_mesh, shardings)
      restored, metrics = train_step(
        restored, parallel.global_batch(_batch(target_config, 1), target_mesh), jax.random.key(1)
      )
      assert int(restored.step) == 8 and np.isfinite(float(metrics['loss']))
      assert not bitwise_equal(jax.device_get(restored.params), saved.params)
      losses.append(float(metrics['loss']))
  # The same step from the same checkpoint on two meshes: the same loss up to the order of floating-point sums.
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Averaging


def test_average_trees_is_the_exact_mean():
  a = {'w': np.array([1e8, 1.0, 3.0], np.float32), 'b': {'c': np.array([[2.0]], np.float32)}}
  b = {'w': np.array([1.0, 2.0, -7.0], np.float32), 'b': {'c': np.array([[4.0]], np.float32)}}
  c = {'w': np.array([-1e8, 4.0, 1.0], np.float32), 'b': {'c': np.array([[9.0]], np.float32)}}
  mean = checkpoint_lib.average_trees([a, b, c])
  assert mean['w'].dtype == np.float32
  # float32 sums in this order would give 0 for the first element; the exact mean is 1/3.
  np.testing.assert_array_equal(mean['w'], np.array([np.float32(1 / 3), np.float32(7 / 3), np.float32(-1.0)]))
  np.testing.assert_array_equal(mean['b']['c'], np.array([[5.0]], np.float32))
  for order in ([c, a, b], [b, c, a]):
    assert bitwise_equal(checkpoint_lib.average_trees(order), mean)
  with pytest.raises(ValueError):
    checkpoint_lib.average_trees([])


def test_average_command_writes_a_workdir_that_inference_loads(tmp_path, env, straight):
  from transformer_jax.inference import translate as inference

  out = str(tmp_path / 'averaged')
  run = Run(straight, env, '--last=3', f'--out={out}', command='average', log=str(tmp_path / 'average'))
  assert run.wait() == 0, run.describe()
  steps = [NUM_STEPS - 2 * EVERY, NUM_STEPS - EVERY, NUM_STEPS]
  assert f'averaged steps {",".join(map(str, steps))}' in run.stdout
  assert committed_steps(out) == [NUM_STEPS]
  assert os.path.exists(os.path.join(out, 'spm.model'))
  summary = json.load(open(os.path.join(out, 'averaged.json')))
  assert summary['steps'] == steps and summary['optimizer_state'] == f'copied from step {NUM_STEPS}'

  sources = [load_state(straight, s)[0] for s in steps]
  want = jax.tree.map(
    lambda *xs: (sum(np.asarray(x, np.float64) for x in xs) / len(xs)).astype(np.float32), *[s.params for s in sources]
  )
  got, got_data, _ = load_state(out)
  assert bitwise_equal(got.params, want)
  assert bitwise_equal(got.opt_state, sources[-1].opt_state) and int(got.step) == NUM_STEPS
  assert got_data['step'] == NUM_STEPS
  assert not bitwise_equal(got.params, sources[-1].params)

  loaded = inference.load_workdir(out)  # what evaluate / translate / export use
  assert loaded.step == NUM_STEPS and loaded.tokenizer.vocab_size <= OVERRIDES['vocab_size']
  assert bitwise_equal(jax.device_get(loaded.params), want)

  with pytest.raises(ValueError, match='already holds checkpoints'):
    workdir_lib.average_workdir(straight, out, last=3)
  with pytest.raises(ValueError, match=r'--last=4 but .* holds 3 checkpoints'):
    workdir_lib.average_workdir(straight, str(tmp_path / 'other'), last=4)


# ---------------------------------------------------------------------------------------------------------------------
# Several processes: SIGTERM to one host, every host saves the same step and exits 0


def test_sigterm_to_one_of_two_processes_saves_one_agreed_step(tmp_path, env, config_path, straight):
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / 'workdir')
  seed_workdir(straight, workdir)
  process_env = dict(env, XLA_FLAGS=testenv.xla_flags(4))  # 2 x 4 = 8 devices
  # --verbosity=0: orbax's INFO line 'Reached preemption sync point' is the evidence both hosts agreed
  runs = [
    Run(
      workdir,
      process_env,
      f'--config.num_train_steps={NUM_STEPS * 5}',
      f'--process_id={i}',
      '--verbosity=0',
      '--num_processes=2',
      f'--coordinator_address=127.0.0.1:{port}',
      config=config_path,
      log=str(tmp_path / f'process{i}'),
    )
    for i in range(2)
  ]
  try:
    deadline = time.time() + 300
    while not committed_steps(workdir):
      assert all(r.proc.poll() is None for r in runs), '\n'.join(r.describe() for r in runs)
      assert time.time() < deadline, 'no checkpoint in time'
      time.sleep(0.05)
    runs[1].proc.send_signal(signal.SIGTERM)  # not the chief: the notice must reach process 0 through JAX
    codes = [r.wait(timeout=120) for r in runs]
  finally:
    for r in runs:
      if r.proc.poll() is None:
        r.proc.kill()
  assert codes == [0, 0], '\n'.join(r.describe() for r in runs)
  match = re.findall(r'^preempted: saved checkpoint at step (\d+) in ', runs[0].stdout, re.M)
  assert len(match) == 1, runs[0].describe()
  stopped = int(match[0])
  assert max(committed_steps(workdir)) == stopped < NUM_STEPS * 5
  for r in runs:  # both hosts stopped at the same step (orbax logs the sync point on each)
    assert f'Reached preemption sync point, step={stopped}' in r.stderr, r.describe()
