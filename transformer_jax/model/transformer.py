"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), section 3, in Flax Linen.

Reads top to bottom: positional encoding -> attention -> feed-forward -> encoder/decoder layers -> encoder,
decoder -> Transformer. Every parameter carries logical axis names (MaxText style) so that sharding is a
config change (see parallel.py), never a model change.

Shapes: B batch, S source length, T target length, D d_model, H heads, K head dim (D // H), F d_ff, V vocab.
Packed batches carry `*_segmentation` (0 = padding, 1.. = example within the row) and `*_position`
(restarts at 0 per example); unpacked batches may leave them out.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer_jax.model import attention as attention_lib
from transformer_jax.model import quantize as quantize_lib
from transformer_jax.model.attention import MaskSpec

# ModelConfig and the choices it names live in model_config.py; imported from here by the rest of the package too.
from transformer_jax.model.config import ACTIVATIONS, LAYER_NORM_EPSILON, ModelConfig, compute_dtype  # noqa: F401
from transformer_jax.model.vocab import DEFAULT_SPECIAL_IDS


def _param_init(init: Callable, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


def constrain(x, names):
  """Logical sharding hint for a large activation; a no-op outside a mesh with rules."""
  return nn.with_logical_constraint(x, names)


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
  """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...): interleaved, as in section 3.5."""
  position = np.arange(max_len)[:, None]
  div = np.exp(np.arange(0, d_model, 2) * -(np.log(10000.0) / d_model))
  table = np.zeros((max_len, d_model), dtype=np.float32)
  table[:, 0::2] = np.sin(position * div)
  table[:, 1::2] = np.cos(position * div)
  return table


class PositionalEncoding(nn.Module):
  """Adds position information; `positions` [B, L] restart per packed segment."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions):  # x [B, L, D]
    cfg = self.cfg
    if cfg.positional == 'learned':
      table = self.param(
        'pos_embedding', _param_init(nn.initializers.normal(0.02), (None, 'embed')), (cfg.max_len, cfg.d_model)
      )
    else:
      table = jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model))
    # 'clip': padding slots past max_len must not read NaN (jnp.take's default fill for out-of-range indices).
    return x + jnp.take(table, positions, axis=0, mode='clip').astype(x.dtype)


class HeadProjection(nn.Module):
  """A projection to or from heads, kernel [D, H, K] or [H, K, D] (nn.DenseGeneral would initialise a
  flattened 2-D kernel, which logical partitioning cannot annotate); bias-free unless use_bias (over the output
  axes: [H, K] or [D])."""

  shape: tuple[int, ...]
  names: tuple[str, ...]
  equation: str
  in_axis: Any = 0
  out_axis: Any = -1
  dtype: Any = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.xavier_uniform(in_axis=self.in_axis, out_axis=self.out_axis)
    kernel = self.param('kernel', _param_init(init, self.names), self.shape, jnp.float32)
    if kernel.dtype == jnp.int8:  # quantize.int8_params: int8 compute; contracts x's last len(in axes) axes
      contracting = len(self.in_axis) if isinstance(self.in_axis, tuple) else 1
      y = quantize_lib.int8_matmul(x, kernel, self._scale(), contracting=contracting)
    else:
      y = attention_lib.einsum_f32(self.equation, x, kernel, self.dtype)
    if self.use_bias:
      out = tuple(range(len(self.shape)))[self.out_axis] if isinstance(self.out_axis, int) else self.out_axis
      out = (out,) if isinstance(out, int) else tuple(out)
      bias = self.param(
        'bias',
        _param_init(nn.initializers.zeros, tuple(self.names[a] for a in out)),
        tuple(self.shape[a] for a in out),
        jnp.float32,
      )
      y = y + bias  # in float32, before the rounding: the bias gradient is a float32 sum over tokens
    return y.astype(self.dtype)

  def _scale(self):
    return self.get_variable('params', 'kernel' + quantize_lib.SCALE_SUFFIX)


class Dense(nn.Module):
  """x [B, L, D] -> [B, L, features]: nn.Dense's parameters (kernel [D, features], bias), its products through
  einsum_f32 (compute-dtype operands, float32 accumulation, forward and backward)."""

  features: int
  names: tuple[str, str]  # the kernel's logical axes; the bias takes the second
  dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      'kernel', _param_init(nn.initializers.xavier_uniform(), self.names), (x.shape[-1], self.features), jnp.float32
    )
    if kernel.dtype == jnp.int8:  # quantize.int8_params: int8 compute
      y = quantize_lib.int8_matmul(x, kernel, self.get_variable('params', 'kernel' + quantize_lib.SCALE_SUFFIX))
    else:
      y = attention_lib.einsum_f32('bld,df->blf', x, kernel, self.dtype)
    if self.use_bias:
      y = y + self.param('bias', _param_init(nn.initializers.zeros, self.names[1:]), (self.features,), jnp.float32)
    return y.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""

  cfg: ModelConfig
  self_attention_cache: bool = False  # decoder self-attention: append this step's key/value to the cache
  cross_attention_cache: bool = False  # encoder-decoder attention: keys/values from the encoder, computed once

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask):  # inputs_q [B, T, D], inputs_kv [B, S, D]
    # mask: a MaskSpec (attention.py), or in decoding a boolean [B, 1, T, S] (or None at cache creation)
    cfg = self.cfg
    head_dim = cfg.d_model // cfg.num_heads
    # No key bias even with use_bias: q.(k + b) adds the same q.b to every key's logit, which softmax ignores (its
    # gradient is 0, so Adam would only amplify rounding noise into it); GPT-2's key bias imports as exactly nothing.
    projection = lambda name: HeadProjection(
      (cfg.d_model, cfg.num_heads, head_dim),
      ('embed', 'heads', 'kv'),
      'btd,dhk->bthk',
      in_axis=0,
      out_axis=(1, 2),
      dtype=cfg.dtype,
      use_bias=cfg.use_bias and name != 'key',
      name=name,
    )
    query = projection('query')(inputs_q)  # [B, T, H, K]

    if cfg.decode and self.cross_attention_cache and self.has_variable('cache', 'cross_key'):
      if query.shape[1] != 1:
        raise ValueError(f'incremental decoding takes one position at a time, got {query.shape[1]}')
      key = self.get_variable('cache', 'cross_key')  # [B, H, S, K]
      value = self.get_variable('cache', 'cross_value')
    else:
      key = projection('key')(inputs_kv)  # [B, S, H, K]
      value = projection('value')(inputs_kv)
      if cfg.decode and self.cross_attention_cache:
        self.put_variable('cache', 'cross_key', jnp.swapaxes(key, 1, 2))  # [B, H, S, K]: see single_query_attention
        self.put_variable('cache', 'cross_value', jnp.swapaxes(value, 1, 2))

    if cfg.decode and self.self_attention_cache:
      key, value, mask = self._update_cache(key, value, mask)

    query = constrain(query, ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv'))
    x, weights = attention_lib.attention(query, key, value, mask, cfg)  # [B, T, H, K]
    if weights is not None:
      self.sow('intermediates', 'attention_weights', weights)  # [B, H, T, S]: attention_maps.py
    out = HeadProjection(
      (cfg.num_heads, head_dim, cfg.d_model),
      ('heads', 'kv', 'embed'),
      'bthk,hkd->btd',
      in_axis=(0, 1),
      out_axis=2,
      dtype=cfg.dtype,
      use_bias=cfg.use_bias,
      name='out',
    )(x)
    return out  # [B, T, D]

  def _update_cache(self, key, value, mask):
    """Writes one step's key/value at cache_index; attends to positions <= cache_index.

    The cache is [B, H, L, K] (see attention.single_query_attention), L the creation pass's length. The first call
    (cache creation, see decode.py) runs the full-length forward pass and only sizes the cache. With a window W it is
    a ring buffer of min(W, L) slots, position p in slot p % W: it always holds the W latest positions, which is
    exactly the window, and their order does not matter (positions are in the keys already).
    """
    initialized = self.has_variable('cache', 'cached_key')
    batch, max_len, heads, head_dim = key.shape
    if self.cfg.attention_window:
      max_len = min(max_len, self.cfg.attention_window)
    stored = key.dtype if self.cfg.kv_cache_dtype == 'auto' else jnp.dtype(self.cfg.kv_cache_dtype)
    quantized = stored == jnp.int8
    caches = []
    for name in ('cached_key', 'cached_value'):
      cached = self.variable('cache', name, jnp.zeros, (batch, heads, max_len, head_dim), stored)
      scale = None  # int8: one float32 scale per (token, head)
      if quantized:
        scale = self.variable('cache', f'{name}_scale', jnp.zeros, (batch, heads, max_len, 1), jnp.float32)
      caches.append((cached, scale))
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, dtype=jnp.int32))
    if not initialized:
      return key, value, mask
    if key.shape[1] != 1:
      raise ValueError(f'incremental decoding takes one position at a time, got {key.shape[1]}')
    max_len = caches[0][0].value.shape[2]
    index = cache_index.value
    slot = index % max_len if self.cfg.attention_window else index
    read = []
    for (cached, scale), new in zip(caches, (key, value)):
      new = jnp.swapaxes(new, 1, 2)  # [B, H, 1, K]
      if quantized:
        new, new_scale = quantize_lib.quantize_rows(new)
        scale.value = jax.lax.dynamic_update_slice(scale.value, new_scale, (0, 0, slot, 0))
      cached.value = jax.lax.dynamic_update_slice(cached.value, new.astype(stored), (0, 0, slot, 0))
      entries = cached.value.astype(jnp.float32) * scale.value if quantized else cached.value
      read.append(entries.astype(key.dtype))
    cache_index.value = index + 1
    step_mask = (jnp.arange(max_len) <= index)[None, None, None, :]  # [1, 1, 1, max_len]: the filled slots
    return read[0], read[1], jnp.broadcast_to(step_mask, (batch, 1, 1, max_len))


class FeedForward(nn.Module):
  """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (section 3.3)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # [B, L, D]
    cfg = self.cfg
    h = Dense(cfg.d_ff, ('embed', 'mlp'), cfg.dtype, name='wi')(x)
    h = ACTIVATIONS[cfg.activation](h)
    h = constrain(h, ('activation_batch', 'activation_length', 'activation_mlp'))  # [B, L, F]
    return Dense(cfg.d_model, ('mlp', 'embed'), cfg.dtype, name='wo')(h)


def layer_norm(cfg: ModelConfig, name: str):
  return nn.LayerNorm(
    epsilon=LAYER_NORM_EPSILON,
    dtype=cfg.dtype,
    param_dtype=jnp.float32,
    scale_init=_param_init(nn.initializers.ones, ('embed',)),
    bias_init=_param_init(nn.initializers.zeros, ('embed',)),
    name=name,
  )


def _residual(cfg: ModelConfig, x, sublayer: Callable, norm: nn.Module, dropout: nn.Module, deterministic: bool):
  if cfg.pre_norm:
    return x + dropout(sublayer(norm(x)), deterministic=deterministic)
  return norm(x + dropout(sublayer(x), deterministic=deterministic))


_ACTIVATION = ('activation_batch', 'activation_length', 'activation_embed')


class EncoderLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):  # x [B, S, D], mask a MaskSpec
    cfg = self.cfg
    dropout = nn.Dropout(cfg.dropout_rate)
    attention = MultiHeadAttention(cfg, name='self_attention')
    x = _residual(
      cfg, x, lambda y: attention(y, y, mask), layer_norm(cfg, 'self_attention_norm'), dropout, deterministic
    )
    x = _residual(
      cfg, x, FeedForward(cfg, name='feed_forward'), layer_norm(cfg, 'feed_forward_norm'), dropout, deterministic
    )
    return constrain(x, _ACTIVATION), None  # (carry, output) so nn.scan can stack layers


class DecoderLayer(nn.Module):
  """Masked self-attention, encoder-decoder attention, feed-forward; without an encoder (encoded None, the
  decoder-only language model) the encoder-decoder attention sub-layer is left out."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, y, encoded, self_mask, cross_mask, deterministic: bool):  # y [B, T, D], encoded [B, S, D]
    cfg = self.cfg
    dropout = nn.Dropout(cfg.dropout_rate)
    self_attention = MultiHeadAttention(cfg, self_attention_cache=True, name='self_attention')
    y = _residual(
      cfg, y, lambda z: self_attention(z, z, self_mask), layer_norm(cfg, 'self_attention_norm'), dropout, deterministic
    )
    if encoded is not None:
      cross_attention = MultiHeadAttention(cfg, cross_attention_cache=True, name='cross_attention')
      y = _residual(
        cfg,
        y,
        lambda z: cross_attention(z, encoded, cross_mask),
        layer_norm(cfg, 'cross_attention_norm'),
        dropout,
        deterministic,
      )
    y = _residual(
      cfg, y, FeedForward(cfg, name='feed_forward'), layer_norm(cfg, 'feed_forward_norm'), dropout, deterministic
    )
    return constrain(y, _ACTIVATION), None


def _remat(layer_cls, cfg: ModelConfig, static_argnums):
  if cfg.remat == 'none':
    return layer_cls
  policy = None if cfg.remat == 'full' else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers, static_argnums=static_argnums)


def _stack(layer_cls, cfg: ModelConfig, x, *args, deterministic: bool):
  """N identical layers, as a Python loop (layers_0..N-1) or one nn.scan (params stacked on a 'layers' axis)."""
  # static_argnums counts the module as argument 0.
  layer_cls = _remat(layer_cls, cfg, static_argnums=(len(args) + 2,))
  if cfg.scan_layers:
    # 'intermediates': sown attention weights (cfg.attention_weights) stacked on the layer axis.
    scanned = nn.scan(
      layer_cls,
      variable_axes={'params': 0, 'cache': 0, 'intermediates': 0},
      split_rngs={'params': True, 'dropout': True},
      in_axes=(nn.broadcast,) * (len(args) + 1),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    x, _ = scanned(cfg, name='layers')(x, *args, deterministic)
    return x
  for i in range(cfg.num_layers):
    x, _ = layer_cls(cfg, name=f'layers_{i}')(x, *args, deterministic)
  return x


def self_attention_mask(cfg: ModelConfig, segmentation, causal: bool) -> MaskSpec:
  """Within each packed example, windowed by model.attention_window (attention.py)."""
  return MaskSpec(segmentation, segmentation, causal=causal, window=cfg.attention_window)


def attention_mask(query_segmentation, key_segmentation, causal: bool = False):
  """[B, 1, Tq, Tk] boolean: attend only within the same packed example, never to padding (decoding's masks)."""
  mask = (query_segmentation[:, :, None] == key_segmentation[:, None, :]) & (key_segmentation[:, None, :] != 0)
  if causal:
    tq, tk = query_segmentation.shape[1], key_segmentation.shape[1]
    mask &= jnp.tril(jnp.ones((tq, tk), dtype=bool))[None]
  return mask[:, None]


def shift_right(
  targets, targets_position, *, bos_id: int = DEFAULT_SPECIAL_IDS.bos, pad_id: int = DEFAULT_SPECIAL_IDS.pad
):
  """Decoder inputs: BOS at the start of EVERY packed example (not the previous example's EOS), then targets[:-1]."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=pad_id)[:, :-1]
  shifted = jnp.where(targets_position == 0, bos_id, shifted)
  return jnp.where(targets == pad_id, pad_id, shifted)


def _default_segmentation(tokens, pad_id: int):
  return (tokens != pad_id).astype(jnp.int32)


def _default_positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Embedder(nn.Module):
  """Token embedding scaled by sqrt(D) (section 3.4); `attend` is the pre-softmax projection with the same matrix."""

  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param(
      'embedding',
      _param_init(nn.initializers.normal(stddev=self.cfg.d_model**-0.5), ('vocab', 'embed')),
      (self.cfg.vocab_size, self.cfg.d_model),
      jnp.float32,
    )

  def _scale(self):  # [V, 1]: the per-token scale of int8 embeddings (quantize.int8_params)
    return self.get_variable('params', 'embedding' + quantize_lib.SCALE_SUFFIX)

  def __call__(self, tokens):  # [B, L] -> [B, L, D]
    x = jnp.take(self.embedding, tokens, axis=0)
    if x.dtype == jnp.int8:
      x = x.astype(jnp.float32) * jnp.take(self._scale(), tokens, axis=0)
    x = x.astype(self.cfg.dtype)
    if not self.cfg.scale_embeddings:
      return x
    return x * jnp.sqrt(self.cfg.d_model).astype(self.cfg.dtype)

  def attend(self, x):  # [B, L, D] -> [B, L, V]
    if self.embedding.dtype == jnp.int8:
      return quantize_lib.int8_matmul(x, self.embedding, self._scale(), transposed=True).astype(self.cfg.dtype)
    return attention_lib.einsum_f32('bld,vd->blv', x, self.embedding, self.cfg.dtype).astype(self.cfg.dtype)


class Encoder(nn.Module):
  cfg: ModelConfig
  embedder: Embedder

  @nn.compact
  def __call__(self, inputs, inputs_segmentation, inputs_position, deterministic: bool):
    cfg = self.cfg
    x = self.embedder(inputs)  # [B, S, D]
    x = PositionalEncoding(cfg, name='positional')(x, inputs_position)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x, _ACTIVATION)
    mask = self_attention_mask(cfg, inputs_segmentation, causal=False)
    x = _stack(EncoderLayer, cfg, x, mask, deterministic=deterministic)
    if cfg.pre_norm:
      x = layer_norm(cfg, 'final_norm')(x)
    return x


class Decoder(nn.Module):
  cfg: ModelConfig
  embedder: Embedder
  output_projection: nn.Module | None = None  # None: the shared embedding's transpose

  @nn.compact
  def __call__(self, decoder_inputs, targets_position, self_mask, encoded, cross_mask, deterministic: bool):
    cfg = self.cfg
    if cfg.decode:
      # One position per call: its index is the number of positions decoded so far.
      index = self.variable('cache', 'position_index', lambda: jnp.array(0, dtype=jnp.int32))
      if self.is_initializing() or decoder_inputs.shape[1] != 1:
        pass  # cache creation: full-length pass with the given positions
      else:
        targets_position = jnp.broadcast_to(index.value, decoder_inputs.shape)
        index.value = index.value + 1
    y = self.embedder(decoder_inputs)  # [B, T, D]
    y = PositionalEncoding(cfg, name='positional')(y, targets_position)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    y = constrain(y, _ACTIVATION)
    y = _stack(DecoderLayer, cfg, y, encoded, self_mask, cross_mask, deterministic=deterministic)
    if cfg.pre_norm:
      y = layer_norm(cfg, 'final_norm')(y)
    if self.output_projection is None:
      logits = self.embedder.attend(y)
    else:
      logits = self.output_projection(y)
    if cfg.final_logits_bias:
      bias = self.param(
        'final_logits_bias', _param_init(nn.initializers.zeros, ('vocab',)), (cfg.vocab_size,), jnp.float32
      )
      logits = logits + bias.astype(logits.dtype)
    # In the compute dtype: [tokens, V] is the largest activation, and a float32 copy would double its memory traffic;
    # the loss and the decoders compute in float32 from it (the values are the same: the bfloat16 matmul rounds).
    return constrain(logits, ('activation_batch', 'activation_length', 'activation_vocab'))


class Transformer(nn.Module):
  """Encoder-decoder. __call__ gives logits [B, T, V] for teacher-forced targets; encode/decode for inference."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    if cfg.share_embeddings:
      source_embedder = target_embedder = Embedder(cfg, name='shared_embedding')
      projection = None
    else:
      source_embedder = Embedder(cfg, name='source_embedding')
      target_embedder = Embedder(cfg, name='target_embedding')
      projection = Dense(cfg.vocab_size, ('embed', 'vocab'), cfg.dtype, use_bias=False, name='output_projection')
    self.encoder = Encoder(cfg, source_embedder, name='encoder')
    self.decoder = Decoder(cfg, target_embedder, projection, name='decoder')

  def encode(self, inputs, inputs_segmentation=None, inputs_position=None, deterministic: bool = True):
    if inputs_segmentation is None:
      inputs_segmentation = _default_segmentation(inputs, self.cfg.special_ids.pad)
    if inputs_position is None:
      inputs_position = _default_positions(inputs)
    return self.encoder(inputs, inputs_segmentation, inputs_position, deterministic)

  def decode(
    self,
    encoded,
    inputs_segmentation,
    decoder_inputs,
    targets_segmentation=None,
    targets_position=None,
    deterministic: bool = True,
  ):
    """Teacher-forced (full length) or, with cfg.decode, one position over the cache."""
    if targets_segmentation is None:
      targets_segmentation = (
        jnp.ones_like(decoder_inputs)
        if self.cfg.decode
        else _default_segmentation(decoder_inputs, self.cfg.special_ids.pad)
      )
    if targets_position is None:
      targets_position = _default_positions(decoder_inputs)
    if self.cfg.decode:
      self_mask = None  # the cache builds the causal mask itself
      cross_mask = attention_mask(jnp.ones_like(decoder_inputs), inputs_segmentation)
    else:
      self_mask = self_attention_mask(self.cfg, targets_segmentation, causal=True)
      cross_mask = MaskSpec(targets_segmentation, inputs_segmentation)  # never windowed
    return self.decoder(decoder_inputs, targets_position, self_mask, encoded, cross_mask, deterministic)

  def __call__(
    self,
    inputs,
    targets,
    inputs_segmentation=None,
    targets_segmentation=None,
    inputs_position=None,
    targets_position=None,
    deterministic: bool = True,
  ):
    pad_id = self.cfg.special_ids.pad
    if inputs_segmentation is None:
      inputs_segmentation = _default_segmentation(inputs, pad_id)
    if targets_segmentation is None:
      targets_segmentation = _default_segmentation(targets, pad_id)
    if targets_position is None:
      targets_position = _default_positions(targets)
    encoded = self.encode(inputs, inputs_segmentation, inputs_position, deterministic)
    decoder_inputs = shift_right(targets, targets_position, bos_id=self.cfg.special_ids.bos, pad_id=pad_id)
    return self.decode(
      encoded, inputs_segmentation, decoder_inputs, targets_segmentation, targets_position, deterministic
    )


class LanguageModel(nn.Module):
  """Decoder-only (model.kind='decoder'): the Decoder above without an encoder, its embedding tied to the output
  projection. Trained on `targets` (documents + EOS, packed: segmentation / positions restarting per document) with
  the same shift_right as the translation decoder, so every document starts from BOS and never sees another one.

  __call__ gives logits [B, T, V] predicting targets; with cfg.decode, one position per call over the cache.
  """

  cfg: ModelConfig

  def setup(self):
    self.embedder = Embedder(self.cfg, name='embedding')
    self.decoder = Decoder(self.cfg, self.embedder, None, name='decoder')

  def decode(self, decoder_inputs, targets_segmentation=None, targets_position=None, deterministic: bool = True):
    """Logits after each of decoder_inputs (BOS-started); with cfg.decode, one position over the cache."""
    if targets_position is None:
      targets_position = _default_positions(decoder_inputs)
    if self.cfg.decode:
      self_mask = None  # the cache builds the causal mask itself
    else:
      if targets_segmentation is None:
        targets_segmentation = _default_segmentation(decoder_inputs, self.cfg.special_ids.pad)
      self_mask = self_attention_mask(self.cfg, targets_segmentation, causal=True)
    return self.decoder(decoder_inputs, targets_position, self_mask, None, None, deterministic)

  def __call__(self, targets, targets_segmentation=None, targets_position=None, deterministic: bool = True):
    pad_id = self.cfg.special_ids.pad
    if targets_segmentation is None:
      targets_segmentation = _default_segmentation(targets, pad_id)
    if targets_position is None:
      targets_position = _default_positions(targets)
    decoder_inputs = shift_right(targets, targets_position, bos_id=self.cfg.special_ids.bos, pad_id=pad_id)
    return self.decode(decoder_inputs, targets_segmentation, targets_position, deterministic)


def build_model(cfg: ModelConfig) -> nn.Module:
  """The module for cfg.kind: Transformer (encoder-decoder) or LanguageModel (decoder only)."""
  return LanguageModel(cfg) if cfg.kind == 'decoder' else Transformer(cfg)
