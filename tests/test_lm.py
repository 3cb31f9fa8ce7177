"""The decoder-only language model (model.kind='decoder'): causality and document isolation as properties, packed
rows scoring each document as if alone, and the LM train step on meshes of 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_parallel
from flax import linen as nn

import helpers

from transformer_jax import parallel
from transformer_jax.model.transformer import LanguageModel, ModelConfig

VOCAB = 64
LENGTH = 24


def lm_cfg(**overrides) -> ModelConfig:
  return helpers.small_decoder_config(
    **{'vocab_size': VOCAB, 'max_len': LENGTH, 'd_ff': 64, 'scale_embeddings': False, **overrides}
  )


@pytest.fixture(scope='module', params=['gpt2', 'paper'])
def model_and_params(request):
  # 'paper': post-norm, sinusoidal, relu, no biases, scaled embeddings; 'gpt2': the LM config's choices.
  cfg = (
    lm_cfg()
    if request.param == 'gpt2'
    else lm_cfg(pre_norm=False, positional='sinusoidal', activation='relu', use_bias=False, scale_embeddings=True)
  )
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
    tokens[start : start + n] = rng.integers(4, VOCAB, n)
    segmentation[start : start + n] = seg
    position[start : start + n] = np.arange(n)
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
    want = _doc_nll(
      apply(params, alone[None], (alone > 0).astype(np.int32)[None], np.arange(LENGTH, dtype=np.int32)[None])[0], alone
    )[:n]
    np.testing.assert_allclose(packed[seg == s], want, rtol=1e-5, atol=1e-5)


def test_scan_layers_gives_the_same_logits_as_unrolled_layers(model_and_params):
  """The scanned model run on the unrolled model's parameters, stacked layer by layer: the same function."""
  model, _, params = model_and_params
  params = nn.meta.unbox(params)
  scanned = LanguageModel(ModelConfig(**{**model.cfg.__dict__, 'scan_layers': True}))
  stacked = helpers.to_scan_layout(params, model.cfg.num_layers)
  init = lambda: nn.meta.unbox(scanned.init(jax.random.key(0), jnp.ones((1, LENGTH), jnp.int32))['params'])
  own = jax.eval_shape(init)
  assert jax.tree.map(lambda x: x.shape, own) == jax.tree.map(lambda x: x.shape, stacked)  # its own layout
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, size=(2, LENGTH)), jnp.int32)
  want = jax.jit(model.apply)({'params': params}, tokens)
  got = jax.jit(scanned.apply)({'params': stacked}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the layers differ: the layers in the other order compute something else, so the comparison can tell
  reversed_layers = {
    **stacked,
    'decoder': {**stacked['decoder'], 'layers': jax.tree.map(lambda x: x[::-1], stacked['decoder']['layers'])},
  }
  assert np.abs(jax.jit(scanned.apply)({'params': reversed_layers}, tokens) - want).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# The one train step, sharded


def lm_train_config(mesh=(1, 1, 1)):
  config = test_parallel.small_config(mesh)
  config.model.update(
    kind='decoder', pre_norm=True, positional='learned', activation='gelu', use_bias=True, scale_embeddings=False
  )
  config.label_smoothing = 0.0
  return config


def lm_batches(config, num=3):
  return [{k: v for k, v in b.items() if k.startswith('targets')} for b in test_parallel.synthetic_batches(config, num)]


@pytest.fixture(scope='module')
def one_device_lm_run():
  config = lm_train_config()
  losses, initial, state = test_parallel.run_steps(
    config, parallel.make_mesh(config.mesh, devices=jax.devices()[:1]), lm_batches(config)
  )
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


# ---------------------------------------------------------------------------------------------------------------------
# Generation over the cache


def test_cached_decoding_gives_the_full_forward_pass_logits_at_every_step(model_and_params):
  from transformer_jax.inference import generate

  model, _, params = model_and_params
  rng = np.random.default_rng(3)
  targets = rng.integers(4, VOCAB, (2, LENGTH)).astype(np.int32)
  full = np.asarray(model.apply({'params': params}, targets))  # logits after BOS, t_0, ..., t_{L-2}
  decoder = generate.decoding_model(model.cfg)
  cache = generate.init_cache(decoder, params, 2, LENGTH)
  step = jax.jit(lambda c, tok: generate.decode_step(decoder, params, c, tok))
  inputs = np.concatenate([np.full((2, 1), 3, np.int32), targets[:, :-1]], axis=1)
  for t in range(LENGTH):
    logits, cache = step(cache, jnp.asarray(inputs[:, t]))
    np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-4, atol=1e-4, err_msg=f'step {t}')


def test_top_k_and_top_p_never_allow_a_token_outside_their_set():
  from transformer_jax.inference import generate

  rng = np.random.default_rng(4)
  for trial in range(30):
    logits = rng.normal(0, 1 + 3 * rng.random(), (4, 40)).astype(np.float32)
    top_k, top_p = int(rng.integers(0, 12)), float(rng.uniform(0.05, 1.0))
    kept = np.asarray(generate.filter_logits(jnp.asarray(logits), top_k, top_p)) > -1e8
    allowed = np.ones_like(kept)
    allowed[:, (0, 3)] = False  # PAD and BOS are never generated
    for b in range(4):
      order = [i for i in np.argsort(-logits[b], kind='stable') if allowed[b, i]]
      if top_k:
        order = order[:top_k]
      p = np.exp(logits[b, order] - logits[b, order].max())
      p /= p.sum()
      nucleus = order[: int(np.searchsorted(np.cumsum(p), top_p - 1e-6) + 1)]  # smallest prefix reaching top_p
      assert set(np.flatnonzero(kept[b])) == set(nucleus), (trial, b, top_k, top_p)
    draws = np.asarray(
      jax.vmap(lambda k: generate.sample(jnp.asarray(logits), k, 1.0, top_k, top_p))(
        jax.random.split(jax.random.key(trial), 64)
      )
    )
    assert kept[np.arange(4)[None, :], draws].all()


def test_top_p_keeps_the_smallest_set_that_reaches_it_even_at_a_tie():
  """Two tokens of probability exactly 1/2: top_p = 1/2 is reached by one of them, so one is kept; a hair above
  needs both."""
  from transformer_jax.inference import generate

  logits = np.full((1, 16), -1e9, np.float32)
  logits[0, [5, 9]] = 0.0
  count = lambda top_p: int((np.asarray(generate.filter_logits(jnp.asarray(logits), 0, top_p)) > -1e8).sum())
  assert (count(0.5), count(0.5001), count(1.0)) == (1, 2, 2)


class _Ids:
  """A stand-in tokenizer: text is space-separated ids."""

  vocab_size = VOCAB

  def encode_batch(self, texts):
    return [[int(t) for t in s.split()] for s in texts]

  def decode(self, ids):
    out = []
    for i in ids:
      if int(i) == 1:
        break
      if int(i) not in (0, 3):  # PAD, BOS: dropped, as the real tokenizer does
        out.append(str(int(i)))
    return ' '.join(out)


def test_generation_is_reproducible_by_seed_and_greedy_is_the_argmax_of_the_full_pass(model_and_params):
  from transformer_jax.inference import generate

  model, apply, params = model_and_params
  prompts = ['5 6 7', '9', '10 11 12 13 14 15']
  kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9)
  a = generate.generate_texts(params, model.cfg, _Ids(), prompts, seed=1, **kw)
  assert a == generate.generate_texts(params, model.cfg, _Ids(), prompts, seed=1, **kw)
  others = [generate.generate_texts(params, model.cfg, _Ids(), prompts, seed=s, **kw) for s in (2, 3)]
  assert any(o != a for o in others)
  greedy = generate.generate_texts(params, model.cfg, _Ids(), prompts, max_new_tokens=6, temperature=0.0)
  for prompt, completion in zip(prompts, greedy):
    seq = [int(t) for t in prompt.split()]
    for _ in range(6):  # the full forward pass (one padded shape: causal, so padding changes nothing), one more token
      row = np.zeros((1, LENGTH), np.int32)
      row[0, : len(seq) + 1] = seq + [4]
      logits = np.array(apply(params, row, (row > 0).astype(np.int32), np.arange(LENGTH, dtype=np.int32)[None]))[
        0, len(seq)
      ]
      logits[[0, 3]] = -np.inf
      token = int(np.argmax(logits))
      if token == 1:
        break
      seq.append(token)
    assert completion.split() == [str(t) for t in seq[len(prompt.split()) :]]


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_with_a_note(model_and_params):
  import io
  from transformer_jax.inference import generate

  model, _, params = model_and_params
  long = ' '.join(str(4 + i % 50) for i in range(LENGTH + 5))
  notes = io.StringIO()
  got = generate.generate_texts(params, model.cfg, _Ids(), [long], max_new_tokens=4, temperature=0.0, notes=notes)
  kept = ' '.join(long.split()[-(LENGTH - 1 - 4) :])
  assert 'kept its last' in notes.getvalue()
  assert got == generate.generate_texts(params, model.cfg, _Ids(), [kept], max_new_tokens=4, temperature=0.0)
