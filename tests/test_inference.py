"""translate / evaluate over a workdir: input order, line count, empty lines, truncation, <unk>, the CLI contract.

The workdir is built directly (tokenizer + a randomly initialised, checkpointed TrainState), which is what a
trained run leaves behind, in seconds: a random model's outputs already differ from sentence to sentence.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import tiny
from transformer_jax.training import checkpoint as checkpoint_lib
from transformer_jax.inference import decode
from transformer_jax.inference import translate as inference
from transformer_jax.training import optim
from transformer_jax import parallel
from transformer_jax.inference import scores
from transformer_jax.training import train_state
from transformer_jax.data import sources
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID
from transformer_jax.model.transformer import Transformer
import testenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  config = tiny.get_config()
  config.model.update(num_layers=1, d_model=32, num_heads=4, d_ff=64, vocab_size=128, dropout_rate=0.0)
  config.update(
    max_length=16,
    packed_inputs_length=16,
    packed_targets_length=16,
    batch_size=8,
    max_eval_examples=12,
    async_checkpointing=False,
  )
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = _config()
  workdir = str(tmp_path_factory.mktemp('run'))
  pairs = sources.load_text_pairs(
    config.dataset,
    config.train_split,
    source_lang=config.source_lang,
    target_lang=config.target_lang,
    max_examples=400,
    cache_dir=workdir,
  )
  tokenizer_lib.load_or_train_tokenizer(
    os.path.join(workdir, 'spm.model'), lambda: (x for p in pairs for x in p), config.model.vocab_size
  )
  mesh = parallel.make_mesh(config.mesh)
  model = Transformer(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    state, _ = train_state.create_sharded_state(model, tx, config, mesh, jax.random.key(1))
  checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(7, state, {}, json.loads(config.to_json_best_effort()), force=True)
  checkpointer.wait()
  checkpointer.close()
  return workdir


@pytest.fixture(scope='module')
def loaded(workdir):
  return inference.load_workdir(workdir)


SENTENCES = [
  'one',
  'two hundred',
  '',
  'fifty-five thousand four hundred and twelve',
  '   ',
  'seven million',
  'three',
  'nine hundred and ninety-nine ' * 20,
  'eighty-one',
  'four thousand',
  'one',
  '日本 three ☃',
  'twelve',
  'six',
  'forty',
  'two hundred',
  'ten thousand and one',
  'five',
  'eleven',
  '',
]


@pytest.mark.parametrize('beam_size', [1, 4])
def test_translate_keeps_order_line_count_and_empty_lines(loaded, beam_size):
  out = inference.translate_sentences(loaded, SENTENCES, beam_size=beam_size, batch_size=8)  # 3 batches
  assert len(out) == len(SENTENCES)
  assert [o == '' for o in out] == [not s.strip() for s in SENTENCES]
  assert out[0] == out[10] and out[1] == out[15]  # same sentence, same translation, wherever it is
  assert len(set(out)) > 3, out  # not vacuous: the model's outputs depend on the input
  # a permutation of the input permutes the output
  perm = np.random.default_rng(0).permutation(len(SENTENCES))
  permuted = inference.translate_sentences(loaded, [SENTENCES[i] for i in perm], beam_size=beam_size, batch_size=8)
  assert permuted == [out[i] for i in perm]
  # and each line is what decoding its own source row gives
  real = [s for s in SENTENCES if s.strip()]
  rows = scores.encode_sources(loaded.tokenizer, real, loaded.config.max_length)
  rows = np.pad(rows, ((0, 24 - len(rows)), (0, 0)))
  max_decode_len = inference.decode_length(loaded, int(np.max(np.sum(rows != PAD_ID, 1))))
  if beam_size == 1:
    tokens = decode.greedy_decode(loaded.params, jnp.asarray(rows), cfg=loaded.cfg, max_decode_len=max_decode_len)
  else:
    tokens, _ = decode.beam_search(
      loaded.params, jnp.asarray(rows), cfg=loaded.cfg, beam_size=beam_size, alpha=0.6, max_decode_len=max_decode_len
    )
  assert [o for o in out if o] == scores.decode_outputs(loaded.tokenizer, tokens)[: len(real)]


def test_long_inputs_truncated_and_unknown_characters_are_unk(loaded):
  config = loaded.config
  rows = scores.encode_sources(loaded.tokenizer, [SENTENCES[7], '日本 three ☃'], config.max_length)
  assert rows[0, -1] == EOS_ID and np.all(rows[0] != PAD_ID)  # cut to max_length, EOS kept last
  assert UNK_ID in rows[1]
  assert inference.decode_length(loaded, 5) == config.max_length  # 5 + 50, capped at max_length
  assert inference.translate_sentences(loaded, []) == []
  assert inference.translate_sentences(loaded, ['', ' ']) == ['', '']


def _cli(*args):
  """`transformer-jax ARGS` in a fresh process (8 simulated CPU devices, like the tests)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=testenv.xla_flags(8))
  return subprocess.Popen(
    [sys.executable, '-c', 'from transformer_jax.cli import main; main()', *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_cli_translate_and_evaluate(workdir, loaded):
  """evaluate: last line bleu= chrf= exact_match= (beam 4) then the greedy keys; hypotheses beside the checkpoints.
  translate: one line per input line, in order, from --input=FILE and from stdin."""
  path = os.path.join(workdir, 'input.txt')
  lines = SENTENCES[:8]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  translate = _cli('translate', f'--workdir={workdir}', f'--input={path}', '--beam_size=4')
  evaluate = _cli('evaluate', f'--workdir={workdir}')  # the two processes run side by side
  stdout, stderr = translate.communicate(timeout=600)
  assert translate.returncode == 0, stderr
  assert stdout.split('\n')[:-1] == inference.translate_sentences(loaded, lines, beam_size=4)
  stdout, stderr = evaluate.communicate(timeout=600)
  assert evaluate.returncode == 0, stderr
  last = stdout.strip().splitlines()[-1]
  assert re.fullmatch(
    r'bleu=[\d.]+ chrf=[\d.]+ exact_match=[\d.]+ bleu_greedy=[\d.]+ chrf_greedy=[\d.]+ '
    r'exact_match_greedy=[\d.]+',
    last,
  ), last
  for suffix in ('', '_greedy'):
    with open(os.path.join(workdir, f'hypotheses_validation_step7{suffix}.txt')) as f:
      assert len(f.read().splitlines()) == 12
