"""export --format=ctranslate2 (the [serve] extra; skipped without ctranslate2): CTranslate2 translates a trained model
as ours does, float32 exactly, int8 nearly; language models through its Generator; refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

import helpers
from transformer_jax import export as export_lib
from transformer_jax.inference import generate
from transformer_jax.inference import translate as inference
from transformer_jax.data import sources
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.export import ctranslate2 as ct2_export
from transformer_jax.model.transformer import LanguageModel, ModelConfig, Transformer

import test_quantize

ctranslate2 = pytest.importorskip('ctranslate2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', 'transformer_jax.cli', *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env
  )


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(loaded workdir, CTranslate2 directory written by the CLI, held-out sources). The model is test_quantize's, trained
  until its outputs are number words ending in EOS (held-out exact match ~83%): its decisions have margins, as a
  real model's do, and some are close."""
  workdir, out = test_quantize.trained_workdir(tmp_path_factory), str(tmp_path_factory.mktemp('ct2') / 'ct2')
  result = _cli('export', f'--workdir={workdir}', '--format=ctranslate2', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = inference.load_workdir(workdir)
  pairs = sources.load_text_pairs(
    'generated:numbers_en_de', 'validation', source_lang='en', target_lang='de', max_examples=64, cache_dir=workdir
  )
  return loaded, out, [s for s, _ in pairs]


def _translate(out, sentences, compute_type, **options):
  sp = tokenizer_lib.Tokenizer.load(os.path.join(out, 'spm.model')).processor
  translator = ctranslate2.Translator(out, compute_type=compute_type, intra_threads=1)
  results = translator.translate_batch([sp.encode(s, out_type=str) for s in sentences], **options)
  return [sp.decode(r.hypotheses[0]) for r in results]


@pytest.fixture(scope='module')
def ours(trained):
  """Our translations of the held-out sources, greedy and beam 4 (alpha 0: both beam searches then rank by
  log-probability alone; with a length penalty they stop by different rules: CTranslate2 once beam_size * patience
  hypotheses have finished, ours when no alive one can still win)."""
  loaded, _, sentences = trained
  return {beam: inference.translate_sentences(loaded, sentences, beam_size=beam, alpha=0.0) for beam in (1, 4)}


def _theirs(trained, compute_type, beam_size):
  loaded, out, sentences = trained
  longest = max(len(loaded.tokenizer.encode(s)) for s in sentences) + 1
  return _translate(
    out,
    sentences,
    compute_type,
    beam_size=beam_size,
    length_penalty=0.0,
    max_decoding_length=inference.decode_length(loaded, longest),
  )


def test_the_directory_holds_ctranslate2_files_and_the_tokenizer(trained):
  loaded, out, _ = trained
  assert {'model.bin', 'config.json', 'shared_vocabulary.json', 'spm.model'} <= set(os.listdir(out))
  with open(os.path.join(out, 'spm.model'), 'rb') as f, open(loaded.tokenizer_path, 'rb') as g:
    assert f.read() == g.read()


@pytest.mark.parametrize('beam_size', [1, 4])
def test_float32_translations_equal_ours(trained, ours, beam_size):
  assert sum(bool(t) for t in ours[beam_size]) >= len(ours[beam_size]) * 0.9  # real outputs on both sides
  assert _theirs(trained, 'float32', beam_size) == ours[beam_size]


def test_int8_translations_mostly_equal_ours(trained, ours):
  agreement = [np.mean([a == b for a, b in zip(ours[beam], _theirs(trained, 'int8', beam))]) for beam in (1, 4)]
  print(f'int8 agreement with our float32: greedy {agreement[0]:.3f}, beam 4 {agreement[1]:.3f}')
  assert min(agreement) >= 0.95


def test_scores_are_our_log_probabilities(trained):
  """Teacher-forced log P(target token) from CTranslate2's score_batch equals ours token by token, once PAD and BOS
  get the export's bias (a model trained with label smoothing gives them ~0.1% of the mass)."""
  loaded, out, sentences = trained
  sp = tokenizer_lib.Tokenizer.load(os.path.join(out, 'spm.model')).processor
  translations = inference.translate_sentences(loaded, sentences[:8], beam_size=1)
  translator = ctranslate2.Translator(out, compute_type='float32')
  scores = translator.score_batch(
    [sp.encode(s, out_type=str) for s in sentences[:8]], [sp.encode(t, out_type=str) for t in translations]
  )
  params = jax.tree.map(jnp.asarray, loaded.params)
  for source, target, score in zip(sentences[:8], translations, scores):
    inputs = jnp.asarray([sp.encode(source) + [1]], jnp.int32)
    targets = jnp.asarray([sp.encode(target) + [1]], jnp.int32)
    logits = np.array(Transformer(loaded.cfg).apply({'params': params}, inputs, targets)[0], np.float32)
    logits[:, [0, 3]] = ct2_export.FORBIDDEN_LOGIT
    log_probs = np.asarray(jax.nn.log_softmax(logits))[np.arange(targets.shape[1]), np.asarray(targets[0])]
    np.testing.assert_allclose(np.asarray(score.log_probs), log_probs, atol=1e-4)


def test_positions_must_be_ours(trained, ours, tmp_path, monkeypatch):
  """The explicit interleaved sinusoid table matters: CTranslate2's own (sin half, cos half) scores differently."""
  loaded, _, sentences = trained
  source = export_lib.Exportable(
    config=loaded.config,
    cfg=loaded.cfg,
    params=jax.tree.map(np.asarray, loaded.params),
    tokenizer_path=loaded.tokenizer_path,
    step=loaded.step,
  )
  import transformer_jax.model.transformer as model_lib

  table = model_lib.sinusoidal_table
  halves = lambda n, d: np.concatenate([table(n, d)[:, 0::2], table(n, d)[:, 1::2]], axis=1)
  out = str(tmp_path / 'halves')
  monkeypatch.setattr(model_lib, 'sinusoidal_table', halves)
  export_lib.export(source, 'ctranslate2', out)
  monkeypatch.undo()
  wrong = _translate(out, sentences, 'float32', beam_size=1)
  assert np.mean([a == b for a, b in zip(wrong, ours[1])]) < 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Language models: ctranslate2.Generator


LM_VOCAB, LM_LENGTH = 64, 40  # 60 SentencePiece pieces + 4 rows without one


@pytest.fixture(scope='module')
def language_model(tmp_path_factory):
  """A random pre-norm LM with learned positions, GELU and attention biases (the other layout paths)."""
  root = tmp_path_factory.mktemp('ct2lm')
  rng = np.random.default_rng(0)
  words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu'.split()
  lines = [' '.join(rng.choice(words, rng.integers(2, 9))) for _ in range(2000)]
  spm_path = root / 'spm.model'
  spm_path.write_bytes(tokenizer_lib.train_tokenizer_proto(lines, 60))
  cfg = helpers.small_decoder_config(vocab_size=LM_VOCAB, max_len=LM_LENGTH)
  model = LanguageModel(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, LM_LENGTH), jnp.int32))['params'])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [np.asarray(x + 0.3 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
  config = ml_collections.ConfigDict({'model': dict(cfg.__dict__, dtype='float32')})
  source = export_lib.Exportable(config=config, cfg=cfg, params=params, tokenizer_path=str(spm_path), step=1)
  out = str(root / 'ct2')
  export_lib.export(source, 'ctranslate2', out)
  return source, out, tokenizer_lib.Tokenizer.load(str(spm_path)), lines[:8]


def test_generator_scores_and_greedy_continuations_equal_ours(language_model):
  source, out, tok, prompts = language_model
  generator = ctranslate2.Generator(out, compute_type='float32')
  sp = tok.processor
  ids = [3] + sp.encode(prompts[0])
  logits = np.array(LanguageModel(source.cfg).apply({'params': source.params}, jnp.asarray([ids[1:] + [1]]))[0])
  logits[:, [0, 3]] = ct2_export.FORBIDDEN_LOGIT  # the export's bias: PAD and BOS are never generated
  ours = np.asarray(jax.nn.log_softmax(logits))[np.arange(len(ids)), ids[1:] + [1]]
  theirs = generator.score_batch([['<s>'] + sp.encode(prompts[0], out_type=str) + ['</s>']])[0].log_probs
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  completions = generate.generate_texts(source.params, source.cfg, tok, prompts, max_new_tokens=10, temperature=0.0)
  results = generator.generate_batch(
    [['<s>'] + sp.encode(p, out_type=str) for p in prompts],
    max_length=10,
    sampling_topk=1,
    include_prompt_in_result=False,
  )
  assert [tok.decode(r.sequences_ids[0]) for r in results] == completions
  assert sum(len(c) for c in completions) > 20  # text, not empty continuations on both sides


def test_what_ctranslate2_cannot_express_is_refused(language_model, tmp_path):
  source, _, _, _ = language_model
  windowed = export_lib.Exportable(
    config=source.config,
    cfg=ModelConfig(**{**source.cfg.__dict__, 'attention_window': 8}),
    params=source.params,
    tokenizer_path=source.tokenizer_path,
    step=1,
  )
  with pytest.raises(export_lib.ExportError, match='attention_window'):
    export_lib.export(windowed, 'ctranslate2', str(tmp_path / 'w'))
  with pytest.raises(export_lib.ExportError, match='exists and is not empty'):
    export_lib.export(source, 'ctranslate2', language_model[1])
  assert ct2_export.FORBIDDEN_LOGIT < -1e3
