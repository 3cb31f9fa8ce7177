"""The decoder-only language model (model.kind='decoder'): causality and document isolation as properties, packed
rows scoring each document as if alone, and the LM train step on meshes of 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import test_parallel

from transformer_jax import parallel
from transformer_jax import train as train_lib
from transformer_jax.model import LanguageModel, ModelConfig

VOCAB = 64
LENGTH = 24


def lm_cfg(**overrides) -> ModelConfig:
  values = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0, kind='decoder',
                pre_norm=True, positional='learned', activation='gelu', use_bias=True, scale_embeddings=False,
                max_len=LENGTH)
  values.update(overrides)
  return ModelConfig(**values)


@pytest.fixture(scope='module', params=['gpt2', 'paper'])
def model_and_params(request):
  # 'paper': post-norm, sinusoidal, relu, no biases, scaled embeddings; 'gpt2': the LM config's choices.
  cfg = lm_cfg() if request.param == 'gpt2' else lm_cfg(pre_norm=False, positional='sinusoidal', activation='relu',
                                                         use_bias=False, scale_embeddings=True)
  model = LanguageModel(cfg)
  params = model.init(jax.random.key(0), jnp.ones((1, LENGTH), jnp.int32))['params']
  # Random biases/norms, so a test cannot pass because some parameter happens to be zero.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return model, jax.jit(lambda p, t, s, pos: model.apply({'params': p}, t, s, pos)), params


def _packed_row(rng, lengths):
  tokens, segmentation, position = (np.zeros(LENGTH, np.int32) for _ in range(3))
  start = 0
  for seg, n in enumerate(lengths, start=1):
    tokens[start:start + n] = rng.integers(4, VOCAB, n)
    segmentation[start:start + n] = seg
    position[start:start + n] = np.arange(n)
    start += n
  return tokens, segmentation, position


def test_changing_a_later_token_or_another_document_changes_no_earlier_logit_of_this_document(model_and_params):
  _, apply, params = model_and_params
  rng = np.random.default_rng(0)
  for _ in range(6):
    lengths = [int(rng.integers(3, 9)) for _ in range(3)]
    tok, seg, pos = _packed_row(rng, lengths)
    base = np.asarray(apply(params, tok[None], seg[None], pos[None]))[0]
    real = np.flatnonzero(seg)
    i = int(rng.choice(real))  # change token i: logits at j predict targets[j] from targets[:j], inputs up to j
    changed = tok.copy()
    changed[i] = 4 + (changed[i] - 4 + int(rng.integers(1, VOCAB - 4))) % (VOCAB - 4)
    got = np.asarray(apply(params, changed[None], seg[None], pos[None]))[0]
    same = np.array([j for j in real if j <= i or seg[j] != seg[i]])  # j <= i: targets[:j] does not hold token i
    differ = np.array([j for j in real if j > i and seg[j] == seg[i]])
    np.testing.assert_array_equal(got[same], base[same])
    if differ.size:  # not vacuous: the change does reach the later positions of its own document
      assert np.abs(got[differ] - base[differ]).max() > 1e-4


def _doc_nll(logits, targets):
  logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
  return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0])


def test_packed_rows_score_each_document_as_if_it_were_alone(model_and_params):
  _, apply, params = model_and_params
  rng = np.random.default_rng(1)
  lengths = [7, 5, 9]
  tok, seg, pos = _packed_row(rng, lengths)
  packed = _doc_nll(apply(params, tok[None], seg[None], pos[None])[0], tok)
  for s, n in enumerate(lengths, start=1):
    alone = np.zeros(LENGTH, np.int32)
    alone[:n] = tok[seg == s]
    want = _doc_nll(apply(params, alone[None], (alone > 0).astype(np.int32)[None],
                          np.arange(LENGTH, dtype=np.int32)[None])[0], alone)[:n]
    np.testing.assert_allclose(packed[seg == s], want, rtol=1e-5, atol=1e-5)


def test_scan_layers_gives_the_same_logits_shapes_and_param_count():
  for scan in (False, True):
    model = LanguageModel(lm_cfg(scan_layers=scan))
    params = model.init(jax.random.key(0), jnp.ones((2, LENGTH), jnp.int32))['params']
    assert model.apply({'params': params}, jnp.ones((2, LENGTH), jnp.int32)).shape == (2, LENGTH, VOCAB)
    assert train_lib.count_params(params) == train_lib.count_params(
        LanguageModel(lm_cfg()).init(jax.random.key(0), jnp.ones((1, LENGTH), jnp.int32))['params'])


# ---------------------------------------------------------------------------------------------------------------------
# The one train step, sharded


def lm_train_config(mesh=(1, 1, 1)):
  config = test_parallel.small_config(mesh)
  config.model.update(kind='decoder', pre_norm=True, positional='learned', activation='gelu', use_bias=True,
                      scale_embeddings=False)
  config.label_smoothing = 0.0
  return config


def lm_batches(config, num=3):
  return [{k: v for k, v in b.items() if k.startswith('targets')} for b in test_parallel.synthetic_batches(config, num)]


@pytest.fixture(scope='module')
def one_device_lm_run():
  config = lm_train_config()
  losses, initial, state = test_parallel.run_steps(config, parallel.make_mesh(config.mesh, devices=jax.devices()[:1]),
                                                   lm_batches(config))
  params = test_parallel.host_params(state.params)
  assert max(np.abs(params[k] - initial[k]).max() for k in params) > 1e-3  # the steps moved the weights
  assert any('bias' in k and 'query' in k for k in params)  # GPT-2's attention biases are trained too
  return losses, params


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_lm_train_step_on_a_mesh_equals_one_device(shape, one_device_lm_run):
  config = lm_train_config(shape)
  losses, _, state = test_parallel.run_steps(config, parallel.make_mesh(config.mesh), lm_batches(config))
  want_losses, want_params = one_device_lm_run
  np.testing.assert_allclose(losses, want_losses, rtol=test_parallel.RTOL)
  test_parallel.assert_params_close(test_parallel.host_params(state.params), want_params)
