"""The CLI end to end: `train` on a few steps in a temp workdir, and bad input answered in one line, nothing lost."""

import os

import pytest

from helpers import cli

# A model and data small enough for a few seconds of training on 2 CPU cores (8 simulated devices, data-parallel).
SMALL = [
  '--config.model.num_layers=1',
  '--config.model.d_model=32',
  '--config.model.num_heads=4',
  '--config.model.d_ff=64',
  '--config.model.vocab_size=128',
  '--config.max_train_examples=3000',
  '--config.max_eval_examples=64',
  '--config.eval_translate_examples=32',
  '--config.batch_size=8',
  '--config.num_train_steps=12',
  '--config.eval_every_steps=6',
  '--config.checkpoint_every_steps=6',
  '--config.log_every_steps=3',
  '--config.tokenizer_train_sentences=3000',
]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run') / 'tiny')
  result = cli('train', f'--workdir={workdir}', *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_train_writes_everything_and_ends_with_the_final_line(trained):
  workdir, result = trained
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith('final: step=12 ')
  fields = dict(kv.split('=') for kv in last[len('final: ') :].split())
  for key in ('loss', 'bleu', 'chrf', 'exact_match', 'eval_loss'):
    float(fields[key])
  for name in ('spm.model', 'curves.png', 'metrics.jsonl', 'tensorboard', 'checkpoints'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6']


def test_train_again_resumes_and_says_so(trained):
  workdir, _ = trained
  result = cli(
    'train',
    f'--workdir={workdir}',
    *SMALL[:-4],
    '--config.num_train_steps=14',
    '--config.eval_every_steps=100',
    '--config.checkpoint_every_steps=100',
    '--config.log_every_steps=1',
    '--config.tokenizer_train_sentences=3000',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 12' in result.stdout
  assert result.stdout.strip().splitlines()[-1].startswith('final: step=14 ')


def test_translate_keeps_order_and_empty_lines(trained):
  workdir, _ = trained
  result = cli('translate', f'--workdir={workdir}', stdin='one\n\ntwo hundred\n')
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(result.stdout.split('\n')) == 4 and result.stdout.split('\n')[1] == ''


def test_evaluate_prints_metrics_last(trained):
  workdir, _ = trained
  result = cli('evaluate', f'--workdir={workdir}', '--batch_size=16')
  assert result.returncode == 0, result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith('bleu=') and ' chrf=' in last


def test_other_architecture_on_a_trained_workdir_is_refused(trained):
  workdir, _ = trained
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  result = cli('train', f'--workdir={workdir}', *SMALL[:1], '--config.model.d_model=64', *SMALL[2:])
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'shape' in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_train_with_no_workdir_writes_runs_tiny_under_the_current_directory(tmp_path):
  result = cli(
    'train',
    *SMALL[:-4],
    '--config.num_train_steps=2',
    '--config.eval_every_steps=100',
    '--config.checkpoint_every_steps=100',
    '--config.tokenizer_train_sentences=3000',
    cwd=str(tmp_path),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'runs' / 'tiny' / 'checkpoints' / '2')


def test_unknown_config_key_is_one_line(tmp_path):
  result = cli('train', f'--workdir={tmp_path}', '--config.no_such_key=1')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('error:')
  assert 'no_such_key' in result.stderr and 'Traceback' not in result.stderr


def test_unknown_command(tmp_path):
  result = cli('fly')
  assert result.returncode == 2 and 'unknown command' in result.stderr


def test_help_lists_commands():
  result = cli('--help')
  assert result.returncode == 0 and 'translate' in result.stdout and 'info' in result.stdout


def _text_workdir(tmp_path, en_lines, de_lines):
  data = tmp_path / 'data'
  data.mkdir()
  (data / 'train.en').write_bytes(en_lines)
  (data / 'train.de').write_bytes(de_lines)
  (data / 'validation.en').write_bytes(b'one\ntwo\n')
  (data / 'validation.de').write_bytes(b'eins\nzwei\n')
  return str(data)


def test_missing_corpus_file_is_one_line(tmp_path):
  result = cli('train', f'--workdir={tmp_path / "w"}', f'--config.dataset=text:{tmp_path / "nowhere"}', *SMALL)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('error:') and 'Traceback' not in result.stderr


def test_empty_corpus_file_is_one_line(tmp_path):
  data = _text_workdir(tmp_path, b'', b'')
  result = cli('train', f'--workdir={tmp_path / "w"}', f'--config.dataset=text:{data}', *SMALL)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('error:') and 'empty' in result.stderr


def test_non_utf8_lines_are_skipped_and_training_runs(tmp_path):
  en = b''.join(b'number %d\n' % i for i in range(200)) + b'bad \xff\xfe line\n'
  de = b''.join(b'nummer %d\n' % i for i in range(200)) + b'schlecht\n'
  data = _text_workdir(tmp_path, en, de)
  result = cli(
    'train',
    f'--workdir={tmp_path / "w"}',
    f'--config.dataset=text:{data}',
    *SMALL[:5],
    '--config.batch_size=8',
    '--config.num_train_steps=2',
    '--config.eval_translate_examples=2',
    '--config.checkpoint_every_steps=100',
    '--config.eval_every_steps=100',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1].startswith('final: step=2')
