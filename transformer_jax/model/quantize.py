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
  runs: the quality of int8 weights, evaluated with the float decoders as they are (not their speed).
- `int8_params(params)` -> the model's own tree with int8 kernels / embeddings and a float32 `<name>_scale` beside
  each: the model (transformer.Dense, HeadProjection, Embedder) sees the int8 dtype and multiplies in int8.
`decoding_params(params, quantize, weights_dtype)` is what translate / evaluate / generate run with --quantize and
--weights_dtype (sharding kept).
`int8_matmul(x, q, scale)` is the compute the speed comes from: activations quantized per row on the fly (dynamic
symmetric int8, one scale per token), int8 x int8 -> int32 (`preferred_element_type`, which XLA:CPU lowers to its
VNNI/AMX int8 kernels), rescaled in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX = 127.0


def _layer_axes(path: tuple[str, ...]) -> int:
  """1 for a leaf of nn.scan's stacked layers (scan_layers: a leading [layers] axis), else 0."""
  return int('layers' in path)


def _input_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
  """The contracted (input) axes of a kernel from its place in the tree: the attention output [H, K, D] contracts
  heads and head dims; every other kernel ([D, F], [D, H, K], [D, V]) its first axis. Stacked layers shift both."""
  stacked = _layer_axes(path)
  if len(path) >= 2 and path[-2] == 'out' and ndim - stacked == 3:
    return (stacked, stacked + 1)
  return (stacked,)


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
    return (x.ndim - 1,)
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


SCALE_SUFFIX = '_scale'  # int8_params: 'kernel' int8 + 'kernel_scale', 'embedding' int8 + 'embedding_scale'


def int8_params(params):
  """The parameter tree the model multiplies in int8: every selected leaf int8, with its float32 per-output-channel
  scale beside it under `<name>_scale` (the scale keeps the input axes as size 1). Other leaves are unchanged."""

  def walk(tree, names):
    if not isinstance(tree, Mapping):
      return tree
    out = {}
    for key, x in tree.items():
      path = (*names, str(key))
      if not isinstance(x, Mapping) and _selected(path, x, embeddings=True):
        out[key], out[f'{key}{SCALE_SUFFIX}'] = quantize_array(x, _channel_axes(path, x))
      else:
        out[key] = walk(x, path)
    return out

  return walk(params, ())


QUANTIZE_CHOICES = ('none', 'int8')
WEIGHTS_DTYPES = ('float32', 'bfloat16')


def decoding_params(params, quantize: str = 'none', weights_dtype: str = 'float32'):
  """The parameters a decoder runs with. quantize='int8': int8_params (int8 kernels and embeddings with their
  scales; the model multiplies them in int8 with activations quantized per token). weights_dtype='bfloat16': the
  selected leaves stored in bfloat16; with int8, the int8 weights dequantized to bfloat16 instead (weight-only
  int8, as a kernel feeding bfloat16 matmuls would see them: quality, no int8 compute). Other leaves are unchanged;
  each leaf keeps its sharding (scales: replicated)."""
  if quantize not in QUANTIZE_CHOICES:
    raise ValueError(f'quantize={quantize!r}: expected one of {", ".join(QUANTIZE_CHOICES)}')
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f'weights_dtype={weights_dtype!r}: expected one of {", ".join(WEIGHTS_DTYPES)}')
  if quantize == 'none' and weights_dtype == 'float32':
    return params
  dtype = jnp.dtype(weights_dtype)

  def transform(tree):
    if quantize == 'int8' and weights_dtype == 'float32':
      return int8_params(tree)
    if quantize == 'int8':
      return dequantize_params(quantize_params(tree), dtype)
    return cast_params(tree, dtype)

  leaves = jax.tree.leaves(params)
  if leaves and all(isinstance(x, jax.Array) for x in leaves):  # restored onto a mesh: the result stays there
    shardings = _out_shardings(params, jax.eval_shape(transform, params))
    return jax.jit(transform, out_shardings=shardings)(params)
  return transform(params)


def _out_shardings(params, shapes):
  """Each output leaf on its input leaf's sharding; a new scale leaf replicated over that leaf's devices."""
  given = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_leaves_with_path(params)}

  def sharding(path, _):
    name = jax.tree_util.keystr(path)
    if name in given:
      return given[name]
    source = given[name.replace(f"{SCALE_SUFFIX}']", "']")]
    if isinstance(source, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(source.mesh, jax.sharding.PartitionSpec())
    return source

  return jax.tree_util.tree_map_with_path(sharding, shapes)


def weight_bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree) if x is not None))


def int8_matmul(x, q, scale, *, contracting: int = 1, transposed: bool = False):
  """x [..., *I] float @ q [*I, *O] int8 with scale [1.., *O] -> [..., *O] float32: the first `contracting` axes
  of q meet the last `contracting` axes of x. transposed: q [O, I] with scale [O, 1] (the embedding as the output
  projection: its rows are the output channels), contracting x's last axis with q's last.

  x is quantized per row over all its contracted features (its own max|x| / 127: no calibration data), the product
  is int8 x int8 accumulated in int32 (exact: I * 127^2 < 2^31 for I < 133,000), then scaled back by both scales
  in float32."""
  if transposed:
    in_shape, out_shape = q.shape[1:], q.shape[:1]
    q2, dims = q.reshape(q.shape[0], -1), (((1,), (1,)), ((), ()))
  else:
    in_shape, out_shape = q.shape[:contracting], q.shape[contracting:]
    q2, dims = q.reshape(int(np.prod(in_shape)), -1), (((1,), (0,)), ((), ()))
  lead = x.shape[: x.ndim - len(in_shape)]
  xq, x_scale = quantize_rows(x.reshape(-1, int(np.prod(in_shape))))
  acc = jax.lax.dot_general(xq, q2, dims, preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * x_scale * scale.reshape(1, -1).astype(jnp.float32)
  return y.reshape(*lead, *out_shape)


def quantize_rows(x):
  """x [..., N] -> (int8 [..., N], float32 scale [..., 1]): each row symmetric on its own max|x| / 127 (dynamic
  quantization of activations and of the decode cache's keys/values; an all-zero row stays zero)."""
  x = jnp.asarray(x, jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
  return jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale
