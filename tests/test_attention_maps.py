"""Attention weights out of the model (model.py's explicit path) and `transformer-jax attention`.

The weights must be probabilities over exactly the keys the training masks allow (packed rows, padding, causality),
and must be the ones each layer used: recomputing its output from them reproduces it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from transformer_jax.inference import attention_maps
from transformer_jax.model.transformer import ModelConfig, MultiHeadAttention, Transformer
import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0, max_len=32)

# Two packed rows: 3 source / 3 target segments, then 2 and padding; positions restart per segment.
INPUTS_SEGMENTATION = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0]], np.int32)
TARGETS_SEGMENTATION = np.array([[1, 1, 1, 2, 2, 3, 3, 0], [1, 1, 2, 2, 2, 2, 0, 0]], np.int32)


def _positions(segmentation):
  positions = np.zeros_like(segmentation)
  for b, row in enumerate(segmentation):
    for i in range(1, len(row)):
      positions[b, i] = positions[b, i - 1] + 1 if row[i] == row[i - 1] else 0
  return np.where(segmentation == 0, 0, positions)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  inputs = np.where(INPUTS_SEGMENTATION > 0, rng.integers(4, CFG.vocab_size, INPUTS_SEGMENTATION.shape), 0)
  targets = np.where(TARGETS_SEGMENTATION > 0, rng.integers(4, CFG.vocab_size, TARGETS_SEGMENTATION.shape), 0)
  return dict(
    inputs=jnp.asarray(inputs, jnp.int32),
    targets=jnp.asarray(targets, jnp.int32),
    inputs_segmentation=jnp.asarray(INPUTS_SEGMENTATION),
    targets_segmentation=jnp.asarray(TARGETS_SEGMENTATION),
    inputs_position=jnp.asarray(_positions(INPUTS_SEGMENTATION)),
    targets_position=jnp.asarray(_positions(TARGETS_SEGMENTATION)),
  )


@functools.cache
def _params(cfg):
  batch = _batch()
  init = jax.jit(lambda rng: Transformer(cfg).init(rng, batch['inputs'], batch['targets'])['params'])
  return nn.unbox(init(jax.random.key(0)))


@functools.cache
def _explicit(cfg):
  """(logits, weights) of the explicit path, jitted, shared by the tests of one config."""
  return jax.jit(lambda p, b: attention_maps.attention_weights(p, cfg, **b))(_params(cfg), _batch())


def _allowed():
  """The masks training uses, written out independently: [B, Tq, Tk] per kind."""
  s, t = INPUTS_SEGMENTATION, TARGETS_SEGMENTATION
  same = lambda q, k: (q[:, :, None] == k[:, None, :]) & (k[:, None, :] != 0)
  causal = np.tril(np.ones((t.shape[1], t.shape[1]), bool))[None]
  return {'encoder_self': same(s, s), 'decoder_self': same(t, t) & causal, 'cross': same(t, s)}


@pytest.mark.parametrize('scan_layers,remat', [(False, 'none'), (True, 'full')])
def test_weights_are_probabilities_over_allowed_keys_only(scan_layers, remat):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers, remat=remat)
  _, weights = _explicit(cfg)
  for kind, allowed in _allowed().items():
    w = np.asarray(weights[kind])
    assert w.shape == (cfg.num_layers, 2, cfg.num_heads) + allowed.shape[1:], kind
    allowed = np.broadcast_to(allowed[None, :, None], w.shape)
    assert np.all(w[~allowed] == 0.0), kind  # padding, other packed segments, the future: exactly 0
    assert np.all(w >= 0.0)
    rows = allowed.any(axis=-1)
    np.testing.assert_allclose(w.sum(axis=-1)[rows], 1.0, atol=1e-5, err_msg=kind)
    assert np.all(w.sum(axis=-1)[~rows] == 0.0)  # padding queries attend to nothing
    assert np.ptp(w[allowed]) > 1e-3, kind  # not vacuous: weights vary over keys


@pytest.mark.parametrize('scan_layers,remat', [(False, 'none'), (True, 'full')])
def test_explicit_path_gives_the_fused_paths_logits(scan_layers, remat):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers, remat=remat)
  params = _params(cfg)
  batch = _batch()
  fused = jax.jit(lambda p, b: Transformer(cfg).apply({'params': p}, **b))(params, batch)
  explicit, _ = _explicit(cfg)
  real = TARGETS_SEGMENTATION > 0  # padding positions differ (zero weights there) and are never read
  np.testing.assert_allclose(np.asarray(explicit)[real], np.asarray(fused)[real], atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(fused)[real]).max() > 0.1


def test_weights_are_the_ones_each_layer_used():
  """Recompute each attention layer's output from its sown weights and its values (its own params) and compare."""
  params = _params(CFG)
  calls = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, MultiHeadAttention) and context.method_name == '__call__':
      calls[context.module.path] = (args[1], out)  # (inputs_kv, output)
    return out

  with nn.intercept_methods(record):
    # eager: the recorded arrays are concrete
    _, weights = attention_maps.attention_weights(params, CFG, **_batch())
  assert len(calls) == 3 * CFG.num_layers

  def recompute(kind, layer, w):
    stack, module = attention_maps._MODULES[kind]
    p = params[stack][f'layers_{layer}'][module]
    inputs_kv, _ = calls[(stack, f'layers_{layer}', module)]
    value = jnp.einsum('bsd,dhk->bshk', inputs_kv, p['value']['kernel'])
    return jnp.einsum('bthk,hkd->btd', jnp.einsum('bhts,bshk->bthk', w, value), p['out']['kernel'])

  for kind in attention_maps.KINDS:
    stack, module = attention_maps._MODULES[kind]
    for layer in range(CFG.num_layers):
      _, output = calls[(stack, f'layers_{layer}', module)]
      np.testing.assert_allclose(
        recompute(kind, layer, weights[kind][layer]), output, atol=1e-5, rtol=1e-5, err_msg=f'{kind} layer {layer}'
      )
    # the test can fail: another layer's weights do not reproduce this layer's output
    other = np.abs(recompute(kind, 1, weights[kind][0]) - calls[(stack, 'layers_1', module)][1]).max()
    assert other > 1e-3, (kind, other)


# ---------------------------------------------------------------------------------------------------------------------
# The command, over a short real run's workdir

SMALL = [
  '--config.model.num_layers=1',
  '--config.model.d_model=32',
  '--config.model.num_heads=4',
  '--config.model.d_ff=64',
  '--config.model.vocab_size=128',
  '--config.max_train_examples=1000',
  '--config.max_eval_examples=8',
  '--config.eval_translate_examples=2',
  '--config.batch_size=8',
  '--config.num_train_steps=4',
  '--config.eval_every_steps=4',
  '--config.checkpoint_every_steps=4',
  '--config.log_every_steps=2',
  '--config.tokenizer_train_sentences=1000',
  '--config.async_checkpointing=False',
]


def _cli(*args, timeout=300):
  return helpers.cli(*args, env=helpers.cli_env(8, JAX_PLATFORMS='cpu'), timeout=timeout)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run') / 'tiny')
  result = _cli('train', f'--workdir={workdir}', *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _png_size(path):
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n'
  return struct.unpack('>II', head[16:24])


def test_command_writes_the_png_json_and_alignment(workdir, tmp_path):
  out, raw = str(tmp_path / 'attention.png'), str(tmp_path / 'weights.json')
  result = _cli(
    'attention',
    f'--workdir={workdir}',
    '--text=three thousand and twenty-one',
    f'--out={out}',
    f'--json={raw}',
    '--layers=1',
    '--max_tokens=6',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.load(open(raw, encoding='utf-8'))
  assert record['layers'] == [1] and record['heads'] == [1, 2, 3, 4]
  (sentence,) = record['sentences']
  source, target = sentence['source_pieces'], sentence['target_pieces']
  assert source[-1] == target[-1] == '</s>' and len(source) > 6  # cut in the picture, with a note
  assert 'note: sentence 1 has' in result.stdout
  cross = np.asarray(sentence['cross'])
  assert cross.shape == (1, 4, len(target), len(source))
  np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-4)
  assert np.asarray(sentence['decoder_self']).shape == (1, 4, len(target), len(target))
  # one `target -> source` line per target token: the source token with the most mean cross-attention
  lines = result.stdout.split('(target -> most attended source, last layer, mean of heads):\n')[1].splitlines()
  pairs = [line.strip().split(' -> ') for line in lines[: len(target)]]
  assert pairs == [[t, source[j]] for t, j in zip(target, cross[-1].mean(axis=0).argmax(axis=-1))]
  expected = attention_maps.layout(num_layers=1, num_heads=4, num_sentences=1, max_tokens=6)['size_pixels']
  assert _png_size(out) == expected
  assert os.path.getsize(out) > 5000  # a picture, not an empty canvas


def test_command_refuses_a_missing_workdir_and_an_empty_text(workdir, tmp_path):
  out = tmp_path / 'a.png'
  for args in (
    [f'--workdir={tmp_path / "nope"}', '--text=one'],
    [f'--workdir={workdir}', '--text=  '],
    [f'--workdir={workdir}', '--text=one', '--layers=2'],
  ):
    result = _cli('attention', *args, f'--out={out}')
    assert result.returncode != 0, args
    lines = result.stderr.strip().splitlines()
    if '--layers=2' in args:  # checked after loading: Orbax's read-only warning may come first
      lines = [line for line in lines if 'Given directory is read only' not in line]
    assert len(lines) == 1 and lines[0].startswith('error: '), (args, result.stderr[-2000:])
    assert not out.exists()
