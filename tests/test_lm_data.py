"""LM data (data/lm.py): the hash split never trains on a held-out file, the tokenizer round-trips any text, packed
rows hold whole chunks, the stream resumes exactly by step, processes get disjoint documents; and a short run of
the trainer on a few stdlib files learns (held-out loss well under the uniform one)."""

from __future__ import annotations

import math
import os

import ml_collections
import numpy as np
import pytest

from configs import lm_tiny
from transformer_jax.data import lm
from transformer_jax.data import tokenizer as tokenizer_lib


def _config(**overrides):
  config = lm_tiny.get_config()
  config.update(overrides)
  return config


def test_pystdlib_split_is_a_hash_of_the_path_and_disjoint():
  files = lm.stdlib_files()
  assert len(files) > 100 and not any(
    rel.split(os.sep)[0] in ('test', 'idlelib', 'lib2to3', 'site-packages') for rel, _ in files
  )
  held = {rel for rel, _ in files if lm.is_held_out(rel, 5)}
  assert 0 < len(held) < 0.15 * len(files)
  config = _config()
  train, held_out = lm.load_documents(config, 'train'), lm.load_documents(config, 'validation')
  assert not set(train) & set(held_out)  # no held-out file's text is trained on
  assert len(held_out) <= len(held)


@pytest.fixture(scope='module')
def tokenizer():
  lines = [line for _, p in lm.stdlib_files()[:30] for line in open(p, encoding='utf-8').read().splitlines()]
  return tokenizer_lib.Tokenizer(
    tokenizer_lib.train_tokenizer_proto(lines, 400, max_sentences=10_000, options=lm.LM_TOKENIZER_OPTIONS)
  )


def test_tokenizer_round_trips_any_text(tokenizer):
  rng = np.random.default_rng(0)
  texts = ['  def f(x):\n\treturn x  \n\n', '\u2603 \U0001f600 \u65e5\u672c\u8a9e  \r\n', ' leading and trailing  ']
  texts += [''.join(chr(c) for c in rng.integers(1, 0x3000, 40)) for _ in range(20)]
  for text in texts:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chunks_pack_whole_into_rows_and_the_stream_resumes_by_step(tokenizer):
  docs = [open(p, encoding='utf-8').read() for _, p in lm.stdlib_files()[30:50]]
  chunks = lm.tokenize_documents(tokenizer, docs, 64)
  assert all(1 <= len(c) <= 64 for c in chunks)
  assert sum(int(c[-1] == 1) for c in chunks) == len(docs)  # one EOS per document, at its end
  rows = lm.pack_chunks(chunks, 64)
  got = sorted(
    tuple(rows['targets'][r][rows['targets_segmentation'][r] == s])
    for r in range(len(rows['targets']))
    for s in range(1, rows['targets_segmentation'][r].max() + 1)
  )
  assert got == sorted(tuple(c) for c in chunks)
  seg, pos = rows['targets_segmentation'], rows['targets_position']
  starts = (seg > 0) & ((np.roll(seg, 1, axis=1) != seg) | (np.arange(64) == 0))
  assert np.all(pos[starts] == 0)  # positions restart at every chunk
  straight = lm.LMTrainIterator(chunks, batch_size=4, length=64, seed=3)
  want = [next(straight) for _ in range(2 * straight.batches_per_epoch + 3)]
  for step in (0, 1, straight.batches_per_epoch, len(want) - 1):
    resumed = lm.LMTrainIterator(chunks, batch_size=4, length=64, seed=3)
    resumed.set_state({'step': step})
    for k in lm.KEYS:
      np.testing.assert_array_equal(next(resumed)[k], want[step][k])
  assert not np.array_equal(want[0]['targets'], want[straight.batches_per_epoch]['targets'])  # epochs reshuffle


def test_a_short_run_on_a_few_files_learns(tmp_path):
  from transformer_jax.training import train as train_lib

  text = tmp_path / 'text'
  text.mkdir()
  for rel, path in lm.stdlib_files()[:60]:
    (text / rel.replace(os.sep, '_')).write_text(open(path, encoding='utf-8').read())
  config = _config(
    dataset=f'text:{text}',
    eval_percent=10,
    num_train_steps=60,
    eval_every_steps=1000,
    log_every_steps=1000,
    checkpoint_every_steps=1000,
    max_length=64,
    packed_inputs_length=64,
    packed_targets_length=64,
    batch_size=8,
    tokenizer_train_sentences=5000,
    warmup_steps=20,
    lm_sample_prompts=('def ',),
    lm_sample_tokens=8,
  )
  config.model.update(vocab_size=512, num_layers=1, d_model=32, num_heads=4, d_ff=64)
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, dcn_data=1, num_devices=1))
  final = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  # Uniform over 320 pieces is ln 512 = 6.24 nats per token; 60 steps reach well under 4.5.
  assert final['eval_nll'] < 4.5 < math.log(512), final
  assert final['bits_per_byte'] == pytest.approx(final['bits_per_byte']) and 0 < final['bits_per_byte'] < 4
  assert final['perplexity'] == pytest.approx(math.exp(final['eval_nll']))


LM_CONFIG_FILE = """
import ml_collections
from configs import lm_tiny


def get_config():
  config = lm_tiny.get_config()
  config.dataset = 'text:{text}'
  config.eval_percent = 10
  config.model.update(vocab_size=512, num_layers=1, d_model=32, num_heads=4, d_ff=64)
  config.max_length = config.packed_inputs_length = config.packed_targets_length = 32
  config.batch_size = 8
  config.tokenizer_train_sentences = 3000
  config.num_train_steps = 12
  config.checkpoint_every_steps = 4
  config.eval_every_steps = 1000
  config.log_every_steps = 1000
  config.lm_sample_prompts = ()
  config.keep_checkpoints = 5
  return config
"""


def test_lm_kill_9_and_resume_is_bitwise_equal_to_a_straight_run(tmp_path):
  import signal
  import helpers as ckpt

  text = tmp_path / 'text'
  text.mkdir()
  for rel, path in lm.stdlib_files()[:30]:
    (text / rel.replace(os.sep, '_')).write_text(open(path, encoding='utf-8').read())
  config_path = tmp_path / 'lm_small.py'
  config_path.write_text(LM_CONFIG_FILE.format(text=text))
  env = ckpt.cli_env()  # conftest's, with the session's compilation cache
  straight = str(tmp_path / 'straight')
  run = ckpt.Run(straight, env, config=str(config_path))
  assert run.wait() == 0, run.describe()
  workdir = str(tmp_path / 'killed')
  ckpt.seed_workdir(straight, workdir)
  killed, rc, steps = ckpt.interrupt(workdir, env, str(config_path), signal.SIGKILL, 0.0, str(tmp_path / 'kill'))
  assert rc == -signal.SIGKILL and max(steps) < 12, killed.describe()
  final = ckpt.Run(workdir, env, config=str(config_path), log=str(tmp_path / 'final'))
  assert final.wait() == 0, final.describe()
  assert f'resumed from step {max(steps)}' in final.stdout and 'final: step=12' in final.stdout
  want, want_data, _ = ckpt.load_state(straight, 12)
  got, got_data, _ = ckpt.load_state(workdir, 12)
  assert got_data == want_data and ckpt.bitwise_equal(got.params, want.params)
  assert ckpt.bitwise_equal(got.opt_state, want.opt_state)
  assert not ckpt.bitwise_equal(got.params, ckpt.load_state(straight, 8)[0].params)
