"""Attention kernels and THE dispatch on `model.attention` (`attention()`, which the model's MultiHeadAttention
calls for every attention it computes: teacher-forced, cached decoding steps and attention maps).

model.attention, one switch:

  auto       splash on a TPU when every length fills whole splash blocks (no padding: see block_for), dense
             otherwise and on every other platform. It never picks blockwise: a length too long for dense is a
             memory budget, which the config names (model.attention='blockwise'), not something to guess.
  dense      jax.nn.dot_product_attention's XLA path over a boolean [B, 1, T, S] mask built from the description
             below: O(T S) memory. In a compute dtype below float32, dense_attention: the same function with its
             products, backward included, on that dtype's operands.
  cudnn      the same dense attention through jax.nn.dot_product_attention's cuDNN kernel (GPU, bfloat16/float16).
  blockwise  exact attention in plain JAX (any device): an online softmax over key blocks (Rabe & Staats 2021;
             FlashAttention's recurrence) under a custom VJP whose backward pass recomputes each block, so what is
             kept between the passes is O(T) and a pass's temporaries O(T x block). Key blocks outside the causal or
             window band of a query block are never visited (their range is computed from the block indices);
             segment ids and padding are masked inside the visited blocks.
  splash     the TPU's Pallas splash kernel (jax.experimental.pallas.ops.tpu.splash_attention): SegmentIds for
             packing, CausalMask / LocalMask for the band. Off TPU it runs in Pallas interpret mode (exact, slow:
             tests); `train` refuses it there and the commands that read a workdir attend with blockwise instead
             (config_checks.py, inference/workdir.py).

config_checks.py is the one place the switch and its block are validated; the functions here trust their settings.
Cached decoding steps (one query over a [B, H, L, K] cache) run single_query_attention and attention maps
(model.attention_weights) explicit_attention_weights whatever the switch says: both need the weights themselves.

Blocks are model.attention_block_size (the whole sequence when shorter; splash: a multiple of 128). A length the block
does not divide is padded up to one it does (segment 0, so masked) and cut back: training configs must not need it
(config_checks.py refuses them: the padding is wasted work), inference lengths (a batch of sources) may.

Masks are described, not materialised: MaskSpec holds the query and key segment ids ([B, T], [B, S]; 0 = padding;
a query sees only keys of its own segment), whether attention is causal, and the window. Positions are the row
indices: packed segments are contiguous runs whose positions restart at 0, so inside a segment index order is
position order and i - j is the distance in positions (what splash's masks index by too).

Window W (model.attention_window; 0 = off): a causal query i sees keys i - W < j <= i (W keys, itself included), a
bidirectional one keys with |i - j| < W. Cross-attention is never windowed.

Fully masked query rows (padding) come out as 0 from blockwise and as anything from dense and splash: no loss reads
them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

KINDS = ('auto', 'dense', 'cudnn', 'blockwise', 'splash')  # model.attention's values
_NEG = -1e30  # a masked logit: finite, so max and exp never make NaN


@struct.dataclass
class MaskSpec:
  """Who may attend to whom, without a [B, 1, T, S] array."""

  q_segment: jax.Array  # [B, T] int; 0 = padding
  kv_segment: jax.Array  # [B, S] int
  causal: bool = struct.field(pytree_node=False, default=False)
  window: int = struct.field(pytree_node=False, default=0)

  def dense(self):
    """[B, 1, T, S] boolean, for the dense path."""
    t, s = self.q_segment.shape[1], self.kv_segment.shape[1]
    band = _band(jnp.arange(t)[:, None], jnp.arange(s)[None, :], self.causal, self.window)  # [T, S]
    same = _same_segment(self.q_segment, self.kv_segment)  # [B, T, S]
    return (same if band is None else same & band[None])[:, None]


def _same_segment(q_segment, kv_segment):  # [B, T], [B, S] -> [B, T, S]
  return (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)


def _band(q_index, kv_index, causal: bool, window: int):
  """Position part of the mask (broadcast of the two index arrays), or None when every pair is visible."""
  band = None
  if causal:
    band = q_index >= kv_index
  if window:
    near = (q_index - kv_index < window) & (kv_index - q_index < (1 if causal else window))
    band = near if band is None else band & near
  return band


def block_for(length: int, block_size: int, kind: str = 'blockwise') -> int:
  """The block used for a sequence of `length`: block_size, or the whole sequence when shorter (splash: rounded up
  to a multiple of 128, its lane width)."""
  if kind == 'splash':
    length = -(-length // 128) * 128
  return min(block_size, length)


def _pad_to(x, segment, block: int):
  """x [B, L, ...] and segment [B, L] padded (segment 0) to a multiple of block."""
  extra = -x.shape[1] % block
  if not extra:
    return x, segment
  return (jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)), jnp.pad(segment, [(0, 0), (0, extra)]))


def splash_fits(length: int, block_size: int) -> bool:
  """Whether splash runs `length` positions without padding: whole blocks of a multiple of 128 (its lane width)."""
  block = block_for(length, block_size, 'splash')
  return block % 128 == 0 and length % block == 0


def resolve(kind: str, platform: str, lengths: tuple[int, ...] = (), block_size: int = 512) -> str:
  """The kernel model.attention=`kind` runs on `platform` ('tpu', 'gpu', 'cpu') for query and key `lengths`: 'auto'
  is splash on a TPU when every length fills whole splash blocks, dense otherwise; the other kinds are themselves."""
  if kind != 'auto':
    return kind
  if platform.lower() == 'tpu' and lengths and all(splash_fits(n, block_size) for n in lengths):
    return 'splash'
  return 'dense'


def attention(query, key, value, mask, cfg):
  """THE dispatch: MultiHeadAttention's attention under ModelConfig `cfg` -> (output [B, T, H, K], weights).

  query [B, T, H, K]; key/value [B, S, H, K], or a decoding cache [B, H, L, K] with mask a boolean [B, 1, 1, L];
  mask a MaskSpec, a boolean [B, 1, T, S] (decoding) or None (cache creation). weights: [B, H, T, S] when
  cfg.attention_weights (attention maps, never while decoding), else None. model.attention picks the kernel
  (resolve: 'auto' for cfg.platform, default this process's backend); splash off TPU runs interpreted."""
  if cfg.decode and query.shape[1] == 1 and mask is not None:
    return single_query_attention(query, key, value, mask), None
  if cfg.attention_weights and not cfg.decode:
    weights = explicit_attention_weights(query, key, mask.dense() if isinstance(mask, MaskSpec) else mask)
    return jnp.einsum('bhts,bshk->bthk', weights.astype(value.dtype), value), weights
  platform = cfg.platform or jax.default_backend()
  kind = resolve(cfg.attention, platform, (query.shape[1], key.shape[1]), cfg.attention_block_size)
  out = attend(query, key, value, mask, kind=kind, block_size=cfg.attention_block_size, interpret=platform != 'tpu')
  return out, None


def attend(query, key, value, mask, *, kind: str = 'dense', block_size: int = 512, interpret: bool = False):
  """One kernel (`kind`: a KINDS value other than 'auto'): query [B, T, H, K], key/value [B, S, H, K], mask a
  MaskSpec, a boolean [B, 1, T, S] or None -> [B, T, H, K]. A boolean mask runs dense (the block kernels take a
  MaskSpec); interpret runs splash in Pallas interpret mode (off TPU)."""
  if kind in ('dense', 'cudnn') or not isinstance(mask, (MaskSpec, type(None))):
    if isinstance(mask, MaskSpec):
      mask = mask.dense()
    if kind == 'cudnn':
      return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation='cudnn')
    if query.dtype != jnp.float32:
      return dense_attention(query, key, value, mask)
    return jax.nn.dot_product_attention(query, key, value, mask=mask)
  if mask is None:
    ones = lambda n: jnp.ones((query.shape[0], n), jnp.int32)
    mask = MaskSpec(ones(query.shape[1]), ones(key.shape[1]))
  t = query.shape[1]
  bq, bk = block_for(t, block_size, kind), block_for(key.shape[1], block_size, kind)
  query, q_segment = _pad_to(query, mask.q_segment, bq)
  key, kv_segment = _pad_to(key, mask.kv_segment, bk)
  value, _ = _pad_to(value, mask.kv_segment, bk)
  mask = mask.replace(q_segment=q_segment, kv_segment=kv_segment)
  kernel = {'blockwise': blockwise_attention, 'splash': functools.partial(splash_attention, interpret=interpret)}
  return kernel[kind](query, key, value, mask, bq, bk)[:, :t]


# ---------------------------------------------------------------------------------------------------------------------
# matrix products in a low-precision compute dtype


def einsum_f32(equation: str, a, b, dtype):
  """einsum of a and b rounded to `dtype` (the compute dtype), accumulated and returned in float32; in its gradient
  too, every product takes `dtype` operands (the float32 cotangent is rounded to `dtype` first) and accumulates in
  float32, and each gradient comes back in its input's dtype (a float32 kernel's straight from the float32 sum).

  Why not jnp.einsum on bfloat16 operands: its product rounds to bfloat16 (XLA:CPU then computes it in float32 on
  converted copies, several times slower than a bfloat16 x bfloat16 -> float32 product), and the backward of a
  float32 result (attention logits) multiplies a float32 cotangent by a bfloat16 operand, which a TPU's MXU runs
  as several bfloat16 passes. The TPU accumulates in float32 either way.

  `equation`: two operands, explicit '->', no repeated or ellipsis indices, and every index of an operand appears
  in the other operand or the output (so each gradient is one einsum of the cotangent and the other operand).
  With dtype float32 it is plain jnp.einsum."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.einsum(equation, a.astype(dtype), b.astype(dtype))
  _check_equation(equation)
  return _einsum_f32(equation, dtype, jnp.dtype(a.dtype), jnp.dtype(b.dtype), a, b)


@functools.cache
def _check_equation(equation: str) -> None:
  inputs, _, out = equation.partition('->')
  parts = inputs.split(',')
  if not out or len(parts) != 2 or '.' in equation:
    raise ValueError(f'einsum_f32 takes two operands and an explicit output without ellipsis, got {equation!r}')
  sa, sb = parts
  for s, other in ((sa, sb + out), (sb, sa + out)):
    if len(set(s)) != len(s) or not set(s) <= set(other):
      raise ValueError(f'einsum_f32: {equation!r} has an index its gradient cannot form from the other operand')


def _matmul_f32(equation: str, a, b):
  """jnp.einsum(equation, a, b, preferred_element_type=float32). On CPU as a batched matrix product in the canonical
  form [batch, M, K] x [batch, K, N] (dimensions transposed and merged into it, behind an optimization barrier):
  XLA:CPU runs a bfloat16 x bfloat16 -> float32 product on bfloat16 operands (YNNPACK) only in that form with
  row-major layouts. Unmerged, XLA folds the transposes back into the product's dimension numbers or into the
  operands' layouts, and the product then runs on float32 copies or fails at run time (its fallback kernel refuses
  mixed types). Other platforms get the einsum: a TPU's layout assignment places the operands itself."""
  inputs, _, out = equation.partition('->')
  sa, sb = inputs.split(',')
  batch = [c for c in out if c in sa and c in sb]
  contracted = [c for c in sa if c in sb and c not in out]
  a_free, b_free = [c for c in sa if c not in sb], [c for c in sb if c not in sa]

  def canonical(a, b):
    size = lambda x, s, cs: math.prod(x.shape[s.index(c)] for c in cs)
    extent = {c: a.shape[i] for i, c in enumerate(sa)} | {c: b.shape[i] for i, c in enumerate(sb)}
    a3 = jnp.transpose(a, [sa.index(c) for c in batch + a_free + contracted]).reshape(
      size(a, sa, batch), size(a, sa, a_free), size(a, sa, contracted)
    )
    b3 = jnp.transpose(b, [sb.index(c) for c in batch + contracted + b_free]).reshape(
      size(b, sb, batch), size(b, sb, contracted), size(b, sb, b_free)
    )
    a3, b3 = jax.lax.optimization_barrier((a3, b3))
    y = jax.lax.dot_general(a3, b3, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    order = batch + a_free + b_free
    y = jax.lax.optimization_barrier(y).reshape([extent[c] for c in order])
    return jnp.transpose(y, [order.index(c) for c in out])

  def einsum(a, b):
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)

  return jax.lax.platform_dependent(a, b, cpu=canonical, default=einsum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _einsum_f32(equation, dtype, a_dtype, b_dtype, a, b):
  del a_dtype, b_dtype
  return _matmul_f32(equation, a.astype(dtype), b.astype(dtype))


def _einsum_f32_fwd(equation, dtype, a_dtype, b_dtype, a, b):
  del a_dtype, b_dtype
  a, b = a.astype(dtype), b.astype(dtype)  # the rounded operands are the residuals: half the bytes of float32
  return _matmul_f32(equation, a, b), (a, b)


def _einsum_f32_bwd(equation, dtype, a_dtype, b_dtype, residuals, grad):
  a, b = residuals
  inputs, _, out = equation.partition('->')
  sa, sb = inputs.split(',')
  grad = grad.astype(dtype)
  da = _matmul_f32(f'{out},{sb}->{sa}', grad, b)
  db = _matmul_f32(f'{sa},{out}->{sb}', a, grad)
  return da.astype(a_dtype), db.astype(b_dtype)


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def dense_attention(query, key, value, mask):
  """softmax(Q K^T / sqrt(K)) V as jax.nn.dot_product_attention's XLA path computes it (float32 logits, softmax and
  masking with the same finite fill), with both products through einsum_f32 in query's dtype: a bfloat16 model's
  attention, backward included, multiplies bfloat16 operands only. query [B, T, H, K], key/value [B, S, H, K],
  mask a boolean [B, 1, T, S] or None."""
  logits = einsum_f32('bthk,bshk->bhts', query, key, query.dtype) * jnp.float32(query.shape[-1] ** -0.5)
  if mask is not None:
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  weights = jax.nn.softmax(logits, axis=-1)
  return einsum_f32('bhts,bshk->bthk', weights, value, query.dtype).astype(query.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# decoding and attention maps (explicit weights)


def single_query_attention(query, key, value, mask):
  """One decoding step (T = 1) over a cache laid out [B, H, L, K] (heads before positions): both products are
  then matrix products batched over (B, H) that XLA:CPU runs without copying the cache. (A [B, L, H, K] cache would
  be transposed whole every step by jax.nn.dot_product_attention, and a multiply + reduce is several times slower
  than the batched products: benchmarks/RESULTS.md.) query [B, 1, H, K]; mask [B, 1, 1, L]."""
  q = query.astype(jnp.float32) * query.shape[-1] ** -0.5  # [B, 1, H, K]
  logits = jnp.einsum('bthk,bhlk->bhtl', q, key.astype(jnp.float32))  # [B, H, 1, L]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  x = jnp.einsum('bhtl,bhlk->bthk', weights, value.astype(jnp.float32))  # [B, 1, H, K]
  return x.astype(query.dtype)


def explicit_attention_weights(query, key, mask):
  """softmax(Q K^T / sqrt(K)) [B, H, T, S] as jax.nn.dot_product_attention's XLA path computes it (float32
  logits and softmax), with masked keys exactly 0 (also in fully masked padding rows, which the fused path fills
  with uniform weights; those rows are never read)."""
  logits = jnp.einsum('bthk,bshk->bhts', query, key, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(query.shape[-1] ** -0.5)
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  mask = jnp.broadcast_to(mask, logits.shape)
  weights = jax.nn.softmax(jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max), axis=-1)
  return jnp.where(mask, weights, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# blockwise


def blockwise_attention(query, key, value, mask: MaskSpec, bq: int, bk: int):
  """Exact softmax attention, one key block at a time (see the module doc). Shapes as `attend`; blocks of bq
  queries and bk keys dividing the lengths."""
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, L, K]: every block product is batched over (B, H)
  out = _blockwise(
    heads_first(query),
    heads_first(key),
    heads_first(value),
    mask.q_segment,
    mask.kv_segment,
    mask.causal,
    mask.window,
    bq,
    bk,
  )
  return heads_first(out)


def _key_blocks(i, bq: int, bk: int, num_kv_blocks: int, causal: bool, window: int):
  """[lo, hi): the key blocks query block i can see (from indices only)."""
  first, last = i * bq, (i + 1) * bq - 1  # its query rows
  lo, hi = 0, num_kv_blocks
  if causal:
    hi = jnp.minimum(hi, last // bk + 1)
  elif window:
    hi = jnp.minimum(hi, (last + window - 1) // bk + 1)
  if window:
    lo = jnp.maximum(0, (first - window + 1) // bk)
  return lo, hi


def _block(x, j, size: int, axis: int):
  return jax.lax.dynamic_slice_in_dim(x, j * size, size, axis=axis)


def _visible(q_seg, kv_seg, i, j, bq: int, bk: int, causal: bool, window: int):
  """[B, 1, bq, bk] mask of query block i against key block j."""
  same = _same_segment(q_seg, kv_seg)[:, None]
  band = _band(i * bq + jnp.arange(bq)[:, None], j * bk + jnp.arange(bk)[None, :], causal, window)
  return same if band is None else same & band


def _product(equation: str, x, y, dtype):
  """A block product with float32 result: on `dtype` operands (the inputs' dtype; bfloat16 rounds them, as the
  matrix units want) accumulated in float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(equation, x.astype(jnp.float32), y.astype(jnp.float32))
  return _matmul_f32(equation, x.astype(dtype), y.astype(dtype))


def _logits(q_blk, k_blk, dtype):  # q already scaled
  return _product('bhqk,bhsk->bhqs', q_blk, k_blk, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise(q, k, v, q_seg, kv_seg, causal, window, bq, bk):
  return _blockwise_fwd(q, k, v, q_seg, kv_seg, causal, window, bq, bk)[0]


def _blockwise_fwd(q, k, v, q_seg, kv_seg, causal, window, bq, bk):
  b, h, t, d = q.shape
  scale = d**-0.5
  num_kv_blocks = k.shape[2] // bk

  def query_block(i):
    q_blk = _block(q, i, bq, 2).astype(jnp.float32) * scale  # [B, H, bq, K]
    qs = _block(q_seg, i, bq, 1)

    def key_block(j, carry):
      m, l, acc = carry  # running max [B, H, bq], normaliser [B, H, bq], numerator [B, H, bq, K]
      visible = _visible(qs, _block(kv_seg, j, bk, 1), i, j, bq, bk, causal, window)
      s = jnp.where(visible, _logits(q_blk, _block(k, j, bk, 2), q.dtype), _NEG)  # [B, H, bq, bk]
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      acc = acc * correction[..., None] + _product('bhqs,bhsk->bhqk', p, _block(v, j, bk, 2), q.dtype)
      return m_new, l * correction + p.sum(-1), acc

    init = (jnp.full((b, h, bq), _NEG), jnp.zeros((b, h, bq)), jnp.zeros((b, h, bq, d)))
    m, l, acc = jax.lax.fori_loop(*_key_blocks(i, bq, bk, num_kv_blocks, causal, window), key_block, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)  # log-sum-exp of the row's logits
    return out, lse

  out, lse = jax.lax.map(query_block, jnp.arange(t // bq))  # [nq, B, H, bq, K], [nq, B, H, bq]
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, t, d)
  lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, t)
  out = out.astype(q.dtype)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _blockwise_bwd(causal, window, bq, bk, residuals, grad):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  b, h, t, d = q.shape
  scale = d**-0.5
  num_kv_blocks = k.shape[2] // bk
  dt = q.dtype  # the products' operand dtype, as in the forward pass
  grad = grad.astype(jnp.float32)
  delta = jnp.sum(grad * out.astype(jnp.float32), axis=-1)  # [B, H, T]: rowsum(dO * O)

  def query_block(carry, i):
    q_blk = _block(q, i, bq, 2).astype(jnp.float32)
    g_blk, lse_blk, delta_blk = _block(grad, i, bq, 2), _block(lse, i, bq, 2), _block(delta, i, bq, 2)
    qs = _block(q_seg, i, bq, 1)

    def key_block(j, carry):
      dq, dk, dv = carry
      k_blk, v_blk = _block(k, j, bk, 2), _block(v, j, bk, 2)
      visible = _visible(qs, _block(kv_seg, j, bk, 1), i, j, bq, bk, causal, window)
      p = jnp.where(visible, jnp.exp(_logits(q_blk * scale, k_blk, dt) - lse_blk[..., None]), 0.0)  # weights
      dp = _product('bhqk,bhsk->bhqs', g_blk, v_blk, dt)
      ds = p * (dp - delta_blk[..., None]) * scale  # d logits, with the 1/sqrt(K) of the product
      dq = dq + _product('bhqs,bhsk->bhqk', ds, k_blk, dt)
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(acc, _block(acc, j, bk, 2) + x, j * bk, axis=2)
      dk = add(dk, _product('bhqs,bhqk->bhsk', ds, q_blk, dt))
      dv = add(dv, _product('bhqs,bhqk->bhsk', p, g_blk, dt))
      return dq, dk, dv

    dk, dv = carry
    lo, hi = _key_blocks(i, bq, bk, num_kv_blocks, causal, window)
    dq, dk, dv = jax.lax.fori_loop(lo, hi, key_block, (jnp.zeros((b, h, bq, d)), dk, dv))
    return (dk, dv), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(t // bq))
  dq = jnp.moveaxis(dq, 0, 2).reshape(b, h, t, d)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---------------------------------------------------------------------------------------------------------------------
# splash (TPU)


def splash_mask(mask: MaskSpec, t: int, s: int):
  """The splash kernel's static mask for one head: the band part of `mask` (segments go as SegmentIds)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  w = mask.window
  if mask.causal:
    return splash.LocalMask((t, s), (w - 1, 0), 0) if w else splash.CausalMask((t, s))
  return splash.LocalMask((t, s), (w - 1, w - 1), 0) if w else splash.FullMask((t, s))


def splash_attention(query, key, value, mask: MaskSpec, bq: int, bk: int, interpret: bool = False):
  """The Pallas splash kernel, one call per row (vmap); blocks of bq queries and bk keys (multiples of 128 on TPU)
  dividing the lengths. Under a mesh of several devices it runs per shard (shard_map: batch over the data/fsdp axes,
  heads over 'tensor', as parallel.py's rules lay activations out): XLA cannot partition a Pallas call itself."""
  from transformer_jax import parallel  # (parallel imports no model code)

  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, L, K]
  q = heads_first(query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype))  # splash does not scale the logits
  k, v = heads_first(key), heads_first(value)
  run = functools.partial(
    _splash_per_row, mask=mask.replace(q_segment=None, kv_segment=None), bq=bq, bk=bk, interpret=interpret
  )
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    P = jax.sharding.PartitionSpec
    batch = tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names) or None
    heads = 'tensor' if 'tensor' in mesh.axis_names else None
    spec, segment_spec = P(batch, heads, None, None), P(batch, None)
    run = jax.shard_map(
      run, mesh=mesh, in_specs=(spec, spec, spec, segment_spec, segment_spec), out_specs=spec, check_vma=False
    )
  return heads_first(run(q, k, v, mask.q_segment, mask.kv_segment))


def _splash_per_row(q, k, v, q_segment, kv_segment, *, mask: MaskSpec, bq: int, bk: int, interpret: bool):
  """q, k, v [B, H, L, K] (this shard's rows and heads), segments [B, L]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  _, h, t, _ = q.shape
  s = k.shape[2]
  sizes = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  kernel = splash.make_splash_mha(
    splash.MultiHeadMask([splash_mask(mask, t, s)] * h),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
  segments = splash.SegmentIds(q=q_segment, kv=kv_segment)
  return jax.vmap(kernel, in_axes=(0, 0, 0, splash.SegmentIds(0, 0)))(q, k, v, segments)
