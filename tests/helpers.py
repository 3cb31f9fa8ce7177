"""Helpers the test files share: the CLI in a subprocess, the small model's config file, workdir inspection.

conftest.py puts the tests directory on the path (pytest's rootdir-relative import of test modules), so a test file
imports this module as `helpers`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

import testenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The small model of the end-to-end runs: configs/tiny.py at 1 layer, d_model 32.
SMALL_MODEL = dict(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=128)


def small_config_file(model: dict | None = None, **settings) -> str:
  """A config file (Python source) of configs/tiny.py with SMALL_MODEL (updated by `model`) and `settings`: the
  short runs' defaults (2,000 training examples, batch 8, no decoding during training) unless given."""
  settings = {
    'train_split': 'train[:2000]',
    'max_eval_examples': 16,
    'eval_translate_examples': 0,
    'batch_size': 8,
    **settings,
  }
  lines = '\n'.join(f'  config.{key} = {value!r}' for key, value in settings.items())
  return (
    f'from configs import tiny\n\n\ndef get_config():\n  config = tiny.get_config()\n'
    f'  config.model.update(**{dict(SMALL_MODEL, **(model or {}))!r})\n{lines}\n  return config\n'
  )


def to_scan_layout(tree, num_layers: int):
  """Unrolled parameters (layers_0..layers_{N-1}) -> the scanned model's layout (one 'layers' entry, stacked on axis
  0)."""
  import jax
  import jax.numpy as jnp

  if not isinstance(tree, dict):
    return tree
  out = {k: to_scan_layout(v, num_layers) for k, v in tree.items() if not k.startswith('layers_')}
  if 'layers_0' in tree:
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f'layers_{i}'] for i in range(num_layers)])
  return out


def mock_tfds_pairs(num_examples: int, languages=('de', 'en')):
  """tfds.load of any dataset inside this context gives `num_examples` examples with known text: example i has
  '<language> i' under each language (so a swapped pair, a skipped or repeated example, or an ignored cap shows)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    return tf.data.Dataset.from_tensor_slices(
      {lang: [f'{lang} {i}' for i in range(num_examples)] for lang in languages}
    )

  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def load_config_file(text: str):
  """The ConfigDict a config file's source returns (configs/ importable from the checkout)."""
  namespace: dict = {}
  sys.path.insert(0, REPO)
  try:
    exec(compile(text, 'small_config', 'exec'), namespace)
  finally:
    sys.path.remove(REPO)
  return namespace['get_config']()


def cli_env(devices: int | None = None, **extra) -> dict:
  """conftest's environment (its compilation cache and XLA flags) with this checkout first on the path."""
  env = dict(os.environ, PYTHONPATH=REPO, **extra)
  if devices is not None:
    env['XLA_FLAGS'] = testenv.xla_flags(devices)
  return env


def cli(
  *args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 300, cwd: str = REPO
) -> subprocess.CompletedProcess:
  """`transformer-jax ARGS` in a fresh process, its output captured as text."""
  return subprocess.run(
    [sys.executable, '-m', 'transformer_jax.cli', *args],
    capture_output=True,
    text=True,
    input=stdin,
    timeout=timeout,
    cwd=cwd,
    env=env if env is not None else cli_env(),
  )


class Run:
  """One `transformer-jax train` (or `command`) subprocess in the background, its output in files."""

  def __init__(
    self,
    workdir: str,
    env: dict,
    *extra: str,
    command: str = 'train',
    config: str | None = None,
    log: str | None = None,
  ):
    self.workdir = workdir
    log = log or workdir
    self.out_path, self.err_path = log + '.stdout', log + '.stderr'
    args = [sys.executable, '-m', 'transformer_jax.cli', command, f'--workdir={workdir}', *extra]
    if config:
      args.insert(4, f'--config={config}')
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err)

  def wait(self, timeout: float = 300) -> int:
    return self.proc.wait(timeout=timeout)

  @property
  def stdout(self) -> str:
    with open(self.out_path) as f:
      return f.read()

  @property
  def stderr(self) -> str:
    with open(self.err_path) as f:
      return f.read()

  def describe(self) -> str:
    return f'rc={self.proc.returncode}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}'


def interrupt(workdir: str, env: dict, config_path: str, sig: int, delay: float, log: str) -> tuple[Run, int, list]:
  """Starts a run in workdir and sends `sig` `delay` seconds after it commits its first new checkpoint."""
  import pytest

  start = max(committed_steps(workdir), default=0)
  run = Run(workdir, env, config=config_path, log=log)
  deadline = time.time() + 300
  while max(committed_steps(workdir), default=0) <= start:
    if run.proc.poll() is not None:
      pytest.fail(f'{log} ended before its signal:\n{run.describe()}')
    if time.time() > deadline:
      run.proc.kill()
      pytest.fail(f'{log}: no new checkpoint in time')
    time.sleep(0.02)
  time.sleep(delay)
  run.proc.send_signal(sig)
  rc = run.wait()
  return run, rc, committed_steps(workdir)


def error_lines(run) -> list[str]:
  """`error: ...` lines of a Run or CompletedProcess (the progress bar on stderr ends its updates with \\r)."""
  return [line[line.index('error:') :] for line in re.split(r'[\r\n]', run.stdout + run.stderr) if 'error:' in line]


def committed_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def seed_workdir(source: str, target: str) -> None:
  """The tokenizer and generated-data caches of `source` (so runs skip tokenizer training); no checkpoints."""
  os.makedirs(target, exist_ok=True)
  for path in [os.path.join(source, 'spm.model')] + glob.glob(os.path.join(source, '*.tsv')):
    shutil.copy2(path, target)


def snapshot(directory: str) -> dict[str, tuple[int, int, str]]:
  """relative path -> (size, mtime in ns, sha256) of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = (
          os.path.getsize(path),
          os.stat(path).st_mtime_ns,
          hashlib.sha256(f.read()).hexdigest(),
        )
  return out


def load_state(workdir: str, step: int | None = None):
  """(state as numpy, data item, step) of a workdir checkpoint, restored onto this process's 8-device mesh."""
  import jax
  import ml_collections
  from transformer_jax.training import checkpoint as checkpoint_lib
  from transformer_jax.inference import workdir as workdir_lib

  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  config = ml_collections.ConfigDict(checkpointer.restore_config(step))
  abstract, mesh = workdir_lib.trainer_abstract_state(config)
  with jax.set_mesh(mesh):
    state, data_state, restored = checkpointer.restore(abstract, step=step)
  checkpointer.close()
  return jax.device_get(state), data_state, restored


def bitwise_equal(a, b) -> bool:
  """Same tree structure, dtypes and bytes."""
  import jax

  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (
    jax.tree.structure(a) == jax.tree.structure(b)
    and len(la) == len(lb)
    and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
      for x, y in zip(la, lb)
    )
  )


def small_decoder_config(**values):
  """A decoder-only ModelConfig with GPT-2's choices (pre-norm, learned positions, GELU, biases) at test size; the
  caller names vocab_size and max_len, and may override the rest."""
  from transformer_jax.model.config import ModelConfig

  defaults = dict(
    num_layers=2,
    d_model=32,
    num_heads=4,
    d_ff=48,
    dropout_rate=0.0,
    kind='decoder',
    pre_norm=True,
    positional='learned',
    activation='gelu',
    use_bias=True,
  )
  return ModelConfig(**{**defaults, **values})
