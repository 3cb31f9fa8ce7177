"""Properties of the model: causality, padding, packing, cached decoding, parameter counts (Table 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import base, big
from transformer_jax.inference import decode
from transformer_jax import info
from transformer_jax.model.transformer import ModelConfig, Transformer, shift_right, sinusoidal_table

CFG = ModelConfig(vocab_size=48, num_layers=2, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0, max_len=64)


def _init(cfg, batch=2, src=9, tgt=7, seed=0):
  model = Transformer(cfg)
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.integers(4, cfg.vocab_size, (batch, src)), jnp.int32)
  targets = jnp.asarray(rng.integers(4, cfg.vocab_size, (batch, tgt)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(seed), inputs, targets)['params'])
  return model, params, inputs, targets


@pytest.mark.parametrize('pre_norm', [False, True])
@pytest.mark.parametrize('t', [0, 3, 5])
def test_future_targets_do_not_change_earlier_logits(pre_norm, t):
  cfg = ModelConfig(**{**CFG.__dict__, 'pre_norm': pre_norm})
  model, params, inputs, targets = _init(cfg)
  logits = model.apply({'params': params}, inputs, targets)
  changed = targets.at[:, t:].set((targets[:, t:] + 7) % (cfg.vocab_size - 4) + 4)
  logits2 = model.apply({'params': params}, inputs, changed)
  np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-5)
  # and the property is not vacuous: later positions do change
  assert np.max(np.abs(logits[:, t + 1 :] - logits2[:, t + 1 :])) > 1e-3


def test_appended_padding_changes_no_real_position():
  model, params, inputs, targets = _init(CFG)
  logits = model.apply({'params': params}, inputs, targets)
  padded = model.apply({'params': params}, jnp.pad(inputs, ((0, 0), (0, 5))), jnp.pad(targets, ((0, 0), (0, 4))))
  np.testing.assert_allclose(logits, padded[:, : targets.shape[1]], atol=1e-5)


def test_packed_row_equals_examples_run_alone():
  model, params, _, _ = _init(CFG)
  rng = np.random.default_rng(1)
  a_in, b_in = rng.integers(4, 48, 5), rng.integers(4, 48, 3)
  a_tg, b_tg = rng.integers(4, 48, 4), rng.integers(4, 48, 6)
  packed = dict(
    inputs=jnp.asarray([np.concatenate([a_in, b_in, [0, 0]])]),
    targets=jnp.asarray([np.concatenate([a_tg, b_tg, [0]])]),
    inputs_segmentation=jnp.asarray([[1] * 5 + [2] * 3 + [0, 0]]),
    targets_segmentation=jnp.asarray([[1] * 4 + [2] * 6 + [0]]),
    inputs_position=jnp.asarray([list(range(5)) + list(range(3)) + [0, 0]]),
    targets_position=jnp.asarray([list(range(4)) + list(range(6)) + [0]]),
  )
  logits = model.apply({'params': params}, **packed)
  alone_a = model.apply({'params': params}, jnp.asarray([a_in]), jnp.asarray([a_tg]))
  alone_b = model.apply({'params': params}, jnp.asarray([b_in]), jnp.asarray([b_tg]))
  np.testing.assert_allclose(logits[0, :4], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 4:10], alone_b[0], atol=1e-5)


def test_shift_right_starts_every_packed_segment_with_bos():
  targets = jnp.asarray([[5, 6, 1, 7, 8, 1, 0]])
  position = jnp.asarray([[0, 1, 2, 0, 1, 2, 0]])
  np.testing.assert_array_equal(shift_right(targets, position), [[3, 5, 6, 3, 7, 8, 0]])


def test_sinusoid_is_the_papers_interleaved_formula():
  table = sinusoidal_table(50, 16)
  pos, i = 13, 3
  assert table[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
  assert table[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)


@pytest.mark.parametrize('share', [True, False])
def test_cached_decoding_matches_full_forward(share):
  cfg = ModelConfig(**{**CFG.__dict__, 'share_embeddings': share})
  model, params, inputs, targets = _init(cfg, seed=3)
  inputs = inputs.at[1, 6:].set(0)  # a padded source
  logits = model.apply({'params': params}, inputs, targets)
  dm = decode.decoding_model(cfg)
  seg = (inputs != 0).astype(jnp.int32)
  encoded = dm.apply({'params': params}, inputs, seg, method=Transformer.encode)
  cache = decode.init_cache(dm, params, encoded, seg, targets.shape[1])
  decoder_inputs = shift_right(targets, jnp.broadcast_to(jnp.arange(targets.shape[1]), targets.shape))
  for t in range(targets.shape[1]):
    log_probs, cache = decode.decode_step(dm, params, cache, encoded, seg, decoder_inputs[:, t])
    np.testing.assert_allclose(log_probs, jax.nn.log_softmax(logits[:, t]), atol=1e-4)


def test_bfloat16_compute_is_close_to_float32():
  model, params, inputs, targets = _init(CFG)
  logits32 = model.apply({'params': params}, inputs, targets)
  logits16 = Transformer(ModelConfig(**{**CFG.__dict__, 'dtype': jnp.bfloat16})).apply(
    {'params': params}, inputs, targets
  )
  assert logits16.dtype == jnp.bfloat16  # in the compute dtype: the loss reads them in float32
  assert np.max(np.abs(logits32 - logits16.astype(jnp.float32))) < 0.1 * np.max(np.abs(logits32))


def _expected_params(n, d, ff, v):
  """Independent count: attention 4*d^2 (no biases), FFN 2*d*ff + ff + d, LayerNorm 2*d; shared embedding v*d."""
  attention, ffn, norm = 4 * d * d, 2 * d * ff + ff + d, 2 * d
  encoder_layer = attention + ffn + 2 * norm
  decoder_layer = 2 * attention + ffn + 3 * norm
  return v * d + n * (encoder_layer + decoder_layer)


@pytest.mark.parametrize('get_config,table3', [(base.get_config, 65e6), (big.get_config, 213e6)])
def test_parameter_counts_match_table3(get_config, table3):
  config = get_config()
  abstract = info.memory_plan(config, 1)[0]
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  assert abs(count - table3) / table3 < 0.04, count
  m = config.model
  assert count == _expected_params(m.num_layers, m.d_model, m.d_ff, m.vocab_size)


@pytest.mark.parametrize(
  'overrides', [dict(num_layers=2), dict(d_model=256, num_heads=4), dict(d_ff=1000), dict(num_heads=16)]
)
def test_parameter_count_follows_overrides(overrides):
  config = base.get_config()
  config.model.update(overrides)
  abstract = info.memory_plan(config, 1)[0]
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  m = config.model
  assert count == _expected_params(m.num_layers, m.d_model, m.d_ff, m.vocab_size)
