"""The model's hyperparameters (ModelConfig) and the choices they name: compute dtype, activations, LayerNorm epsilon.

model.py builds the modules from a ModelConfig; everything else (decoding, export, the TPU compile check) can read
or validate one without the modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from transformer_jax.model.vocab import DEFAULT_SPECIAL_IDS, SpecialIds

# torch's nn.LayerNorm default: one constant so exported HF Marian models compute the same function.
LAYER_NORM_EPSILON = 1e-5


# Platforms whose matrix units run bfloat16 at full rate. On CPU 'auto' stays float32: XLA:CPU multiplies bfloat16
# fast only on CPUs with bfloat16 instructions (AVX512-BF16, AMX); model.dtype=bfloat16 is there to choose
# (benchmarks/bf16_training.py measures both).
_BFLOAT16_PLATFORMS = ('tpu', 'gpu', 'cuda', 'rocm')


def compute_dtype(name: str, platform: str | None = None):
  """model.dtype -> a numpy dtype: 'auto' is bfloat16 on TPU/GPU and float32 on CPU, for `platform` (default: the
  backend of this process)."""
  if name != 'auto':
    return jnp.dtype(name)
  platform = (platform or jax.default_backend()).lower()
  return jnp.dtype(jnp.bfloat16 if platform in _BFLOAT16_PLATFORMS else jnp.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int = 6  # N, for the encoder and the decoder each
  d_model: int = 512
  num_heads: int = 8  # h
  d_ff: int = 2048
  dropout_rate: float = 0.1  # P_drop: sub-layer outputs and embeddings+positions
  share_embeddings: bool = True  # one matrix for source, target and the pre-softmax projection
  pre_norm: bool = False  # the paper is post-norm: LayerNorm(x + Sublayer(x))
  positional: str = 'sinusoidal'  # or 'learned'
  max_len: int = 512  # longest position (learned table size; decode cache length)
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32
  # attention.py, the one switch: 'auto' (splash on TPU where the lengths fit its blocks, else dense) | 'dense' (XLA)
  # | 'cudnn' (dense through cuDNN: GPU) | 'blockwise' (exact, memory linear in length) | 'splash' (TPU Pallas kernel)
  attention: str = 'dense'
  attention_block_size: int = 512  # blockwise/splash block (query and key); must divide the lengths
  attention_window: int = 0  # local self-attention over W positions (0: full); the decode cache then holds W
  platform: str | None = None  # the chip attention='auto' chooses for (from_config's; None: this process's backend)
  remat: str = 'none'  # 'none' | 'full' | 'dots_saveable'
  scan_layers: bool = False  # nn.scan over identical layers: compile time flat in depth
  decode: bool = False  # incremental decoding over a key/value cache (set by decode.py)
  special_ids: SpecialIds = DEFAULT_SPECIAL_IDS  # the vocabulary's pad/eos/unk/bos (from its tokenizer)
  # Explicit softmax(QK^T/sqrt(K))V that sows its weights into the 'intermediates' collection (attention_maps.py);
  # training keeps the fused jax.nn.dot_product_attention.
  attention_weights: bool = False
  # 'encoder_decoder' (the paper) or 'decoder': a decoder-only language model (model.LanguageModel).
  kind: str = 'encoder_decoder'
  # feed-forward non-linearity: 'relu' (the paper), 'gelu' (GPT-2's tanh approximation), 'gelu_exact' (erf; HF's
  # 'gelu') or 'silu' (x * sigmoid(x); HF's 'swish', the OPUS-MT models)
  activation: str = 'relu'
  use_bias: bool = False  # biases on the attention projections (GPT-2); the feed-forward always has them
  scale_embeddings: bool = True  # embeddings * sqrt(D) (section 3.4); GPT-2 does not scale
  final_logits_bias: bool = False  # a [V] bias added to the logits (HF Marian's final_logits_bias)
  # Decoding's self-attention key/value cache: 'auto' (the compute dtype), 'float32', 'bfloat16' or 'int8'
  # (symmetric, one float32 scale per token and head); attention reads it dequantized to the compute dtype.
  kv_cache_dtype: str = 'auto'

  @classmethod
  def from_config(cls, model_config, platform: str | None = None, **overrides) -> ModelConfig:
    """`platform` resolves model.dtype='auto' and model.attention='auto' for the chip the model will run on (default:
    this process's backend; the TPU compile check, running on CPU, passes 'tpu'). model.attention and its block are
    validated by config_checks.py, not here."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(model_config).items() if k in fields}
    values.update(overrides)
    # A stored config may name the dense backend in attention_impl ('auto' or 'xla': dense; 'cudnn': the cudnn kind).
    if dict(model_config).get('attention_impl') == 'cudnn' and values.get('attention', 'dense') == 'dense':
      values['attention'] = 'cudnn'
    if platform is not None:
      values['platform'] = platform
    if values.get('activation') == 'swish':  # HF's name for the same function
      values['activation'] = 'silu'
    if isinstance(values.get('dtype'), str):
      values['dtype'] = compute_dtype(values['dtype'], platform)
    if values.get('special_ids') is not None and not isinstance(values['special_ids'], SpecialIds):
      values['special_ids'] = SpecialIds.from_dict(values['special_ids'])
    cfg = cls(**values)
    if cfg.d_model % cfg.num_heads:
      raise ValueError(f'model.d_model={cfg.d_model} is not divisible by model.num_heads={cfg.num_heads}')
    if cfg.positional not in ('sinusoidal', 'learned'):
      raise ValueError(f"model.positional must be 'sinusoidal' or 'learned', got {cfg.positional!r}")
    if cfg.kind not in ('encoder_decoder', 'decoder'):
      raise ValueError(f"model.kind must be 'encoder_decoder' or 'decoder', got {cfg.kind!r}")
    if cfg.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation must be one of {", ".join(ACTIVATIONS)}, got {cfg.activation!r}')
    if cfg.remat not in ('none', 'full', 'dots_saveable'):
      raise ValueError(f"model.remat must be 'none', 'full' or 'dots_saveable', got {cfg.remat!r}")
    if cfg.kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f'model.kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {cfg.kv_cache_dtype!r}')
    return cfg


KV_CACHE_DTYPES = ('auto', 'float32', 'bfloat16', 'int8')


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
  """Bytes the decoder's self-attention cache holds per decoded token and sequence (all layers, keys and values;
  int8 counts its float32 scale per head)."""
  name = jnp.dtype(cfg.dtype).name if cfg.kv_cache_dtype == 'auto' else cfg.kv_cache_dtype
  per_head = (cfg.d_model // cfg.num_heads) * jnp.dtype(name).itemsize + (4 if name == 'int8' else 0)
  return cfg.num_layers * 2 * cfg.num_heads * per_head


ACTIVATIONS = {
  'relu': nn.relu,
  'gelu': lambda x: nn.gelu(x, approximate=True),
  'gelu_exact': lambda x: nn.gelu(x, approximate=False),
  'silu': nn.silu,
}
