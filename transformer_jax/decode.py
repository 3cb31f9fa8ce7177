"""Inference over the decode cache: the encoder runs once per batch, the decoder one position per step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer_jax.model import ModelConfig, Transformer


def decoding_model(cfg: ModelConfig) -> Transformer:
  return Transformer(ModelConfig(**{**cfg.__dict__, 'decode': True, 'dropout_rate': 0.0}))


def init_cache(model: Transformer, params, encoded, inputs_segmentation, max_decode_len: int):
  """Creates the cache: self-attention keys/values sized [B, max_decode_len, H, K], cross keys/values filled."""
  batch = encoded.shape[0]
  dummy = jnp.full((batch, max_decode_len), BOS_ID, jnp.int32)
  _, variables = model.apply({'params': params}, encoded, inputs_segmentation, dummy, method=Transformer.decode,
                             mutable=['cache'])
  return variables['cache']


def decode_step(model: Transformer, params, cache, encoded, inputs_segmentation, tokens):
  """tokens [B] (the previous output) -> (log-probabilities [B, V], new cache)."""
  logits, variables = model.apply({'params': params, 'cache': cache}, encoded, inputs_segmentation, tokens[:, None],
                                  method=Transformer.decode, mutable=['cache'])
  return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), variables['cache']


@functools.partial(jax.jit, static_argnames=('cfg', 'max_decode_len'))
def greedy_decode(params, inputs, *, cfg: ModelConfig, max_decode_len: int):
  """inputs [B, S] (EOS-terminated, PAD-padded) -> tokens [B, max_decode_len], PAD after the first EOS."""
  model = decoding_model(cfg)
  inputs_segmentation = (inputs != PAD_ID).astype(jnp.int32)
  encoded = model.apply({'params': params}, inputs, inputs_segmentation, method=Transformer.encode)
  cache = init_cache(model, params, encoded, inputs_segmentation, max_decode_len)
  batch = inputs.shape[0]

  def cond(carry):
    i, _, _, _, finished = carry
    return (i < max_decode_len) & ~jnp.all(finished)

  def body(carry):
    i, cache, out, previous, finished = carry
    log_probs, cache = decode_step(model, params, cache, encoded, inputs_segmentation, previous)
    token = jnp.where(finished, PAD_ID, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))
    out = out.at[:, i].set(token)
    return i + 1, cache, out, token, finished | (token == EOS_ID)

  init = (jnp.array(0), cache, jnp.full((batch, max_decode_len), PAD_ID, jnp.int32),
          jnp.full((batch,), BOS_ID, jnp.int32), jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, init)[2]
