"""Sampling from the decoder-only language model over the key/value cache (the CLI is in lm_inference.py).

generate_ids is one jitted function per (batch, cache length, top_k) shape: a lax.while_loop that feeds one token per
step through the cache (model.decode). Row b's sequence is BOS, its prompt (forced, one token per step), then
sampled tokens; every row shares the step counter, so rows with shorter prompts simply start sampling earlier.
A row stops at EOS or after max_new_tokens; the loop stops when every row has. PAD and BOS are never sampled.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the top_k
largest logits (0: all) and to the smallest set of tokens whose probability reaches top_p (nucleus; 1.0: all).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.model.vocab import DEFAULT_SPECIAL_IDS
from transformer_jax.model.transformer import LanguageModel, ModelConfig

NEG_INF = -1.0e9
# The ids of the vocabularies this project trains (the LM's SentencePiece model keeps the defaults).
PAD_ID, EOS_ID, BOS_ID = DEFAULT_SPECIAL_IDS.pad, DEFAULT_SPECIAL_IDS.eos, DEFAULT_SPECIAL_IDS.bos


def decoding_model(cfg: ModelConfig) -> LanguageModel:
  return LanguageModel(ModelConfig(**{**cfg.__dict__, 'decode': True, 'dropout_rate': 0.0}))


def init_cache(model: LanguageModel, params, batch: int, length: int):
  """Self-attention keys/values sized [B, length, H, K] (the creation pass only sizes them; XLA drops its work)."""
  _, variables = model.apply(
    {'params': params}, jnp.full((batch, length), BOS_ID, jnp.int32), method=LanguageModel.decode, mutable=['cache']
  )
  return variables['cache']


def decode_step(model: LanguageModel, params, cache, tokens):
  """tokens [B] at the next position -> (logits [B, V] for the position after it, new cache)."""
  logits, variables = model.apply(
    {'params': params, 'cache': cache}, tokens[:, None], method=LanguageModel.decode, mutable=['cache']
  )
  return logits[:, 0].astype(jnp.float32), variables['cache']


def filter_logits(logits, top_k: int = 0, top_p=1.0):
  """logits [..., V] with every token outside the top-k and outside the nucleus (smallest set whose probability
  reaches top_p; the most likely token always stays) set to NEG_INF, and PAD/BOS forbidden."""
  logits = logits.astype(jnp.float32).at[..., PAD_ID].set(NEG_INF).at[..., BOS_ID].set(NEG_INF)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above this one
  keep_sorted = before < top_p
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocabulary order
  return jnp.where(keep, logits, NEG_INF)


def sample(logits, rng, temperature, top_k: int = 0, top_p=1.0):
  """One token per row: argmax where temperature == 0, else a draw from the filtered, tempered distribution."""

  def greedy():  # the argmax always survives top-k and the nucleus: only PAD/BOS need forbidding (no sort)
    return jnp.argmax(logits.astype(jnp.float32).at[..., PAD_ID].set(NEG_INF).at[..., BOS_ID].set(NEG_INF), axis=-1)

  def draw():
    filtered = filter_logits(logits, top_k, top_p)
    drawn = jax.random.categorical(rng, filtered / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature == 0, jnp.argmax(filtered, axis=-1), drawn)  # rows of a per-row temperature

  # A cond, not a where of both: a greedy step must not pay for the nucleus's sorts over the vocabulary, which would dominate it.
  return jax.lax.cond(jnp.all(temperature == 0), greedy, draw).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('cfg', 'top_k'))
def generate_ids(
  params, sequences, prompt_lengths, rng, temperature, top_p, max_new_tokens, *, cfg: ModelConfig, top_k: int = 0
):
  """sequences [B, L]: BOS, the prompt, then anything (PAD); L is the cache length (<= cfg.max_len).

  Returns sequences [B, L] with each row's completion written after its prompt (PAD after EOS / its last token).
  """
  model = decoding_model(cfg)
  batch, length = sequences.shape
  cache = init_cache(model, params, batch, length)
  ends = jnp.minimum(prompt_lengths + max_new_tokens, length - 1)  # last position a row may write

  def cond(carry):
    t, _, _, done = carry
    return (t < length - 1) & ~jnp.all(done)

  def body(carry):
    t, cache, seq, done = carry
    logits, cache = decode_step(model, params, cache, seq[:, t])
    token = sample(logits, jax.random.fold_in(rng, t), temperature, top_k, top_p)
    generating = t + 1 > prompt_lengths
    token = jnp.where(generating, jnp.where(done, PAD_ID, token), seq[:, t + 1])
    seq = seq.at[:, t + 1].set(token)
    done = done | (generating & ((token == EOS_ID) | (t + 1 >= ends)))
    return t + 1, cache, seq, done

  init = (jnp.array(0), cache, sequences, prompt_lengths >= ends)
  return jax.lax.while_loop(cond, body, init)[2]


def generate_texts(
  params,
  cfg: ModelConfig,
  tokenizer,
  prompts: list[str],
  *,
  max_new_tokens: int = 64,
  temperature: float = 0.8,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  notes=None,
) -> list[str]:
  """The completion (text after the prompt, up to EOS) of each prompt, sampled in one batch.

  A prompt longer than the context leaves room for is cut from the left (a line on `notes`, default stderr).
  """
  if max_new_tokens < 1 or max_new_tokens > cfg.max_len - 1:
    raise ValueError(f'max_new_tokens must be in [1, {cfg.max_len - 1}] (the context is {cfg.max_len} tokens)')
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f'need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}')
  notes = notes or sys.stderr
  room = cfg.max_len - 1 - max_new_tokens
  encoded = []
  for i, ids in enumerate(tokenizer.encode_batch(prompts)):
    if len(ids) > room:
      print(
        f'note: prompt {i} has {len(ids)} tokens; kept its last {room} (context {cfg.max_len} = BOS + prompt + '
        f'{max_new_tokens} new tokens)',
        file=notes,
      )
      ids = ids[len(ids) - room :] if room else []
    encoded.append(ids)
  longest = max((len(ids) for ids in encoded), default=0)
  length = 1 + longest + max_new_tokens
  rows = -(-len(prompts) // 8) * 8  # a multiple of 8: a batch every mesh of up to 8 batch shards can split
  seq = np.full((rows, length), PAD_ID, np.int32)
  seq[:, 0] = BOS_ID
  lengths = np.zeros(rows, np.int32)
  for i, ids in enumerate(encoded):
    seq[i, 1 : 1 + len(ids)] = ids
    lengths[i] = len(ids)
  out = np.asarray(
    jax.device_get(
      generate_ids(
        params,
        jnp.asarray(seq),
        jnp.asarray(lengths),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(max_new_tokens),
        cfg=cfg,
        top_k=int(top_k),
      )
    )
  )
  return [tokenizer.decode(out[i, 1 + lengths[i] :]) for i in range(len(prompts))]
