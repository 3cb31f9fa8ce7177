"""What the TPU compile check led to: model.dtype='auto' (bfloat16 on TPU/GPU, float32 on CPU, for the platform
the step targets) and a loss that reads [tokens, V] logits in the compute dtype, unsharded or split over the
vocabulary (tensor axis) on 8 simulated CPU devices; the dropout PRNG on TPU."""

import importlib.util
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base, big, tiny
from transformer_jax.inference import evaluation
from transformer_jax import parallel
from transformer_jax.training import train_state
from transformer_jax.model.transformer import ModelConfig, Transformer, compute_dtype


@pytest.mark.parametrize(
  'platform,expected',
  [('tpu', jnp.bfloat16), ('gpu', jnp.bfloat16), ('cuda', jnp.bfloat16), ('cpu', jnp.float32), ('TPU', jnp.bfloat16)],
)
def test_auto_dtype_follows_the_target_platform(platform, expected):
  assert compute_dtype('auto', platform) == jnp.dtype(expected)
  # a named dtype is the same on every platform
  for name in ('float32', 'bfloat16'):
    assert compute_dtype(name, platform) == jnp.dtype(name)


def test_auto_dtype_defaults_to_this_process_backend():
  assert compute_dtype('auto') == jnp.dtype(jnp.bfloat16 if jax.default_backend() != 'cpu' else jnp.float32)


@pytest.mark.parametrize('get_config', [base.get_config, big.get_config])
def test_paper_configs_compute_bfloat16_on_tpu_and_float32_on_cpu(get_config):
  config = get_config()
  assert config.model.dtype == 'auto'
  assert train_state.model_config(config, platform='tpu').dtype == jnp.bfloat16
  assert train_state.model_config(config, platform='cpu').dtype == jnp.float32
  assert train_state.model_config(config).dtype == jnp.float32  # the tests run on CPU
  # an explicit dtype still wins, and the tiny default stays float32 everywhere
  config.model.dtype = 'bfloat16'
  assert train_state.model_config(config, platform='cpu').dtype == jnp.bfloat16
  assert train_state.model_config(tiny.get_config(), platform='tpu').dtype == jnp.float32


def _reference_sums(logits, targets, weights, label_smoothing):
  """optax's dense smoothed-label cross-entropy, in float64 on the host."""
  z = np.asarray(logits, np.float64)
  vocab = z.shape[-1]
  one_hot = np.eye(vocab)[targets]
  q = (1 - label_smoothing) * one_hot + label_smoothing / vocab
  log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  loss, nll = -(q * log_p).sum(-1), -(one_hot * log_p).sum(-1)
  correct = np.take_along_axis(z, targets[..., None], -1)[..., 0] >= z.max(-1)
  return {
    'loss_sum': (loss * weights).sum(),
    'nll_sum': (nll * weights).sum(),
    'correct_sum': (correct * weights).sum(),
    'weight_sum': weights.sum(),
  }


def _random_case(seed, rows=4, length=8, vocab=64, scale=4.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, scale, (rows, length, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (rows, length)).astype(np.int32)
  targets[0, 0] = int(np.argmax(logits[0, 0]))  # at least one correct prediction
  weights = (rng.random((rows, length)) > 0.25).astype(np.float32)
  return logits, targets, weights


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_loss_sums_match_the_dense_reference(seed, label_smoothing):
  logits, targets, weights = _random_case(seed)
  got = jax.jit(evaluation.cross_entropy_sums, static_argnums=3)(logits, targets, weights, label_smoothing)
  want = _reference_sums(logits, targets, weights, label_smoothing)
  for k in want:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=2e-5, err_msg=k)


def test_bfloat16_logits_give_the_float32_loss_of_the_same_values():
  """bfloat16 logits are read in float32: the loss equals the float32 loss of the same (rounded) values."""
  logits, targets, weights = _random_case(7)
  rounded = jnp.asarray(logits, jnp.bfloat16)
  got = evaluation.cross_entropy_sums(rounded, targets, weights, 0.1)
  want = evaluation.cross_entropy_sums(rounded.astype(jnp.float32), targets, weights, 0.1)
  for k in want:
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-6, err_msg=k)
  # and the gradient flows back in the logits' dtype
  grad = jax.grad(lambda z: evaluation.cross_entropy_sums(z, targets, weights, 0.1)['loss_sum'])(rounded)
  assert grad.dtype == jnp.bfloat16


def test_loss_and_gradient_under_vocab_sharding_equal_the_unsharded_ones():
  """[tokens, V] split over the tensor axis (8 devices; 4 x 2 with fsdp): each shard reduces its own slice."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  logits, targets, weights = _random_case(3, rows=8, length=4, vocab=128)

  def loss_and_grad(z, t, w):
    f = lambda z: evaluation.cross_entropy_sums(z, t, w, 0.1)['loss_sum']
    return jax.value_and_grad(f)(z)

  want_loss, want_grad = jax.jit(loss_and_grad)(logits, targets, weights)
  for shape in ((1, 1, 8), (1, 4, 2)):
    mesh = parallel.make_mesh(
      ml_collections.ConfigDict(dict(data=shape[0], fsdp=shape[1], tensor=shape[2])), jax.devices()[:8]
    )
    z = jax.device_put(logits, NamedSharding(mesh, P(parallel.BATCH_AXES, None, 'tensor')))
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    loss, grad = jax.jit(loss_and_grad)(z, jax.device_put(targets, rows), jax.device_put(weights, rows))
    assert grad.sharding.spec[-1] == 'tensor'  # the gradient stays split over the vocabulary
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-5, atol=1e-7)


def test_logits_come_out_in_the_compute_dtype():
  cfg = ModelConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0)
  tokens = jnp.ones((2, 8), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(0), tokens, tokens)['params']
  for dtype in (jnp.float32, jnp.bfloat16):
    logits = Transformer(ModelConfig(**{**cfg.__dict__, 'dtype': dtype})).apply({'params': params}, tokens, tokens)
    assert logits.dtype == dtype


def _large_xors(hlo: str, at_least: int) -> int:
  """xor instructions over u32 arrays of at least `at_least` elements in compiled HLO: threefry's mixing rounds
  (inlined, their op_names say only _uniform/xor)."""
  count = 0
  for line in hlo.splitlines():
    shape = re.match(r'\s*(?:ROOT )?%\S+ = u32\[([\d,]+)\]\S* xor\(', line)
    count += bool(shape and math.prod(int(d) for d in shape.group(1).split(',')) >= at_least)
  return count


@pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler",
)
def test_tpu_dropout_bits_come_from_the_rng_bit_generator_not_threefry():
  """rng_impl='rbg' on TPU: the dropout masks are drawn by rng-bit-generator, and threefry is left with the key
  arithmetic (a few words); under threefry2x32 its xor rounds run over arrays of the masks' size. Compiled for v5e:2x2,
  once for each rng_impl."""
  from transformer_jax.tpu import compile as tpu_compile

  hlo = {}
  for impl in ('rbg', 'threefry2x32'):
    config = tiny.get_config()
    config.model.update(num_layers=1, d_model=64, d_ff=128, num_heads=4, dropout_rate=0.1)
    config.update(
      packed_inputs_length=32,
      packed_targets_length=32,
      max_length=32,
      batch_size=16,
      eval_translate_batch_size=16,
      rng_impl=impl,
    )
    (report,) = tpu_compile.compile_programs(
      config, 'v5e:2x2', programs=('train',), keep_compiled=True, progress=lambda line: None
    )
    hlo[impl] = report.compiled.as_text()
  mask = 16 * 32 * 64 // 4  # one residual dropout mask's elements per chip (batch split over 4 chips)
  assert 'rng-bit-generator(' in hlo['rbg'] and 'rng-bit-generator(' not in hlo['threefry2x32']
  assert _large_xors(hlo['threefry2x32'], mask // 2) >= 20  # 20 rounds per mask, at least one mask
  assert _large_xors(hlo['rbg'], mask // 2) == 0
