"""quantize.py: int8 per-output-channel weights within half a step of the float32 ones, an exact int8 x int8 -> int32
matmul, and a model that keeps its logits and its greedy outputs with int8 or bfloat16 weights."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize('seed', range(8))
def test_int8_matmul_of_any_layout_is_the_integer_product_and_close_to_the_float_one(seed):
  """Random shapes, one or two contracted axes or the transposed (embedding) layout, rows of very different
  magnitudes: the result is the exactly rescaled integer product, and within 3% (relative Frobenius) of x @ w."""
  rng = np.random.default_rng(100 + seed)
  layout = ('one', 'two', 'transposed')[seed % 3]
  lead = tuple(int(n) for n in rng.integers(1, 6, rng.integers(1, 3)))
  n_in, n_out = int(rng.integers(8, 96)), int(rng.integers(1, 40))
  heads = int(rng.integers(1, 5))
  if layout == 'two':  # the attention output: x [..., H, K] @ w [H, K, D]
    x = rng.standard_normal((*lead, heads, n_in)).astype(np.float32)
    w = rng.standard_normal((heads, n_in, n_out)).astype(np.float32)
    q, scale = quantize.quantize_array(w, (0, 1))
    x2, w2 = x.reshape(*lead, heads * n_in), w.reshape(heads * n_in, n_out)
  elif layout == 'transposed':  # the tied output projection: x [..., D] @ E[V, D]^T, one scale per row of E
    x = rng.standard_normal((*lead, n_in)).astype(np.float32)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    q, scale = quantize.quantize_array(w, (1,))
    x2, w2 = x, w.T
  else:
    x = rng.standard_normal((*lead, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    q, scale = quantize.quantize_array(w)
    x2, w2 = x, w
  x2 = x2 * rng.uniform(1e-3, 1e3, (*x2.shape[:-1], 1)).astype(np.float32)  # per-token scales span 6 decades
  x = x2.reshape(x.shape)
  got = np.asarray(
    quantize.int8_matmul(x, q, scale, contracting=2)
    if layout == 'two'
    else quantize.int8_matmul(x, q, scale, transposed=layout == 'transposed')
  )
  assert got.shape == (*lead, n_out) and got.dtype == np.float32
  xq, x_scale = (np.asarray(a) for a in quantize.quantize_rows(x2))
  wq = np.asarray(q).reshape(-1, n_out) if layout != 'transposed' else np.asarray(q).T
  w_scale = np.asarray(scale).reshape(1, -1)
  want = (xq.astype(np.int64) @ wq.astype(np.int64)).astype(np.float32) * x_scale * w_scale
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)
  exact = x2.astype(np.float64) @ w2.astype(np.float64)
  row_error = np.linalg.norm(got - exact, axis=-1) / np.maximum(np.linalg.norm(exact, axis=-1), 1e-30)
  assert np.all(row_error <= 0.03), row_error.max()  # each token's output, whatever its magnitude


def test_int8_params_put_a_per_channel_scale_beside_each_int8_leaf_scanned_layers_too():
  for scan in (False, True):
    cfg = ModelConfig(**{**_cfg().__dict__, 'scan_layers': scan, 'share_embeddings': scan})
    params = _params(cfg, seed=0)
    q = quantize.int8_params(params)
    flat, qflat = _flat(params), _flat(q)
    kernels = [n for n in flat if n.endswith(("['kernel']", "['embedding']"))]
    assert len(kernels) >= (10 if scan else 30)
    for name, w in flat.items():
      if name not in kernels:
        np.testing.assert_array_equal(qflat[name], w, err_msg=name)
        continue
      values, scale = qflat[name], qflat[name[:-2] + "_scale']"]
      assert values.dtype == np.int8 and scale.dtype == np.float32 and values.shape == w.shape, name
      layers = int(scan and "['layers']" in name)
      out = "['out']['kernel']" in name and w.ndim - layers == 3
      axes = (w.ndim - 1,) if name.endswith("['embedding']") else (layers, layers + 1) if out else (layers,)
      assert scale.shape == tuple(1 if a in axes else n for a, n in enumerate(w.shape)), name  # layers keep theirs
      assert np.all(np.abs(values * scale - w) <= scale / 2 * (1 + 1e-6)), name
    assert set(qflat) == set(flat) | {n[:-2] + "_scale']" for n in kernels}


def _dot_operand_types(hlo: str) -> list[str]:
  return re.findall(r'stablehlo\.dot_general[^\n]*: \((tensor<[^>]*>), (tensor<[^>]*>)\)', hlo)


@pytest.mark.parametrize('share_embeddings', [True, False])
def test_a_decoding_step_with_int8_params_multiplies_every_kernel_in_int8(share_embeddings):
  cfg = ModelConfig(**{**_cfg().__dict__, 'share_embeddings': share_embeddings, 'use_bias': True})
  params = _params(cfg, seed=0)
  q = quantize.int8_params(params)
  rng = np.random.default_rng(0)
  inputs = np.concatenate([rng.integers(4, 64, (16, 11)), np.ones((16, 1))], axis=1).astype(np.int32)
  hlo = jax.jit(lambda p, x: decode.greedy_decode(p, x, cfg=cfg, max_decode_len=16)).lower(q, inputs).as_text()
  dots = _dot_operand_types(hlo)
  int8 = [d for d in dots if d[0].endswith('xi8>') and d[1].endswith('xi8>')]
  # per decoder layer: q, k, v, out of self-attention, q, out of cross-attention (its keys/values are cached), 2
  # feed-forward; the logits; and the encoder and the cross keys/values of the cache creation pass
  per_step = cfg.num_layers * 8 + 1
  assert len(int8) >= per_step + cfg.num_layers * (6 + 2), dots
  floats = [d for d in dots if d not in int8]  # attention's own products (query x keys, weights x values) only
  assert all(re.search(r'x\d+x\d+x(f32|i1)>', a) for a, _ in floats) and len(floats) <= 6 * cfg.num_layers * 2, floats
  reference, got = _logits(params, cfg, inputs, inputs), _logits(q, cfg, inputs, inputs)
  error = np.abs(got - reference).mean() / reference.std()
  assert error < 0.06 and np.mean(got.argmax(-1) == reference.argmax(-1)) >= 0.9, error


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


def test_the_decoder_multiplies_int8_weights_and_keeps_most_translations(workdir, float32_run):
  reference, params = float32_run
  out, seen = _spy_translations(workdir, quantize='int8')
  quantized = [n for n in params if n.endswith(("['kernel']", "['embedding']"))]
  assert len(quantized) >= 10 and sorted(seen) == sorted([*params, *(n[:-2] + "_scale']" for n in quantized)])
  for name, w in params.items():
    if name in quantized:
      values, scale = seen[name], seen[name[:-2] + "_scale']"]
      assert values.dtype == np.int8 and scale.dtype == np.float32, name
      assert np.all(np.abs(values * scale - w) <= scale / 2 * (1 + 1e-6)), name  # the property tests above
    else:  # norms, biases, positions: untouched
      np.testing.assert_array_equal(seen[name], w, err_msg=name)
  assert len(set(reference)) > 5  # the model's outputs depend on the input: agreement is not vacuous
  same = np.mean([a == b for a, b in zip(out, reference)])
  print(f"int8: {same:.2f} of the greedy translations equal float32's")
  assert same >= 0.7, list(zip(out, reference))


def test_int8_with_bfloat16_runs_the_int8_grid_in_bfloat16(workdir, float32_run):
  reference, params = float32_run
  out, seen = _spy_translations(workdir, quantize='int8', weights_dtype='bfloat16')
  assert sorted(seen) == sorted(params)
  quantized = 0
  for name, w in params.items():
    got = seen[name]
    if name.endswith(("['kernel']", "['embedding']")):
      axes = (0, 1) if "['out']['kernel']" in name and w.ndim == 3 else (0,) if 'kernel' in name else (1,)
      scale = np.abs(w).max(axis=axes, keepdims=True) / 127
      assert got.dtype == jnp.bfloat16, name
      on_grid = np.clip(np.round(w / scale), -127, 127) * scale  # within scale / 2 of w: the property tests above
      np.testing.assert_allclose(
        got.astype(np.float32), on_grid.astype(got.dtype).astype(np.float32), rtol=2.0**-7, atol=0, err_msg=name
      )
      quantized += 1
    else:  # norms, biases, positions: untouched
      np.testing.assert_array_equal(got, w, err_msg=name)
  assert quantized >= 10
  same = np.mean([a == b for a, b in zip(out, reference)])
  print(f"int8 bfloat16: {same:.2f} of the greedy translations equal float32's")
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

  from transformer_jax.model import config as model_config

  assert commands.QUANTIZE_CHOICES == quantize.QUANTIZE_CHOICES
  assert commands.WEIGHTS_DTYPES == quantize.WEIGHTS_DTYPES
  assert commands.KV_CACHE_DTYPES == model_config.KV_CACHE_DTYPES
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
def test_help_names_the_weight_choices_once_and_says_int8_computes_in_int8(command):
  from absl import flags
  from transformer_jax import commands

  fv = flags.FlagValues()
  names = commands.define_flags(command, fv, argv=['transformer-jax', command])
  text = commands.help_text(command, names, fv)
  assert re.search(r'^  --quantize=<none\|int8>: int8: ', text, re.M), text
  assert re.search(r'^  --weights_dtype=<float32\|bfloat16>: \w', text, re.M), text
  assert re.search(r'^  --kv_cache_dtype=<auto\|float32\|bfloat16\|int8>: \w', text, re.M), text
  assert 'multiplied in int8' in ' '.join(text.split())


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
  flags = types.SimpleNamespace(
    prompt='x', workdir='w', config=None, quantize='int8', weights_dtype='bfloat16', kv_cache_dtype='int8'
  )
  with pytest.raises(Loaded):
    lm_inference.run(flags)
  with pytest.raises(Loaded):
    lm_inference.evaluate_workdir('w', None, quantize='int8', weights_dtype='float32')
  assert asked == [
    {'quantize': 'int8', 'weights_dtype': 'bfloat16', 'kv_cache_dtype': 'int8'},
    {'quantize': 'int8', 'weights_dtype': 'float32'},
  ]


# ---------------------------------------------------------------------------------------------------------------------
# A trained model of the default task: int8 compute and an int8 decode cache keep its held-out exact match

# 350 steps of a 2-layer d_model-64 model on the default task (generated numbers, en -> de): held-out token accuracy
# ~0.98, exact match ~83%, so many outputs sit near a decision boundary and a lossy change would show.
TRAIN = [
  '--config.model.num_layers=2',
  '--config.model.d_model=64',
  '--config.model.num_heads=4',
  '--config.model.d_ff=128',
  '--config.model.vocab_size=128',
  '--config.max_train_examples=6000',
  '--config.max_eval_examples=200',
  '--config.eval_translate_examples=0',
  '--config.batch_size=16',
  '--config.num_train_steps=350',
  '--config.eval_every_steps=1000',
  '--config.checkpoint_every_steps=350',
  '--config.log_every_steps=100',
  '--config.tokenizer_train_sentences=3000',
  '--config.warmup_steps=100',
  '--config.learning_rate=1.0',
]


def trained_workdir(tmp_path_factory) -> str:
  """The TRAIN model's workdir, trained by the CLI once per test session (test_ctranslate2 exports the same one).

  pytest-xdist gives each worker its own base temp directory under one shared parent: the model lives in that parent,
  and a lock file makes a second worker wait for the first one's run instead of training its own."""
  import fcntl

  import helpers

  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  root = shared / 'trained_numbers'
  root.mkdir(exist_ok=True)
  with open(root / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / 'trained').exists():
      result = helpers.cli('train', f'--workdir={root / "run"}', *TRAIN, timeout=600)
      assert result.returncode == 0, result.stderr[-3000:]
      (root / 'trained').write_text('')
  return str(root / 'run')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  return trained_workdir(tmp_path_factory)


@pytest.fixture(scope='module')
def trained_float32(trained):
  from transformer_jax.inference import translate as inference

  return inference.evaluate_workdir(trained, None, beam_size=4)


@pytest.mark.parametrize(
  'options', [{'quantize': 'int8'}, {'kv_cache_dtype': 'int8'}, {'quantize': 'int8', 'kv_cache_dtype': 'int8'}]
)
def test_int8_compute_and_cache_lose_at_most_half_a_point_of_held_out_exact_match(trained, trained_float32, options):
  import os
  from transformer_jax.inference import translate as inference

  got = inference.evaluate_workdir(trained, None, beam_size=4, **options)
  reference = trained_float32
  print(options, {k: (round(reference[k], 2), round(got[k], 2)) for k in got})
  assert 60 <= reference['exact_match'] < 100  # a model with outputs right and wrong: the margins are real
  for key in ('exact_match', 'exact_match_greedy'):
    assert got[key] >= reference[key] - 0.5, (key, reference[key], got[key])  # at most one sentence of 200 lost
  suffix = inference.weights_suffix(**options)
  for search in ('', '_greedy'):  # and few outputs change at all, for the better or the worse
    with open(os.path.join(trained, f'hypotheses_validation_step350{search}.txt')) as f:
      want = f.read().splitlines()
    with open(os.path.join(trained, f'hypotheses_validation_step350{suffix}{search}.txt')) as f:
      changed = sum(a != b for a, b in zip(f.read().splitlines(), want, strict=True))
    assert changed <= 0.05 * len(want), (search, changed)  # measured: 0-6 of 200
