"""quantize.py: int8 per-output-channel weights within half a step of the float32 ones, an exact int8 x int8 -> int32
matmul, and a model that keeps its logits and its greedy outputs with int8 or bfloat16 weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from transformer_jax import decode
from transformer_jax import quantize
from transformer_jax.model import ModelConfig, Transformer

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
  for a, b in zip(jax.tree.leaves(quantize.dequantize_params(quantized)), jax.tree.leaves(quantize.fake_quantize(params))):
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
  for name, changed in (('int8', quantize.fake_quantize(params)),
                        ('bfloat16', quantize.cast_params(params, jnp.bfloat16))):
    logits = _logits(changed, cfg, inputs, targets)
    error = np.abs(logits - reference).mean() / spread
    agree = np.mean(np.argmax(logits, -1) == np.argmax(reference, -1))
    tokens = np.asarray(decode.greedy_decode(changed, inputs, cfg=cfg, max_decode_len=16))
    same_outputs = np.mean(np.all(tokens == greedy, axis=1))
    print(f'{name}: mean |logit error| = {error:.4f} std, argmax agreement {agree:.3f}, greedy outputs equal '
          f'{same_outputs:.3f}')
    assert error < 0.05 and agree >= 0.9 and same_outputs >= 0.75
  # an int8 grid coarser than the weights' own values would show: a 4-level grid is far off
  coarse = jax.tree.map(lambda x: np.round(x * 2) / 2 if x.ndim >= 2 else x, params)
  assert np.abs(_logits(coarse, cfg, inputs, targets) - reference).mean() / spread > 0.05
