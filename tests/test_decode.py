"""Properties of decoding: the beam-expanded, reordered cache computes the full forward pass; beam search finds what
an exhaustive search finds; its scores are GNMT length-penalised log-probabilities of what it returns; it reduces
to greedy decoding; it keeps the paper's output-length rule; it runs sharded over the batch without gathering it.

Shapes are shared between tests (one model size, batch 8 = the simulated devices) so jit compiles are reused.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from transformer_jax.inference import decode
from transformer_jax import parallel
from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.model.transformer import ModelConfig, Transformer

# Vocabulary PAD, EOS, UNK, BOS + 2 real tokens: decoding may emit EOS, UNK, 4, 5 (never PAD or BOS).
TINY = ModelConfig(vocab_size=6, num_layers=1, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0, max_len=16)


def _allowed(cfg):
  return [t for t in range(cfg.vocab_size) if t not in (PAD_ID, BOS_ID)]


ALLOWED = _allowed(TINY)
BATCH, SOURCE = 8, 3


@functools.cache
def _jit_init(cfg):
  return jax.jit(Transformer(cfg).init)


def _random_model(cfg, seed, batch=BATCH, src=SOURCE, sharpen=3.0):
  """Random weights (scaled up so distributions are peaked and searches disagree) and random EOS-ended sources
  of lengths 1..src (so per-example output limits differ)."""
  rng = np.random.default_rng(seed)
  inputs = np.zeros((batch, src), np.int32)
  for b, n in enumerate(rng.integers(1, src + 1, batch)):
    inputs[b, : n - 1] = rng.integers(4, cfg.vocab_size, n - 1)
    inputs[b, n - 1] = EOS_ID
  params = nn.meta.unbox(_jit_init(cfg)(jax.random.key(seed), inputs, inputs)['params'])
  return jax.tree.map(lambda x: x * sharpen, params), jnp.asarray(inputs)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(cfg, params, inputs, decoder_inputs):
  """The full (uncached) decoder pass: log-softmax [B, N, T, V] for decoder_inputs [B, N, T] of source inputs[b]."""
  batch, n, length = decoder_inputs.shape
  model = Transformer(cfg)
  flat_inputs = jnp.repeat(inputs, n, axis=0)
  segmentation = (flat_inputs != PAD_ID).astype(jnp.int32)
  flat = decoder_inputs.reshape(batch * n, length)
  encoded = model.apply({'params': params}, flat_inputs, segmentation, method=Transformer.encode)
  logits = model.apply({'params': params}, encoded, segmentation, flat, jnp.ones_like(flat), method=Transformer.decode)
  return jax.nn.log_softmax(logits).reshape(batch, n, length, -1)


def _full_log_probs(cfg, params, inputs, sequences):
  """log P(sequences[b, n, t] | BOS, sequences[b, n, :t], inputs[b]) by the full pass: [B, N, L]."""
  sequences = np.asarray(sequences)
  decoder_inputs = np.concatenate([np.full(sequences.shape[:2] + (1,), BOS_ID, np.int32), sequences[..., :-1]], -1)
  log_probs = np.asarray(_teacher_forced(cfg, params, inputs, decoder_inputs))
  return np.take_along_axis(log_probs, sequences[..., None], axis=-1)[..., 0]


def _gnmt(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha  # written out here, independently of decode.length_penalty


def _hypothesis(row):
  """Output tokens up to and including the first EOS, else up to the padding (PAD is never generated)."""
  row = [int(t) for t in np.asarray(row)]
  end = row.index(EOS_ID) + 1 if EOS_ID in row else (row.index(PAD_ID) if PAD_ID in row else len(row))
  return tuple(row[:end])


def _score(cfg, params, inputs, tokens, alpha):
  """Length-penalised log-probability of each output row by the full forward pass; checks PAD after the end."""
  tokens = np.asarray(tokens)
  log_probs = _full_log_probs(cfg, params, inputs, tokens[:, None])[:, 0]
  scores = []
  for b, row in enumerate(tokens):
    n = len(_hypothesis(row))
    assert n > 0 and np.all(row[n:] == PAD_ID), row
    scores.append(log_probs[b, :n].sum() / _gnmt(n, alpha))
  return np.asarray(scores)


def _limits(inputs, extra, cap):
  return np.minimum(np.sum(np.asarray(inputs) != PAD_ID, 1) + extra, cap)


def test_length_penalty_is_gnmt():
  for alpha in (0.0, 0.6, 1.0):
    for n in (1, 2, 7, 50):
      assert float(decode.length_penalty(n, alpha)) == pytest.approx(((5 + n) / 6) ** alpha, rel=1e-6)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_beam_expanded_cache_with_reordering_matches_full_forward(scan_layers):
  """Expand the cache to W beams, then each step reorder the beams at random (gather_beams, as beam search does)
  and feed every beam its own token: each step's log-probabilities equal the full pass over that beam's history.
  (scan_layers puts a leading layer axis on every cache entry, the step counters included.)"""
  cfg = ModelConfig(**{**TINY.__dict__, 'vocab_size': 11, 'num_layers': 2, 'scan_layers': scan_layers})
  params, inputs = _random_model(cfg, seed=4, batch=3, src=5, sharpen=1.0)
  batch, beams, steps = inputs.shape[0], 3, 5
  rng = np.random.default_rng(0)
  model = decode.decoding_model(cfg)

  @jax.jit
  def start(params, inputs):
    segmentation = (inputs != PAD_ID).astype(jnp.int32)
    encoded = model.apply({'params': params}, inputs, segmentation, method=Transformer.encode)
    cache = decode.expand_cache_to_beams(decode.init_cache(model, params, encoded, segmentation, steps), beams)
    return cache, jnp.repeat(encoded, beams, 0), jnp.repeat(segmentation, beams, 0)

  cache, encoded, segmentation = start(params, inputs)
  step = jax.jit(functools.partial(decode.decode_step, model))
  gather = jax.jit(decode.gather_beams)
  history = np.zeros((batch, beams, steps), np.int32)  # each beam's decoder inputs so far (zeros beyond)
  snapshots, cached = [], []
  for t in range(steps):
    if t:
      parents = rng.integers(0, beams, (batch, beams))
      history = np.take_along_axis(history, parents[..., None], axis=1)
      cache = gather(cache, jnp.asarray(parents))
    tokens = rng.integers(0, cfg.vocab_size, (batch, beams)).astype(np.int32)
    history = history.copy()
    history[..., t] = tokens
    log_probs, cache = step(params, cache, encoded, segmentation, jnp.asarray(tokens.reshape(-1)))
    snapshots.append(history)
    cached.append(np.asarray(log_probs).reshape(batch, beams, -1))
  # one full pass over every step's histories (positions after t cannot affect position t: causal)
  full = np.asarray(_teacher_forced(cfg, params, jnp.tile(inputs, (steps, 1)), np.concatenate(snapshots)))
  for t in range(steps):
    np.testing.assert_allclose(cached[t], full[t * batch : (t + 1) * batch, :, t], atol=1e-4, err_msg=f'step {t}')


def _exhaustive(cfg, params, inputs, length, alpha, limits):
  """Every example's hypotheses over ALL outputs up to its limit (EOS-ended, or `limit` tokens without EOS),
  scored by the full forward pass, best first."""
  sequences = np.asarray(list(itertools.product(ALLOWED, repeat=length)), np.int32)
  log_probs = _full_log_probs(cfg, params, inputs, np.broadcast_to(sequences, (inputs.shape[0],) + sequences.shape))
  cumulative = np.cumsum(log_probs, axis=-1)
  ranked = []
  for b, limit in enumerate(limits):
    candidates = {}
    for seq, cum in zip(sequences, cumulative[b]):
      hyp = _hypothesis(seq[:limit])
      candidates[hyp] = cum[len(hyp) - 1] / _gnmt(len(hyp), alpha)
    ranked.append(sorted(candidates.items(), key=lambda kv: -kv[1]))
  return ranked


@pytest.mark.parametrize('seed,alpha,extra', [(5, 0.6, 50), (4, 0.0, 50), (2, 2.0, 1)])
def test_large_beam_equals_exhaustive_search(seed, alpha, extra):
  """With W >= n * (n-1)^(L-1) for n allowed tokens nothing is ever pruned, so beam search (early stopping
  included) must return the exact best hypothesis, within each example's limit min(source length + extra, L)."""
  length = 4
  params, inputs = _random_model(TINY, seed)
  n = len(ALLOWED)
  tokens, scores = decode.beam_search(
    params,
    inputs,
    cfg=TINY,
    beam_size=n * (n - 1) ** (length - 1),
    alpha=alpha,
    max_decode_len=length,
    extra_length=extra,
  )
  limits = _limits(inputs, extra, length)
  ranked = _exhaustive(TINY, params, inputs, length, alpha, limits)
  np.testing.assert_allclose(scores, _score(TINY, params, inputs, tokens, alpha), atol=1e-4)
  for b, hypotheses in enumerate(ranked):
    (best, best_score), runner_up = hypotheses[0], hypotheses[1][1]
    assert scores[b] == pytest.approx(best_score, abs=1e-4)
    if runner_up < best_score - 1e-4:  # no near-tie: the sequence itself must match
      assert _hypothesis(tokens[b]) == best
  # not vacuous: the best hypotheses differ in length (EOS-ended and truncated ones, different limits)
  assert len({len(h[0][0]) for h in ranked}) > 1


def _reference_beam_search(cfg, params, inputs, beams, alpha, length, limits):
  """The same search written plainly, scored by the full pass, with NO early stopping: every example runs to its
  limit. Each step: all extensions of the alive hypotheses, best 2W; EOS-ended ones ranked within the best W
  finish; the best W others stay alive (at the limit they finish, truncated); keep the W best finished."""
  batch = inputs.shape[0]
  alive = [[((), 0.0)] for _ in range(batch)]
  finished = [[] for _ in range(batch)]
  for t in range(length):
    decoder_inputs = np.full((batch, beams, length), BOS_ID, np.int32)
    for b in range(batch):
      for w, (seq, _) in enumerate(alive[b]):
        decoder_inputs[b, w, 1 : t + 1] = seq
    log_probs = np.asarray(_teacher_forced(cfg, params, inputs, decoder_inputs))[:, :, t]  # [B, W, V]
    for b in range(batch):
      if t >= limits[b]:
        continue
      candidates = sorted(
        ((seq + (tok,), lp + log_probs[b, w, tok]) for w, (seq, lp) in enumerate(alive[b]) for tok in _allowed(cfg)),
        key=lambda c: -c[1],
      )[: 2 * beams]
      for rank, (seq, lp) in enumerate(candidates):
        if (seq[-1] == EOS_ID and rank < beams) or (seq[-1] != EOS_ID and t + 1 == limits[b]):
          finished[b].append((seq, lp / _gnmt(t + 1, alpha)))
      finished[b] = sorted(finished[b], key=lambda c: -c[1])[:beams]
      alive[b] = [c for c in candidates if c[0][-1] != EOS_ID][:beams]
  return [f[0] for f in finished]


# (vocab 12, seed 0, W=2, alpha=3) stops early where a bound of log P / lp(current length) would stop too early
@pytest.mark.parametrize('vocab,seed,beams,alpha', [(12, 0, 2, 3.0), (6, 1, 3, 1.0), (6, 2, 2, 0.6)])
def test_early_stopping_never_changes_the_result(vocab, seed, beams, alpha):
  """Against the plain search run to the end: the same best hypothesis, so stopping when no alive hypothesis can
  beat the worst finished one only saves steps."""
  length = 12
  cfg = ModelConfig(**{**TINY.__dict__, 'vocab_size': vocab})
  params, inputs = _random_model(cfg, seed, sharpen=2.0)
  tokens, scores = decode.beam_search(params, inputs, cfg=cfg, beam_size=beams, alpha=alpha, max_decode_len=length)
  reference = _reference_beam_search(cfg, params, inputs, beams, alpha, length, _limits(inputs, 50, length))
  for b, (seq, score) in enumerate(reference):
    assert scores[b] == pytest.approx(score, abs=1e-4)
    assert _hypothesis(tokens[b]) == seq


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_beam_of_one_without_length_penalty_is_greedy(seed):
  params, inputs = _random_model(TINY, seed, sharpen=2.0)
  greedy = decode.greedy_decode(params, inputs, cfg=TINY, max_decode_len=8)
  tokens, scores = decode.beam_search(params, inputs, cfg=TINY, beam_size=1, alpha=0.0, max_decode_len=8)
  np.testing.assert_array_equal(tokens, greedy)
  np.testing.assert_allclose(scores, _score(TINY, params, inputs, greedy, 0.0), atol=1e-4)


@pytest.mark.parametrize('beams,alpha', [(1, 0.6), (3, 0.6), (3, 1.5)])
def test_scores_are_length_penalised_log_probs_of_the_returned_tokens(beams, alpha):
  params, inputs = _random_model(TINY, seed=10 + beams, sharpen=2.0)
  tokens, scores = decode.beam_search(params, inputs, cfg=TINY, beam_size=beams, alpha=alpha, max_decode_len=8)
  np.testing.assert_allclose(scores, _score(TINY, params, inputs, tokens, alpha), atol=1e-4)


def test_min_length_and_source_length_limit():
  """min_decode_len bans EOS, so outputs run to the limit: source length + extra_length, capped at max_decode_len.
  Greedy takes the full pass's best allowed token at every position up to it; beam scores count exactly that many
  tokens."""
  params, inputs = _random_model(TINY, seed=5)
  limits = _limits(inputs, 2, 4)
  assert len(set(limits)) > 1, limits
  kwargs = dict(cfg=TINY, max_decode_len=4, min_decode_len=4, extra_length=2)
  greedy = np.asarray(decode.greedy_decode(params, inputs, **kwargs))
  tokens, scores = decode.beam_search(params, inputs, beam_size=3, alpha=0.6, **kwargs)
  for out in (greedy, np.asarray(tokens)):
    assert not np.any(out == EOS_ID)
    assert [len(_hypothesis(row)) for row in out] == list(limits)
  log_probs = np.asarray(
    _teacher_forced(
      TINY, params, inputs, np.concatenate([np.full((BATCH, 1), BOS_ID, np.int32), greedy[:, :-1]], 1)[:, None]
    )
  )[:, 0].copy()
  log_probs[..., [EOS_ID, PAD_ID, BOS_ID]] = -np.inf
  for b, limit in enumerate(limits):
    np.testing.assert_array_equal(greedy[b, :limit], np.argmax(log_probs[b, :limit], -1))
  np.testing.assert_allclose(scores, _score(TINY, params, inputs, tokens, 0.6), atol=1e-4)
  with pytest.raises(ValueError, match='max_len'):
    decode.greedy_decode(params, inputs, cfg=TINY, max_decode_len=TINY.max_len + 1)


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 2, 2)])
def test_sharded_batch_gives_the_same_results_without_gathering_the_batch(mesh_shape):
  """Inputs sharded over the batch axes (data, fsdp), parameters over fsdp and tensor: the same outputs as on one
  device; with a data-only mesh, no collective moves the batch (top-k and the cache gather run per device)."""
  params, inputs = _random_model(TINY, seed=7, sharpen=2.0)
  kwargs = dict(cfg=TINY, beam_size=3, alpha=0.6, max_decode_len=8)
  expected = decode.beam_search(params, inputs, **kwargs)
  expected_greedy = decode.greedy_decode(params, inputs, cfg=TINY, max_decode_len=8)
  data, fsdp, tensor = mesh_shape
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    specs = nn.get_partition_spec(jax.eval_shape(_jit_init(TINY), jax.random.key(0), inputs, inputs))['params']
    params = jax.device_put(params, parallel.logical_shardings(specs, mesh))
    sharded = jax.device_put(np.asarray(inputs), parallel.batch_sharding(mesh))
    tokens, scores = decode.beam_search(params, sharded, **kwargs)
    greedy = decode.greedy_decode(params, sharded, cfg=TINY, max_decode_len=8)
    hlo = decode.beam_search.lower(params, sharded, **kwargs).compile().as_text()
  assert tokens.sharding.is_equivalent_to(parallel.batch_sharding(mesh), tokens.ndim)
  np.testing.assert_array_equal(tokens, expected[0])
  np.testing.assert_allclose(scores, expected[1], atol=1e-5)
  np.testing.assert_array_equal(greedy, expected_greedy)
  if mesh_shape == (8, 1, 1):
    assert not re.search(r'\b(all-gather|all-to-all|collective-permute)\b', hlo), 'beam search moves the batch'


# ---------------------------------------------------------------------------------------------------------------------
# model.kv_cache_dtype: a lower-precision cache computes what the full pass does, ring buffer (attention_window) too


@functools.cache
def _step_fn(cfg):
  model = decode.decoding_model(cfg)
  return jax.jit(
    lambda params, cache, encoded, segmentation, tokens: decode.decode_step(
      model, params, cache, encoded, segmentation, tokens
    )
  )


def _cached_log_probs(cfg, params, inputs, decoder_inputs):
  """Per-step log-probabilities [B, T, V] of decoder_inputs [B, T] fed one position at a time through the cache."""
  _, encoded, segmentation, cache = decode._encode_and_cache(params, inputs, cfg, decoder_inputs.shape[1])
  step, out = _step_fn(cfg), []
  for t in range(decoder_inputs.shape[1]):
    log_probs, cache = step(params, cache, encoded, segmentation, decoder_inputs[:, t])
    out.append(np.asarray(log_probs))
  return np.stack(out, axis=1), cache


@pytest.mark.parametrize('window', [0, 3])
@pytest.mark.parametrize('kv_cache_dtype', ['int8', 'bfloat16'])
def test_a_low_precision_cache_follows_the_full_pass_and_holds_the_bytes_it_reports(kv_cache_dtype, window):
  import dataclasses

  from transformer_jax.model import config as model_config

  cfg = ModelConfig(**{**TINY.__dict__, 'num_layers': 2, 'd_model': 32, 'num_heads': 2, 'attention_window': window})
  params, inputs = _random_model(cfg, seed=3, sharpen=1.5)
  length = 10  # past the window: the ring buffer wraps around
  rng = np.random.default_rng(3)
  decoder_inputs = np.concatenate([np.full((BATCH, 1), BOS_ID), rng.integers(4, 6, (BATCH, length - 1))], 1)
  decoder_inputs = jnp.asarray(decoder_inputs, jnp.int32)
  full = np.asarray(_teacher_forced(cfg, params, inputs, decoder_inputs[:, None]))[:, 0]  # windowed mask when W > 0
  low = dataclasses.replace(cfg, kv_cache_dtype=kv_cache_dtype)
  got, cache = _cached_log_probs(low, params, inputs, decoder_inputs)
  exact, _ = _cached_log_probs(cfg, params, inputs, decoder_inputs)
  np.testing.assert_allclose(exact, full, atol=1e-4)  # the float32 cache is the full pass
  error = np.abs(got - full).max()
  print(f'{kv_cache_dtype} cache, window {window}: max |log-prob error| {error:.4f}')
  assert 0 < error < (0.05 if kv_cache_dtype == 'int8' else 0.02)
  if window:  # the window matters here, by far more than the cache's rounding
    unwindowed = np.asarray(
      _teacher_forced(dataclasses.replace(cfg, attention_window=0), params, inputs, decoder_inputs[:, None])
    )[:, 0]
    assert np.abs(unwindowed - full).max() > 10 * error
  leaves = {
    '/'.join(str(getattr(k, 'key', k)) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(cache)
  }
  entries = {n: x for n, x in leaves.items() if 'self_attention/cached_' in n}
  names = {n.rsplit('/', 1)[-1] for n in entries}
  assert names >= {'cached_key', 'cached_value'}
  assert {x.dtype for n, x in entries.items() if not n.endswith('_scale')} == {jnp.dtype(kv_cache_dtype)}
  assert all(x.shape[2] == (window or length) for x in entries.values())  # slots: the window, else the length
  slots = window or length
  per_token = sum(x.nbytes for x in entries.values()) / (BATCH * slots)
  assert per_token == model_config.kv_cache_bytes_per_token(low)
  assert ('cached_key_scale' in names) == (kv_cache_dtype == 'int8')


@pytest.mark.parametrize('kv_cache_dtype', ['int8', 'bfloat16'])
def test_beam_search_reorders_a_low_precision_cache_with_its_scales(kv_cache_dtype):
  """Beam search with a lower-precision cache scores what it returns as the full pass scores it (the reordering
  moves the int8 scales with their rows), within the cache's rounding."""
  import dataclasses

  cfg = ModelConfig(**{**TINY.__dict__, 'kv_cache_dtype': kv_cache_dtype})
  params, inputs = _random_model(cfg, seed=5)
  tokens, scores = decode.beam_search(params, inputs, cfg=cfg, beam_size=3, alpha=0.6, max_decode_len=8)
  float_cfg = dataclasses.replace(cfg, kv_cache_dtype='auto')
  np.testing.assert_allclose(scores, _score(float_cfg, params, inputs, tokens, 0.6), atol=0.05)
  float_tokens, _ = decode.beam_search(params, inputs, cfg=float_cfg, beam_size=3, alpha=0.6, max_decode_len=8)
  assert np.mean(np.all(np.asarray(tokens) == np.asarray(float_tokens), axis=1)) >= 0.75
