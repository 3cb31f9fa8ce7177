"""quantize.py: int8 per-output-channel weights within half a step of the float32 ones, an exact int8 x int8 -> int32
matmul, and a model that keeps its logits and its greedy outputs with int8 or bfloat16 weights."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from transformer_jax.inference import decode
from transformer_jax.model import quantize
from transformer_jax.training import train_state
from transformer_jax.model.transformer import ModelConfig, Transformer

SHAPES = [((16, 48), (0,)), ((32, 4, 8), (0,)), ((4, 8, 32), (0, 1)), ((64, 16), (1,))]


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('shape,input_axes', SHAPES)
def test_each_weight_is_within_half_a_step_of_its_channel(seed, shape, input_axes):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(1e-3, 10.0, size=shape[-1]).astype(np.float32)
  w[(0,) * (len(shape) - 1) + (slice(0, 1),)] = 0  # an all-zero output channel when the first axes are contracted
  if input_axes == (0,) or input_axes == (0, 1):
    w[..., 0] = 0
  q, scale = quantize.quantize_array(w, input_axes)
  q, scale = np.asarray(q), np.asarray(scale)
  assert q.dtype == np.int8 and q.shape == w.shape and np.all(np.abs(q.astype(int)) <= 127)
  assert scale.shape == tuple(1 if a in input_axes else n for a, n in enumerate(shape))
  err = np.abs(q * scale - w)
  assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-30)
  # the largest weight of each channel lands on the grid's end: the scale wastes no range
  channel_max = np.max(np.abs(q.astype(int)), axis=input_axes)
  nonzero = np.max(np.abs(w), axis=input_axes) > 0
  assert np.all(channel_max[nonzero] == 127) and np.all(channel_max[~nonzero] == 0)


def test_the_tree_quantizes_kernels_per_output_channel_and_leaves_the_rest():
  params = _params(_cfg(), seed=0)
  quantized = quantize.quantize_params(params)
  values, scales = quantized['values'], quantized['scales']
  attention = values['encoder']['layers_0']['self_attention']
  assert attention['query']['kernel'].dtype == jnp.int8 and attention['out']['kernel'].dtype == jnp.int8
  assert scales['encoder']['layers_0']['self_attention']['out']['kernel'].shape == (1, 1, 32)  # [H, K, D] -> per D
  assert scales['encoder']['layers_0']['self_attention']['query']['kernel'].shape == (1, 4, 8)  # per (head, dim)
  assert scales['shared_embedding']['embedding'].shape == (64, 1)  # per token: its row of the tied projection
  norm = values['encoder']['layers_0']['feed_forward_norm']
  assert norm['scale'].dtype == np.float32 and scales['encoder']['layers_0']['feed_forward_norm']['scale'] is None
  assert values['encoder']['layers_0']['feed_forward']['wi']['bias'].dtype == np.float32
  float_bytes = quantize.weight_bytes(params)
  int8_bytes = quantize.weight_bytes(values) + quantize.weight_bytes(scales)
  assert int8_bytes < 0.35 * float_bytes
  for a, b in zip(
    jax.tree.leaves(quantize.dequantize_params(quantized)), jax.tree.leaves(quantize.fake_quantize(params))
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('seed', range(4))
def test_int8_matmul_is_the_exact_integer_product_rescaled(seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((5, 3, 64)).astype(np.float32) * rng.uniform(0.1, 5, (5, 3, 1)).astype(np.float32)
  w = rng.standard_normal((64, 24)).astype(np.float32)
  q, scale = quantize.quantize_array(w)
  got = np.asarray(jax.jit(quantize.int8_matmul)(x, q, scale))
  # the reference: the same per-row activation rounding, integer product in int64 (no overflow possible)
  x_scale = np.abs(x).max(-1, keepdims=True) / 127
  xq = np.clip(np.round(x / x_scale), -127, 127).astype(np.int64)
  want = (xq @ np.asarray(q).astype(np.int64)).astype(np.float32) * x_scale * np.asarray(scale)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # and it approximates the float product: within the rounding of both operands
  exact = x @ w
  assert np.linalg.norm(got - exact) <= 0.02 * np.linalg.norm(exact)
  hlo = jax.jit(quantize.int8_matmul).lower(x, q, scale).as_text()
  assert 'i8' in hlo and 'i32' in hlo  # int8 operands, int32 accumulation: the VNNI/AMX path, not a float dot


def _cfg():
  return ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0, max_len=32)


def _params(cfg, seed):
  """Random weights large enough that the logits have real margins (Xavier-initialised ones are near uniform)."""
  dummy = jnp.ones((1, 8), jnp.int32)
  params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(seed), dummy, dummy)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x + rng.normal(0, 0.3, x.shape), np.float32), params)


def _logits(params, cfg, inputs, targets):
  return np.asarray(jax.jit(Transformer(cfg).apply)({'params': params}, inputs, targets))


@pytest.mark.parametrize('seed', [0, 1])
def test_int8_and_bfloat16_weights_keep_logits_and_greedy_outputs(seed):
  cfg = _cfg()
  params = _params(cfg, seed)
  rng = np.random.default_rng(seed)
  inputs = np.concatenate([rng.integers(4, 64, (16, 11)), np.ones((16, 1))], axis=1).astype(np.int32)
  targets = rng.integers(4, 64, (16, 12)).astype(np.int32)
  reference = _logits(params, cfg, inputs, targets)
  greedy = np.asarray(decode.greedy_decode(params, inputs, cfg=cfg, max_decode_len=16))
  spread = reference.std()
  for name, changed in (
    ('int8', quantize.fake_quantize(params)),
    ('bfloat16', quantize.cast_params(params, jnp.bfloat16)),
  ):
    logits = _logits(changed, cfg, inputs, targets)
    error = np.abs(logits - reference).mean() / spread
    agree = np.mean(np.argmax(logits, -1) == np.argmax(reference, -1))
    tokens = np.asarray(decode.greedy_decode(changed, inputs, cfg=cfg, max_decode_len=16))
    same_outputs = np.mean(np.all(tokens == greedy, axis=1))
    print(
      f'{name}: mean |logit error| = {error:.4f} std, argmax agreement {agree:.3f}, greedy outputs equal '
      f'{same_outputs:.3f}'
    )
    assert error < 0.05 and agree >= 0.9 and same_outputs >= 0.75
  # an int8 grid coarser than the weights' own values would show: a 4-level grid is far off
  coarse = jax.tree.map(lambda x: np.round(x * 2) / 2 if x.ndim >= 2 else x, params)
  assert np.abs(_logits(coarse, cfg, inputs, targets) - reference).mean() / spread > 0.05


# ---------------------------------------------------------------------------------------------------------------------
# translate / evaluate / generate --quantize / --weights_dtype: the weights the decoder is given


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A checkpointed translation workdir with a random model (test_inference's), in seconds."""
  import json
  import os
  from transformer_jax.training import checkpoint as checkpoint_lib
  from transformer_jax.training import optim
  from transformer_jax import parallel
  from transformer_jax.data import sources
  from transformer_jax.data import tokenizer as tokenizer_lib
  import test_inference

  config = test_inference._config()
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
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    state, _ = train_state.create_sharded_state(
      Transformer(train_state.model_config(config)), optim.make_optimizer(config), config, mesh, jax.random.key(1)
    )
  checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(7, state, {}, json.loads(config.to_json_best_effort()), force=True)
  checkpointer.wait()
  checkpointer.close()
  return workdir


SENTENCES = [
  'one',
  'two hundred',
  'fifty-five thousand four hundred and twelve',
  'seven million',
  'three',
  'eighty-one',
  'four thousand',
  'twelve',
  'six',
  'forty',
  'ten thousand and one',
  'five',
  'eleven',
  'nine hundred and ninety-nine',
  'thirty-three',
  'one hundred and five',
  'twenty-one',
  'sixty',
  'eight thousand and eight',
  'two million three hundred',
]


def _flat(tree):
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _spy_translations(workdir, **weights):
  """Greedy translations of SENTENCES through translate_workdir, and the parameters the decoder was given."""
  from transformer_jax.inference import evaluation
  from transformer_jax.inference import translate as inference

  seen = []
  original = evaluation.translate_ids

  def spy(params, *args, **kwargs):
    seen.append(params)
    return original(params, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation, 'translate_ids', spy)
    out = inference.translate_workdir(workdir, None, SENTENCES, beam_size=1, **weights)
  assert len(seen) == 1
  return out, _flat(seen[0])


@pytest.fixture(scope='module')
def float32_run(workdir):
  return _spy_translations(workdir)


@pytest.mark.parametrize('weights_dtype', ['float32', 'bfloat16'])
def test_the_decoder_runs_int8_grid_weights_and_keeps_most_translations(workdir, float32_run, weights_dtype):
  reference, params = float32_run
  out, seen = _spy_translations(workdir, quantize='int8', weights_dtype=weights_dtype)
  assert sorted(seen) == sorted(params)
  quantized = 0
  for name, w in params.items():
    got = seen[name]
    if name.endswith(("['kernel']", "['embedding']")):
      axes = (0, 1) if "['out']['kernel']" in name and w.ndim == 3 else (0,) if 'kernel' in name else (1,)
      scale = np.abs(w).max(axis=axes, keepdims=True) / 127
      assert str(got.dtype) == weights_dtype, name
      on_grid = np.clip(np.round(w / scale), -127, 127) * scale  # within scale / 2 of w: the property tests above
      one_step = 1e-6 if weights_dtype == 'float32' else 2.0**-7  # bfloat16: within one of its own steps
      np.testing.assert_allclose(
        got.astype(np.float32), on_grid.astype(got.dtype).astype(np.float32), rtol=one_step, atol=0, err_msg=name
      )
      assert not np.array_equal(got, w), name  # the rounding happened
      quantized += 1
    else:  # norms, biases, positions: untouched
      np.testing.assert_array_equal(got, w, err_msg=name)
  assert quantized >= 10
  assert len(set(reference)) > 5  # the model's outputs depend on the input: agreement is not vacuous
  same = np.mean([a == b for a, b in zip(out, reference)])
  print(f"int8 {weights_dtype}: {same:.2f} of the greedy translations equal float32's")
  assert same >= 0.7, list(zip(out, reference))


def test_bfloat16_weights_are_the_float32_ones_rounded(workdir, float32_run):
  reference, params = float32_run
  out, seen = _spy_translations(workdir, weights_dtype='bfloat16')
  bf16 = [n for n in params if n.endswith(("['kernel']", "['embedding']"))]
  assert bf16 and all(seen[n].dtype == jnp.bfloat16 for n in bf16)
  for name, w in params.items():
    np.testing.assert_array_equal(seen[name], w.astype(seen[name].dtype), err_msg=name)
  same = np.mean([a == b for a, b in zip(out, reference)])
  print(f"bfloat16: {same:.2f} of the greedy translations equal float32's")
  assert same >= 0.8, list(zip(out, reference))


def test_the_choices_the_cli_names_without_jax_are_decoding_params_choices():
  from transformer_jax import commands

  assert commands.QUANTIZE_CHOICES == quantize.QUANTIZE_CHOICES
  assert commands.WEIGHTS_DTYPES == quantize.WEIGHTS_DTYPES
  with pytest.raises(ValueError, match='int4'):
    quantize.decoding_params({}, 'int4')


def test_cli_evaluate_with_int8_weights_writes_what_the_int8_decoder_translates(workdir):
  import os
  import helpers
  from transformer_jax.inference import translate as inference
  from transformer_jax.data import sources

  result = helpers.cli('evaluate', f'--workdir={workdir}', '--quantize=int8', '--beam_size=1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert re.fullmatch(r'bleu=\S+ chrf=\S+ exact_match=\S+', result.stdout.strip().splitlines()[-1]), result.stdout
  loaded = inference.load_workdir(workdir, quantize='int8')
  config = loaded.config
  pairs = sources.load_text_pairs(
    config.dataset,
    config.eval_split,
    source_lang=config.source_lang,
    target_lang=config.target_lang,
    max_examples=config.get('max_eval_examples'),
    cache_dir=workdir,
  )
  want = inference.translate_sentences(loaded, [s for s, _ in pairs], beam_size=1)
  with open(os.path.join(workdir, f'hypotheses_{config.eval_split}_step7_int8.txt')) as f:
    assert f.read().splitlines() == want
  assert not os.path.exists(os.path.join(workdir, f'hypotheses_{config.eval_split}_step7.txt'))


@pytest.mark.parametrize('command', ['translate', 'evaluate', 'generate'])
def test_help_names_the_weight_choices_once_and_says_int8_measures_quality(command):
  from absl import flags
  from transformer_jax import commands

  fv = flags.FlagValues()
  names = commands.define_flags(command, fv, argv=['transformer-jax', command])
  text = commands.help_text(command, names, fv)
  assert re.search(r'^  --quantize=<none\|int8>: int8: ', text, re.M), text
  assert re.search(r'^  --weights_dtype=<float32\|bfloat16>: \w', text, re.M), text
  assert 'quality of int8 weights, not their speed' in ' '.join(text.split())


def test_generate_and_lm_evaluate_load_the_weights_they_are_given(monkeypatch):
  """The language-model paths open the workdir through the same load_workdir, with the flags' values."""
  import types
  from transformer_jax.inference import translate as inference
  from transformer_jax.inference import lm_inference

  asked = []

  class Loaded(Exception):
    pass

  def load(workdir, config=None, **weights):
    asked.append(weights)
    raise Loaded

  monkeypatch.setattr(inference, 'load_workdir', load)
  flags = types.SimpleNamespace(prompt='x', workdir='w', config=None, quantize='int8', weights_dtype='bfloat16')
  with pytest.raises(Loaded):
    lm_inference.run(flags)
  with pytest.raises(Loaded):
    lm_inference.evaluate_workdir('w', None, quantize='int8', weights_dtype='float32')
  assert asked == [{'quantize': 'int8', 'weights_dtype': 'bfloat16'}, {'quantize': 'int8', 'weights_dtype': 'float32'}]
