"""Post-training weight quantization of a parameter tree: per-output-channel symmetric int8, and bfloat16.

Which leaves: every matmul kernel (`kernel` of nn.Dense and model.HeadProjection: the feed-forward, the attention
projections and an untied output projection) and, with `embeddings=True`, the embedding tables (the tied output
projection is the embedding's transpose; each row is one output channel of it). Layer norms, biases, positions and
final_logits_bias stay float32: they are a small fraction of the bytes and sensitive to rounding.

The output channels of a kernel are its output axes: [D, F] and [F, D] Dense kernels quantize per column; the
[D, H, K] query/key/value kernels per (head, head-dim) pair; the [H, K, D] attention output per model feature.
Each channel gets scale = max|w| / 127 and w ~ scale * round(w / scale), so the error of every weight is at most
scale / 2 (the property tests check exactly this bound).

Two uses:
- `quantize_params(params)` -> QuantizedTree of int8 values + float32 scales (4x smaller than float32), and
  `dequantize_params` back to float32: a stored or shipped model, and the weights an int8 kernel consumes;
- `fake_quantize(params)` -> float32 params holding exactly the int8-representable values, which the unchanged model
  runs: the quality of int8 weights, measured with today's decoders (not their speed).
`decoding_params(params, quantize, weights_dtype)` is what translate / evaluate / generate run with --quantize and
--weights_dtype (sharding kept).
`int8_matmul(x, q, scale)` is the compute the speed comes from: activations quantized per row on the fly,
int8 x int8 -> int32 (`preferred_element_type`, which XLA:CPU lowers to its VNNI/AMX int8 kernels), rescaled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX = 127.0


def _input_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
  """The contracted (input) axes of a kernel from its place in the tree: the attention output [H, K, D] contracts
  heads and head dims; every other kernel ([D, F], [D, H, K], [D, V]) its first axis."""
  if len(path) >= 2 and path[-2] == 'out' and ndim == 3:
    return (0, 1)
  return (0,)


def quantize_array(w, input_axes: tuple[int, ...] = (0,)):
  """w (float) -> (q int8 of w's shape, scale float32 with the input axes kept as size 1), w ~ q * scale."""
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=input_axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)  # an all-zero channel stays exactly zero
  q = jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return q, scale


def dequantize_array(q, scale, dtype=jnp.float32):
  return (q.astype(jnp.float32) * scale).astype(dtype)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, 'key', getattr(p, 'name', p))) for p in path)


def _selected(names: tuple[str, ...], x, embeddings: bool) -> bool:
  leaf = names[-1] if names else ''
  if getattr(x, 'ndim', 0) < 2:
    return False
  if leaf == 'kernel':
    return True
  return embeddings and leaf == 'embedding'


def _channel_axes(names: tuple[str, ...], x) -> tuple[int, ...]:
  if names[-1] == 'embedding':  # [V, D]: one scale per token row (the rows are the output channels of the logits)
    return (1,)
  return _input_axes(names, x.ndim)


class QuantizedTree(dict):
  """{'values': tree with int8 leaves where quantized, 'scales': tree of float32 scales (None elsewhere)}."""


def quantize_params(params, *, embeddings: bool = True) -> QuantizedTree:
  """The parameter tree with every selected leaf as int8 values + per-output-channel float32 scales."""

  def values(path, x):
    names = _path_names(path)
    return quantize_array(x, _channel_axes(names, x))[0] if _selected(names, x, embeddings) else x

  def scales(path, x):
    names = _path_names(path)
    return quantize_array(x, _channel_axes(names, x))[1] if _selected(names, x, embeddings) else None

  return QuantizedTree(
    values=jax.tree_util.tree_map_with_path(values, params), scales=jax.tree_util.tree_map_with_path(scales, params)
  )


def dequantize_params(quantized: QuantizedTree, dtype=jnp.float32):
  """float parameters (dtype) from quantize_params' values and scales."""
  return jax.tree.map(
    lambda q, s: dequantize_array(q, s, dtype) if s is not None else q,
    quantized['values'],
    quantized['scales'],
    is_leaf=lambda x: x is None,
  )


def fake_quantize(params, *, embeddings: bool = True):
  """float32 parameters rounded to their int8 grid: what int8 weights compute, run by the unchanged model."""
  return dequantize_params(quantize_params(params, embeddings=embeddings))


def cast_params(params, dtype: Any = jnp.bfloat16, *, embeddings: bool = True):
  """The selected leaves cast to `dtype` (bfloat16 weights: half the bytes); the rest stay as they are."""

  def cast(path, x):
    return jnp.asarray(x).astype(dtype) if _selected(_path_names(path), x, embeddings) else x

  return jax.tree_util.tree_map_with_path(cast, params)


QUANTIZE_CHOICES = ('none', 'int8')
WEIGHTS_DTYPES = ('float32', 'bfloat16')


def decoding_params(params, quantize: str = 'none', weights_dtype: str = 'float32'):
  """The parameters a decoder runs with: quantize='int8' puts every selected leaf on its int8 grid,
  weights_dtype='bfloat16' stores the selected leaves in bfloat16 (with int8: the int8 weights dequantized to
  bfloat16, as a weight-only int8 kernel feeding bfloat16 matmuls would see them). Other leaves are unchanged; each
  leaf keeps its sharding."""
  if quantize not in QUANTIZE_CHOICES:
    raise ValueError(f'quantize={quantize!r}: expected one of {", ".join(QUANTIZE_CHOICES)}')
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f'weights_dtype={weights_dtype!r}: expected one of {", ".join(WEIGHTS_DTYPES)}')
  if quantize == 'none' and weights_dtype == 'float32':
    return params
  dtype = jnp.dtype(weights_dtype)

  def transform(tree):
    if quantize == 'int8':
      return dequantize_params(quantize_params(tree), dtype)
    return cast_params(tree, dtype)

  leaves = jax.tree.leaves(params)
  if leaves and all(isinstance(x, jax.Array) for x in leaves):  # restored onto a mesh: the result stays there
    return jax.jit(transform, out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)
  return transform(params)


def weight_bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree) if x is not None))


def int8_matmul(x, q, scale):
  """x [..., D] float @ q [D, N] int8 with scale [1, N] -> [..., N] float32.

  x is quantized per row (its own max|x| / 127, so no calibration data is needed), the product is int8 x int8
  accumulated in int32 (exact: D * 127^2 < 2^31 for D < 133,000), then scaled back by both scales."""
  x = jnp.asarray(x, jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  x_scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
  xq = jnp.clip(jnp.round(x / x_scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  acc = jax.lax.dot_general(xq, q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * x_scale * scale.reshape((1,) * (x.ndim - 1) + (-1,))
