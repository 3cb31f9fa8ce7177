"""Inference over the decode cache: the encoder runs once per batch, the decoder one position per step.

greedy_decode and beam_search are whole-batch functions under jax.jit (one lax.while_loop each); inputs may be
global arrays sharded over the mesh's batch axes (parallel.batch_sharding): every per-example quantity keeps the
batch as its leading axis, and beams are laid out [B * W] batch-major so the sharding of B carries over.

Conventions shared by both searches (section 6.1 of the paper, GNMT's length penalty):
- Output length counts the generated tokens including EOS. The longest output of an example is
  min(its source length + `extra_length` (the paper's 50), `max_decode_len` (the cache size)); an output that
  reaches it without EOS is kept whole (truncated, never cut to its first token). All-PAD rows (batch padding)
  stop after one step.
- PAD and BOS are never generated (they are input-side symbols, and a generated PAD would be indistinguishable
  from the padding after an output); `min_decode_len` also forbids EOS before that many tokens (benchmarks force
  fixed-length outputs with it). Forbidden tokens get a log-probability of NEG_INF; the others are not renormalised.
- Tokens after EOS are PAD.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.model.transformer import ModelConfig, Transformer
from transformer_jax.parallel import BATCH_AXES as _BATCH_AXES
from transformer_jax.model.vocab import DEFAULT_SPECIAL_IDS, SpecialIds

P = jax.sharding.PartitionSpec

NEG_INF = -1.0e9  # "impossible" log-probability: finite, so sums and divisions never make NaN
MAX_LENGTH_MARGIN = 50  # the paper: maximum output length = input length + 50
_COUNTERS = ('cache_index', 'position_index')  # cache scalars shared by every row ([layers] with scan_layers)
# The only cache entries that differ between beams (the scales: model.kv_cache_dtype='int8').
_SELF_ATTENTION_CACHE = ('cached_key', 'cached_value', 'cached_key_scale', 'cached_value_scale')


def decoding_model(cfg: ModelConfig) -> Transformer:
  return Transformer(ModelConfig(**{**cfg.__dict__, 'decode': True, 'dropout_rate': 0.0}))


def init_cache(model: Transformer, params, encoded, inputs_segmentation, max_decode_len: int):
  """Creates the cache: self-attention keys/values sized [B, max_decode_len, H, K], cross keys/values filled.

  The creation pass runs the decoder over a dummy target; under jit everything but the cross-attention keys/values
  is dead code that XLA removes.
  """
  batch = encoded.shape[0]
  dummy = jnp.full((batch, max_decode_len), model.cfg.special_ids.bos, jnp.int32)
  _, variables = model.apply(
    {'params': params}, encoded, inputs_segmentation, dummy, method=Transformer.decode, mutable=['cache']
  )
  return variables['cache']


def decode_step(model: Transformer, params, cache, encoded, inputs_segmentation, tokens):
  """tokens [B] (the previous output) -> (log-probabilities [B, V], new cache)."""
  logits, variables = model.apply(
    {'params': params, 'cache': cache},
    encoded,
    inputs_segmentation,
    tokens[:, None],
    method=Transformer.decode,
    mutable=['cache'],
  )
  return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), variables['cache']


PENALTIES = ('gnmt', 'hf')


def length_penalty(length, alpha, penalty: str = 'gnmt'):
  """A hypothesis scores log P(Y) / lp(Y). 'gnmt' (Wu et al. 2016): lp(Y) = ((5 + |Y|) / 6)^alpha; 'hf':
  lp(Y) = |Y|^alpha, transformers' beam search (its `length_penalty` is alpha, default 1.0)."""
  length = jnp.asarray(length, jnp.float32)
  return length**alpha if penalty == 'hf' else ((5.0 + length) / 6.0) ** alpha


def output_limits(
  inputs, max_decode_len: int, extra_length: int | None = MAX_LENGTH_MARGIN, *, pad_id: int = DEFAULT_SPECIAL_IDS.pad
):
  """[B] longest output per example: source length (non-PAD tokens, EOS included) + extra_length, capped at
  max_decode_len. A row without source tokens is batch padding: one step."""
  source_length = jnp.sum(inputs != pad_id, axis=1).astype(jnp.int32)
  limits = (
    jnp.full_like(source_length, max_decode_len)
    if extra_length is None
    else jnp.minimum(source_length + extra_length, max_decode_len)
  )
  return jnp.where(source_length == 0, 1, limits)


def _encode_and_cache(params, inputs, cfg: ModelConfig, max_decode_len: int):
  if max_decode_len > cfg.max_len:
    raise ValueError(f"max_decode_len={max_decode_len} exceeds the model's max_len={cfg.max_len} (positions)")
  model = decoding_model(cfg)
  inputs_segmentation = (inputs != cfg.special_ids.pad).astype(jnp.int32)
  encoded = model.apply({'params': params}, inputs, inputs_segmentation, method=Transformer.encode)
  cache = init_cache(model, params, encoded, inputs_segmentation, max_decode_len)
  return model, encoded, inputs_segmentation, cache


def _forbid(log_probs, step, min_decode_len: int, ids: SpecialIds):
  """log_probs [..., V] with PAD and BOS (and EOS before min_decode_len tokens) made impossible."""
  log_probs = log_probs.at[..., ids.pad].set(NEG_INF).at[..., ids.bos].set(NEG_INF)
  if not min_decode_len:
    return log_probs
  return log_probs.at[..., ids.eos].add(jnp.where(step < min_decode_len, NEG_INF, 0.0))


@functools.partial(jax.jit, static_argnames=('cfg', 'max_decode_len', 'min_decode_len', 'extra_length'))
def greedy_decode(
  params,
  inputs,
  *,
  cfg: ModelConfig,
  max_decode_len: int,
  min_decode_len: int = 0,
  extra_length: int | None = MAX_LENGTH_MARGIN,
):
  """inputs [B, S] (EOS-terminated, PAD-padded) -> tokens [B, max_decode_len], PAD after the first EOS."""
  model, encoded, inputs_segmentation, cache = _encode_and_cache(params, inputs, cfg, max_decode_len)
  ids = cfg.special_ids
  limits = output_limits(inputs, max_decode_len, extra_length, pad_id=ids.pad)
  batch = inputs.shape[0]

  def cond(carry):
    i, _, _, _, finished = carry
    return (i < max_decode_len) & ~jnp.all(finished)

  def body(carry):
    i, cache, out, previous, finished = carry
    log_probs, cache = decode_step(model, params, cache, encoded, inputs_segmentation, previous)
    log_probs = _forbid(log_probs, i, min_decode_len, ids)
    token = jnp.where(finished, ids.pad, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))
    out = out.at[:, i].set(token)
    return i + 1, cache, out, token, finished | (token == ids.eos) | (i + 1 >= limits)

  init = (
    jnp.array(0),
    cache,
    jnp.full((batch, max_decode_len), ids.pad, jnp.int32),
    jnp.full((batch,), ids.bos, jnp.int32),
    jnp.zeros((batch,), bool),
  )
  return jax.lax.while_loop(cond, body, init)[2]


# ---------------------------------------------------------------------------------------------------------------------
# Beam search


def _batch_axis(x) -> int:
  return x.ndim - 4  # per-layer cache arrays are [B, H, L, K]; nn.scan (scan_layers) adds a leading layer axis


def _leaf_name(path) -> str:
  return str(getattr(path[-1], 'key', path[-1]))


def expand_cache_to_beams(cache, beam_size: int):
  """Every row of the cache repeated beam_size times: [B, ...] -> [B * W, ...] (rows b*W .. b*W+W-1 are b's beams).

  The step counters (cache_index, position_index) are shared by all rows and stay as they are.
  """

  def expand(path, x):
    if _leaf_name(path) in _COUNTERS:
      return x
    return jnp.repeat(x, beam_size, axis=_batch_axis(x))

  return jax.tree_util.tree_map_with_path(expand, cache)


def _batch_sharding_axes(batch: int):
  """(mesh, batch axes) when the context mesh splits a batch of this size over its batch axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = tuple(a for a in _BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  shards = math.prod(mesh.shape[a] for a in axes)
  if not axes or batch % shards:
    return None
  return mesh, axes


def _per_batch_shard(fn, args, batch_dims, out_batch_dims, batch: int):
  """fn(*args) on each device's part of the batch when it is sharded (the other mesh axes stay automatic), else
  fn(*args). XLA's partitioner would otherwise gather the whole batch for top-k and for gathers by index."""
  sharded = _batch_sharding_axes(batch)
  if sharded is None:
    return fn(*args)
  mesh, axes = sharded
  spec = lambda dim: P(*([None] * dim + [axes]))
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=tuple(spec(d) for d in batch_dims),
    out_specs=jax.tree.map(spec, out_batch_dims),
    axis_names=frozenset(axes),
  )(*args)


def gather_beams(cache, beam_indices):
  """Reorders the self-attention cache so beam w of example b continues from beam beam_indices[b, w] of b.

  Rows are gathered whole (row b*W + beam_indices[b, w] of [B*W, H, L, K]): contiguous copies, on each device's part
  of the batch. Cross-attention keys/values are the same for all beams of an example and the counters are shared:
  untouched.
  """

  def rows(x, indices, axis):
    batch, beams = indices.shape
    flat = (jnp.arange(batch, dtype=indices.dtype)[:, None] * beams + indices).reshape(-1)
    return jnp.take(x, flat, axis=axis, mode='clip')

  def gather(path, x):
    if _leaf_name(path) not in _SELF_ATTENTION_CACHE:
      return x
    axis = _batch_axis(x)
    return _per_batch_shard(
      functools.partial(rows, axis=axis), (x, beam_indices), (axis, 0), axis, beam_indices.shape[0]
    )

  return jax.tree_util.tree_map_with_path(gather, cache)


def _top_k(x, k: int):
  """lax.top_k over the last axis of [B, N], per device when the batch is sharded."""
  return _per_batch_shard(lambda y: tuple(jax.lax.top_k(y, k)), (x,), (0,), (0, 0), x.shape[0])


def _take(x, index):
  """x [B, N, ...], index [B, M] -> [B, M, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class _BeamSearch(NamedTuple):
  """What every step of one beam search reads: the model over the beam-expanded batch and each example's limits."""

  model: Transformer
  params: Any
  encoded: jax.Array  # [B*W, S, D]
  inputs_segmentation: jax.Array  # [B*W, S]
  ids: SpecialIds
  limits: jax.Array  # [B] longest output per example
  limit_penalty: jax.Array  # [B] lp at the output limit
  lp: Callable
  penalty: str
  min_decode_len: int
  batch: int
  beams: int
  length: int


def _start_beam_search(
  params,
  inputs,
  cfg: ModelConfig,
  beam_size: int,
  alpha: float,
  max_decode_len: int,
  min_decode_len: int,
  extra_length: int | None,
  penalty: str,
):
  """(the search's constants, the cache expanded to [B * W] rows): the encoder runs once per example, not per beam."""
  if penalty not in PENALTIES:
    raise ValueError(f'penalty must be one of {PENALTIES}, got {penalty!r}')
  lp = functools.partial(length_penalty, alpha=alpha, penalty=penalty)
  batch, beams, length = inputs.shape[0], beam_size, max_decode_len
  model, encoded, inputs_segmentation, cache = _encode_and_cache(params, inputs, cfg, max_decode_len)
  ids = cfg.special_ids
  limits = output_limits(inputs, max_decode_len, extra_length, pad_id=ids.pad)  # [B]
  cache = expand_cache_to_beams(cache, beams)
  encoded = jnp.repeat(encoded, beams, axis=0)  # [B*W, S, D] (unused past the cache: cross keys are cached)
  inputs_segmentation = jnp.repeat(inputs_segmentation, beams, axis=0)
  limit_penalty = lp(limits)  # [B]
  search = _BeamSearch(
    model=model,
    params=params,
    encoded=encoded,
    inputs_segmentation=inputs_segmentation,
    ids=ids,
    limits=limits,
    limit_penalty=limit_penalty,
    lp=lp,
    penalty=penalty,
    min_decode_len=min_decode_len,
    batch=batch,
    beams=beams,
    length=length,
  )
  return search, cache


def _initial_beams(search: _BeamSearch, cache) -> dict:
  """The loop state before the first step: one alive hypothesis (the empty output) per example, none finished."""
  batch, beams, length, ids = search.batch, search.beams, search.length, search.ids
  return dict(
    i=jnp.array(0, jnp.int32),
    cache=cache,
    alive_seqs=jnp.full((batch, beams, length), ids.pad, jnp.int32),
    # Only beam 0 is alive at first: the W copies of the start would otherwise fill the beam with duplicates.
    alive_log_probs=jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF).astype(jnp.float32), (batch, 1)),
    last_tokens=jnp.full((batch, beams), ids.bos, jnp.int32),
    finished_seqs=jnp.full((batch, beams, length), ids.pad, jnp.int32),
    finished_scores=jnp.full((batch, beams), NEG_INF, jnp.float32),
  )


def _done(search: _BeamSearch, state) -> jax.Array:
  """[B]: no alive hypothesis can still enter the W best finished ones."""
  lp = search.lp
  i, alive_log_probs, finished_scores = state['i'], state['alive_log_probs'], state['finished_scores']
  best_alive = jnp.max(alive_log_probs, axis=1)  # [B]
  if search.penalty == 'hf':  # HF's heuristic: the alive hypothesis scored at its current length i
    bound = best_alive / lp(jnp.maximum(i, 1))
  else:
    bound = best_alive / jnp.maximum(lp(i + 1), search.limit_penalty)
  worst_finished = jnp.min(finished_scores, axis=1)
  return (best_alive <= NEG_INF / 2) | ((worst_finished > NEG_INF / 2) & (worst_finished >= bound))


def _searching(search: _BeamSearch, state) -> jax.Array:
  """The loop's condition: outputs have room left and some example is not done."""
  return (state['i'] < search.length) & ~jnp.all(_done(search, state))


def _extend_beams(search: _BeamSearch, state):
  """Every alive hypothesis extended by every token; the best 2W extensions [B, 2W]: (log P, the beam each extends,
  its token, its sequence [B, 2W, L]) and the cache after the step."""
  i, batch, beams = state['i'], search.batch, search.beams
  # Examples that are done stop here (their alive hypotheses die) while others go on: an example's result never
  # depends on the rest of its batch.
  alive_log_probs = jnp.where(_done(search, state)[:, None], NEG_INF, state['alive_log_probs'])
  log_probs, cache = decode_step(
    search.model,
    search.params,
    state['cache'],
    search.encoded,
    search.inputs_segmentation,
    state['last_tokens'].reshape(batch * beams),
  )
  vocab = log_probs.shape[-1]
  log_probs = _forbid(log_probs.reshape(batch, beams, vocab), i, search.min_decode_len, search.ids)
  candidates = (alive_log_probs[:, :, None] + log_probs).reshape(batch, beams * vocab)
  # At most W extensions end in EOS (one per beam), so the best 2W always hold W that do not.
  top_log_probs, top_index = _top_k(candidates, 2 * beams)  # [B, 2W]
  top_beam, top_token = top_index // vocab, top_index % vocab
  top_seqs = _take(state['alive_seqs'], top_beam)  # [B, 2W, L]
  top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, top_token[:, :, None], i, axis=2)
  return top_log_probs, top_beam, top_token, top_seqs, cache


def _finish_beams(search: _BeamSearch, state, top_log_probs, top_seqs, ends):
  """The W best finished hypotheses by score, among the earlier ones and the extensions that end here."""
  new_scores = jnp.where(ends, top_log_probs / search.lp(state['i'] + 1), NEG_INF)
  scores = jnp.concatenate([state['finished_scores'], new_scores], axis=1)  # [B, 3W]
  finished_scores, keep = _top_k(scores, search.beams)
  finished_seqs = _take(jnp.concatenate([state['finished_seqs'], top_seqs], axis=1), keep)
  return finished_seqs, finished_scores


def _beam_step(search: _BeamSearch, state) -> dict:
  """The loop's body: extend the beams, finish the extensions that end, keep the W best that do not and gather
  their caches."""
  i = state['i']
  top_log_probs, top_beam, top_token, top_seqs, cache = _extend_beams(search, state)
  real = top_log_probs > NEG_INF / 2
  is_eos = top_token == search.ids.eos
  at_limit = (i + 1 >= search.limits)[:, None]  # [B, 1]

  ends = real & ((is_eos & (jnp.arange(2 * search.beams) < search.beams)) | (~is_eos & at_limit))
  finished_seqs, finished_scores = _finish_beams(search, state, top_log_probs, top_seqs, ends)

  alive_log_probs, alive = _top_k(jnp.where(is_eos | ~real, NEG_INF, top_log_probs), search.beams)
  alive_log_probs = jnp.where(at_limit | (alive_log_probs <= NEG_INF / 2), NEG_INF, alive_log_probs)
  return dict(
    i=i + 1,
    cache=gather_beams(cache, _take(top_beam, alive)),
    alive_seqs=_take(top_seqs, alive),
    alive_log_probs=alive_log_probs,
    last_tokens=_take(top_token, alive),
    finished_seqs=finished_seqs,
    finished_scores=finished_scores,
  )


def _best_hypothesis(state):
  """(tokens [B, L], scores [B]) of each example's best finished hypothesis."""
  # Every example ends with a finished hypothesis (its limit turns the alive ones into finished ones); the fallback
  # to the best alive one is for safety only.
  best = jnp.argmax(state['finished_scores'], axis=1)[:, None]
  tokens = _take(state['finished_seqs'], best)[:, 0]
  scores = _take(state['finished_scores'], best)[:, 0]
  has_finished = scores > NEG_INF / 2
  tokens = jnp.where(has_finished[:, None], tokens, state['alive_seqs'][:, 0])
  return tokens, scores


@functools.partial(
  jax.jit, static_argnames=('cfg', 'beam_size', 'max_decode_len', 'min_decode_len', 'extra_length', 'penalty')
)
def beam_search(
  params,
  inputs,
  *,
  cfg: ModelConfig,
  beam_size: int,
  alpha: float = 0.6,
  max_decode_len: int,
  min_decode_len: int = 0,
  extra_length: int | None = MAX_LENGTH_MARGIN,
  penalty: str = 'gnmt',
):
  """inputs [B, S] -> (tokens [B, max_decode_len] best hypothesis, PAD after EOS; scores [B] = log P / lp).

  Each step extends the W alive hypotheses by every token and takes the best 2W extensions:
  - an extension ending in EOS that ranks within the best W becomes a finished candidate (as in HF transformers'
    beam search; with W = 1 and alpha = 0 this makes beam search exactly greedy decoding);
  - the best W extensions not ending in EOS stay alive (so the beam never shrinks);
  - at an example's output limit its alive extensions become finished too (truncated: no EOS).
  The W best finished hypotheses by length-penalised score are kept. An example is done when no alive hypothesis
  can beat the worst of W finished ones: log-probabilities only fall, so log P(alive) / max lp over the lengths
  it can still reach bounds every score it can get. The loop stops when every example is done.
  penalty='hf' is transformers' beam search (generate(num_beams=W, length_penalty=alpha), early_stopping=False):
  lp = |Y|^alpha, and its stopping heuristic, which bounds an alive hypothesis by its score at its current length.
  """
  search, cache = _start_beam_search(
    params, inputs, cfg, beam_size, alpha, max_decode_len, min_decode_len, extra_length, penalty
  )
  state = jax.lax.while_loop(
    functools.partial(_searching, search), functools.partial(_beam_step, search), _initial_beams(search, cache)
  )
  return _best_hypothesis(state)
