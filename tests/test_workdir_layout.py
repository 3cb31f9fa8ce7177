"""storage/layout.py owns the workdir's file names: no other module spells them, and a train run's files are where
the layout says."""

import ast
import gc
import os
import pathlib

import pytest

from helpers import cli
from transformer_jax.storage import layout as layout_lib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'transformer_jax'
LAYOUT = PACKAGE / 'storage' / 'layout.py'

# The layout's names that mean nothing else in the package (data/, marian/, metrics/, profile/ are also mesh axes,
# vocabulary kinds, ... so their spelling elsewhere is not evidence).
OWNED_NAMES = {
  layout_lib.TOKENIZER_NAME,
  layout_lib.CHECKPOINTS_NAME,
  layout_lib.DAMAGED_CHECKPOINTS_NAME,
  layout_lib.METRICS_NAME,
  layout_lib.TENSORBOARD_NAME,
  layout_lib.CURVES_NAME,
  layout_lib.AVERAGED_NAME,
  layout_lib.LOCK_NAME,
}
OWNED_PREFIXES = ('eval_hypotheses_', 'hypotheses_')  # the f-string file names' fixed parts


def spelled_names(source: str) -> list[tuple[int, str]]:
  """(line, text) of each string constant in `source` that is one of the layout's names (or starts an f-string name)."""
  gc.disable()  # (CPython 3.11's AST constructor fails when a finalizer runs inside it: see test_house.py)
  try:
    tree = ast.parse(source)
  finally:
    gc.enable()
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.JoinedStr):
      first = node.values[0] if node.values else None
      if isinstance(first, ast.Constant) and str(first.value).startswith(OWNED_PREFIXES):
        found.append((node.lineno, str(first.value)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in OWNED_NAMES:
      found.append((node.lineno, node.value))
  return found


def test_the_scan_finds_a_spelled_name():
  assert spelled_names("path = os.path.join(workdir, 'spm.model')") == [(1, 'spm.model')]
  assert spelled_names("p = f'eval_hypotheses_{step}.txt'") == [(1, 'eval_hypotheses_')]
  assert spelled_names("p = layout.tokenizer  # 'spm.model' in a comment is not code") == []


def test_only_the_layout_spells_the_workdir_file_names():
  offenders = [
    f'{path.relative_to(PACKAGE.parent)}:{line}: {text!r}'
    for path in sorted(PACKAGE.rglob('*.py'))
    if path != LAYOUT
    for line, text in spelled_names(path.read_text())
  ]
  assert not offenders, 'use storage/layout.py (WorkdirLayout) instead of spelling: ' + '; '.join(offenders)
  assert {text for _, text in spelled_names(LAYOUT.read_text())} >= OWNED_NAMES  # the layout itself names them


@pytest.mark.parametrize('root', ['/tmp/run', 'gs://bucket/run', 'gs://bucket/a/b', 'relative/run'])
def test_every_path_is_under_the_root(root):
  workdir = layout_lib.WorkdirLayout(root)
  named = [
    workdir.tokenizer,
    workdir.marian_dir,
    workdir.checkpoints,
    workdir.damaged_checkpoints,
    workdir.metrics,
    workdir.metrics_parts,
    workdir.metrics_part('0-0'),
    workdir.tensorboard,
    workdir.curves,
    workdir.eval_hypotheses(7),
    workdir.hypotheses('test', 7, '_greedy'),
    workdir.profile,
    workdir.averaged,
    workdir.lock,
  ]
  assert all(p.startswith(root + '/') for p in named)
  assert len(set(named)) == len(named)
  assert workdir.prepared.startswith(root + '/') != workdir.is_gcs  # gs://: a local cache (the shards are mmapped)


def test_of_resolves_a_path_once_and_keeps_a_layout(tmp_path, monkeypatch):
  from transformer_jax.storage import paths

  calls = []
  resolve = paths.resolve
  monkeypatch.setattr(paths, 'resolve', lambda p: calls.append(p) or resolve(p))
  monkeypatch.chdir(tmp_path)
  workdir = layout_lib.of('run')
  assert workdir.root == str(tmp_path / 'run') and calls == ['run']
  assert layout_lib.of(workdir) is workdir and calls == ['run']


def test_a_train_run_writes_where_the_layout_says(tmp_path):
  root = str(tmp_path / 'run')
  result = cli(
    'train',
    f'--workdir={root}',
    '--config.model.num_layers=1',
    '--config.model.d_model=32',
    '--config.model.num_heads=4',
    '--config.model.d_ff=64',
    '--config.model.vocab_size=128',
    '--config.max_train_examples=1000',
    '--config.max_eval_examples=16',
    '--config.eval_translate_examples=8',
    '--config.batch_size=8',
    '--config.num_train_steps=4',
    '--config.eval_every_steps=2',
    '--config.checkpoint_every_steps=2',
    '--config.log_every_steps=2',
    '--config.tokenizer_train_sentences=1000',
  )
  assert result.returncode == 0, result.stderr
  workdir = layout_lib.WorkdirLayout(root)
  expected = {
    workdir.tokenizer,
    workdir.checkpoints,
    workdir.prepared,
    workdir.metrics,
    workdir.tensorboard,
    workdir.curves,
    workdir.eval_hypotheses(2),
    workdir.eval_hypotheses(4),
  }
  for path in expected:
    assert os.path.exists(path), path
  assert sorted(os.listdir(workdir.checkpoints)) == ['2', '4']
  cached = {os.path.join(root, n) for n in os.listdir(root) if n.endswith('.tsv')}  # generated text (data/sources.py)
  assert {os.path.join(root, n) for n in os.listdir(root)} == expected | cached
