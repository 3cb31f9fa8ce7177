"""attention.py: blockwise and splash (interpret mode) equal dense attention, forward and gradients, on packed
segments, causal and windowed self-attention and cross-attention over padded sources; every value of the one switch
model.attention, through the one dispatch, equals dense; 'auto' resolves per platform and length as documented;
windowed decoding over the ring buffer equals teacher forcing; blockwise's planned temporaries grow linearly in length;
a bad setting is one line, from the one check (config_checks.py)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transformer_jax.model import attention
from transformer_jax import config_checks
from transformer_jax.inference import decode
from transformer_jax.inference import generate
from transformer_jax.model.transformer import LanguageModel, ModelConfig, Transformer

B, H, K = 2, 2, 8


def random_segments(rng, length: int, max_segments: int = 4) -> np.ndarray:
  """[B, length] packed segment ids 1..n, contiguous, with a random stretch of padding (0) at the end."""
  rows = []
  for _ in range(B):
    used = int(rng.integers(length // 2, length + 1))
    cuts = np.sort(
      rng.choice(np.arange(1, used), size=min(used - 1, int(rng.integers(0, max_segments))), replace=False)
    )
    row = np.zeros(length, np.int32)
    for i, (lo, hi) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, used])):
      row[lo:hi] = i + 1
    rows.append(row)
  return np.stack(rows)


def make_case(name: str, seed: int, t: int, s: int):
  """(query, key, value, MaskSpec) for a named case: causal | causal_window | window (bidirectional) | cross."""
  rng = np.random.default_rng(seed)
  q_seg = random_segments(rng, t)
  if name == 'cross':  # a target row's segment i reads source segment i; sources padded at the end
    kv_seg = np.zeros((B, s), np.int32)
    for row, n in zip(kv_seg, q_seg.max(axis=1)):
      used = int(rng.integers(n, s + 1))
      row[:used] = np.sort(np.r_[np.arange(1, n + 1), rng.integers(1, n + 1, size=used - n)])
  else:
    s, kv_seg = t, q_seg
  window = int(rng.integers(1, t // 2)) if 'window' in name else 0
  spec = attention.MaskSpec(jnp.asarray(q_seg), jnp.asarray(kv_seg), causal=name.startswith('causal'), window=window)
  normal = lambda n: jnp.asarray(rng.normal(size=(B, n, H, K)), jnp.float32)
  return normal(t), normal(s), normal(s), spec


def loss_and_grads(kind, q, k, v, spec, **kw):
  """Output and gradients of a random projection of the output over the real (not fully masked) query rows."""
  real = spec.dense().any(-1)[:, 0][:, :, None, None]  # [B, T, 1, 1]
  weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

  def loss(q, k, v):
    out = attention.attend(q, k, v, spec, kind=kind, **kw)
    return jnp.sum(jnp.where(real, out * weights, 0.0)), jnp.where(real, out, 0.0)

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def assert_same(a, b, atol=1e-5):
  out_a, grads_a = a
  out_b, grads_b = b
  np.testing.assert_allclose(out_a, out_b, atol=atol)
  for name, x, y in zip('qkv', grads_a, grads_b):
    np.testing.assert_allclose(x, y, atol=atol, err_msg=f'd{name}')


def reference_mask(q_seg: np.ndarray, kv_seg: np.ndarray, causal: bool, window: int) -> np.ndarray:
  """[B, T, S] boolean from the definition (attention.py's docstring), written without attention.py: a query sees a
  key of its own segment (not padding); causal: no later key; window W: causal i - W < j <= i, else |i - j| < W."""
  i = np.arange(q_seg.shape[1])[:, None]
  j = np.arange(kv_seg.shape[1])[None, :]
  visible = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
  if causal:
    visible &= j <= i
  if window:
    visible &= (i - j < window) if causal else (np.abs(i - j) < window)
  return visible


def random_case(seed: int, block: int, kind: str | None = None, window: int | None = None, max_blocks: int = 3):
  """A random attention problem: lengths that are not multiples of `block`, packed segments with padding at the end
  and in holes, causal or not, a window from 1 to several blocks or none, self- or cross-attention (cross: never
  windowed, never causal, as in the model). `kind` and `window` fix those draws. Returns (q, k, v, MaskSpec,
  reference [B, 1, T, S])."""
  rng = np.random.default_rng(seed)
  kind = kind or ('causal', 'bidirectional', 'cross')[seed % 3]
  length = lambda: int(rng.integers(1, max_blocks + 1)) * block + int(rng.integers(1, block))  # not a multiple
  t = length()
  q_seg = random_segments(rng, t)
  q_seg[rng.random(q_seg.shape) < 0.1] = 0  # holes: padding between real tokens
  if kind == 'cross':
    s = length()
    kv_seg = np.zeros((B, s), np.int32)
    for row, n in zip(kv_seg, q_seg.max(axis=1)):
      used = int(rng.integers(n, s + 1))
      row[:used] = np.sort(np.r_[np.arange(1, n + 1), rng.integers(1, n + 1, size=used - n)])
    kv_seg[rng.random(kv_seg.shape) < 0.1] = 0
    causal, window = False, 0
  else:
    s, kv_seg = t, q_seg
    causal = kind == 'causal'
    if window is None:  # none, 1 (itself only), or up to three blocks (a band over several key blocks)
      window = int(rng.choice([0, 1, int(rng.integers(2, 3 * block + 1))]))
  spec = attention.MaskSpec(jnp.asarray(q_seg), jnp.asarray(kv_seg), causal=causal, window=window)
  normal = lambda n: jnp.asarray(rng.normal(size=(B, n, H, K)), jnp.float32)
  return normal(t), normal(s), normal(s), spec, reference_mask(q_seg, kv_seg, causal, window)[:, None]


def reference_loss_and_grads(q, k, v, mask):
  """loss_and_grads of jax.nn.dot_product_attention under an explicit mask (no attention.py)."""
  real = jnp.asarray(mask.any(-1)[:, 0][:, :, None, None])
  weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
    return jnp.sum(jnp.where(real, out * weights, 0.0)), jnp.where(real, out, 0.0)

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def test_reference_mask_is_the_documented_band():
  seg = np.array([[1, 1, 1, 1, 1, 0]])
  assert reference_mask(seg, seg, causal=True, window=2)[0, 3].tolist() == [False, False, True, True, False, False]
  assert reference_mask(seg, seg, causal=False, window=2)[0, 3].tolist() == [False, False, True, True, True, False]
  assert reference_mask(seg, seg, causal=False, window=0)[0, 5].tolist() == [False] * 6  # padding sees nothing
  two = np.array([[1, 1, 2, 2]])
  assert reference_mask(two, two, causal=True, window=0)[0, 3].tolist() == [False, False, True, True]


@pytest.mark.parametrize('seed', range(12))
def test_blockwise_and_dense_equal_the_reference_on_random_cases(seed):
  block = (8, 16)[seed % 2]
  q, k, v, spec, mask = random_case(seed, block)
  assert spec.dense().shape == mask.shape and (np.asarray(spec.dense()) == mask).all()  # the dense path's mask
  reference = reference_loss_and_grads(q, k, v, mask)
  assert_same(reference, loss_and_grads('blockwise', q, k, v, spec, block_size=block))
  if seed < 4:
    assert_same(reference, loss_and_grads('blockwise', q, k, v, spec, block_size=512))  # one block


def test_blockwise_skips_key_blocks_outside_the_band():
  visited = lambda i, causal, window: tuple(
    int(x) for x in attention._key_blocks(jnp.int32(i), 16, 16, 8, causal, window)
  )
  assert visited(3, True, 0) == (0, 4)
  assert visited(3, True, 16) == (2, 4)  # rows 48..63 see keys 33..63
  assert visited(3, False, 16) == (2, 5)
  assert visited(0, False, 0) == (0, 8)


@pytest.mark.parametrize('kind, window, seed', [('causal', 0, 5), ('bidirectional', 130, 9), ('cross', 0, 5)])
def test_splash_interpret_equals_the_reference_on_random_cases(kind, window, seed):
  # The kernel's smallest blocks are 128 (its lane width): 2-3 blocks a side, padded, so blocks get skipped. The
  # bidirectional window spans two key blocks and is shorter than the 239 queries, so its edges are inside the rows.
  q, k, v, spec, mask = random_case(seed, 128, kind, window, max_blocks=2)
  assert kind != 'bidirectional' or q.shape[1] > window
  assert_same(
    reference_loss_and_grads(q, k, v, mask), loss_and_grads('splash', q, k, v, spec, block_size=128, interpret=True)
  )


# ---------------------------------------------------------------------------------------------------------------------
# The switch: one value, one dispatch


def _switch(kind: str, platform: str | None = None, block_size: int = 128, **fields) -> ModelConfig:
  return ModelConfig(vocab_size=32, attention=kind, attention_block_size=block_size, platform=platform, **fields)


def dispatch_loss_and_grads(cfg, q, k, v, spec):
  """loss_and_grads through attention.attention, the dispatch the model calls."""
  real = spec.dense().any(-1)[:, 0][:, :, None, None]
  weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

  def loss(q, k, v):
    out, maps = attention.attention(q, k, v, spec, cfg)
    assert maps is None
    return jnp.sum(jnp.where(real, out * weights, 0.0)), jnp.where(real, out, 0.0)

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize('kind', ['auto', 'dense', 'blockwise', 'cudnn'])
@pytest.mark.parametrize('seed', range(3))
def test_every_kind_through_the_dispatch_equals_dense(kind, seed):
  """Random packed causal, bidirectional (windowed or not) and cross cases: the same outputs and gradients."""
  if kind == 'cudnn' and jax.default_backend() != 'gpu':
    pytest.skip('cuDNN runs on a GPU')
  block = 16
  q, k, v, spec, mask = random_case(seed, block)
  dtype = jnp.bfloat16 if kind == 'cudnn' else jnp.float32  # cuDNN takes 16-bit operands only
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  atol = 3e-2 if kind == 'cudnn' else 1e-5
  assert_same(
    dispatch_loss_and_grads(_switch('dense', block_size=block), q, k, v, spec),
    dispatch_loss_and_grads(_switch(kind, block_size=block), q, k, v, spec),
    atol=atol,
  )


def test_splash_through_the_dispatch_equals_dense_off_tpu_interpreted():
  q, k, v, spec, _ = random_case(4, 128, 'causal', 100, max_blocks=1)
  assert_same(
    dispatch_loss_and_grads(_switch('dense'), q, k, v, spec), dispatch_loss_and_grads(_switch('splash'), q, k, v, spec)
  )


def test_auto_resolves_per_platform_and_length_as_documented():
  """auto: splash on a TPU when every length fills whole splash blocks (a multiple of 128, and of the block when
  longer than it), dense on a TPU otherwise and on every other platform; named kinds are themselves everywhere."""
  rng = np.random.default_rng(0)
  for _ in range(500):
    lengths = tuple(int(n) for n in rng.choice([1, 7, 100, 128, 200, 256, 384, 512, 640, 1024, 4096], size=2))
    block = int(rng.choice([64, 100, 128, 256, 512, 1000]))
    fits = all(n % 128 == 0 and (n <= block or (block % 128 == 0 and n % block == 0)) for n in lengths)
    assert attention.resolve('auto', 'tpu', lengths, block) == ('splash' if fits else 'dense'), (lengths, block)
    for platform in ('cpu', 'gpu', 'cuda'):
      assert attention.resolve('auto', platform, lengths, block) == 'dense'
    for kind in ('dense', 'cudnn', 'blockwise', 'splash'):
      assert attention.resolve(kind, str(rng.choice(['tpu', 'cpu', 'gpu'])), lengths, block) == kind


@pytest.mark.parametrize('platform, length, kernel', [('tpu', 256, True), ('tpu', 200, False), ('cpu', 256, False)])
def test_auto_in_the_model_traces_the_kernel_its_platform_gets(platform, length, kernel):
  """ModelConfig.from_config's platform (the TPU compile check passes 'tpu') reaches the dispatch: the splash kernel
  is in the traced program exactly when auto resolves to it (traced, not run: the kernel needs a TPU)."""
  cfg = ModelConfig.from_config({'vocab_size': 32, 'attention': 'auto', 'attention_block_size': 128}, platform=platform)
  assert cfg.platform == platform
  x = jnp.ones((B, length, H, K))
  segments = jnp.ones((B, length), jnp.int32)
  spec = attention.MaskSpec(segments, segments, causal=True)
  traced = str(jax.make_jaxpr(lambda x: attention.attention(x, x, x, spec, cfg)[0])(x))
  assert ('pallas_call' in traced) == kernel


def test_attention_maps_and_cached_steps_bypass_the_switch():
  """attention_weights returns the explicit weights whatever the kind; a cached decoding step (one query, boolean
  mask) is single_query_attention."""
  q, k, v, spec, mask = random_case(1, 16, 'causal')
  reference = reference_loss_and_grads(q, k, v, mask)[0]
  real = jnp.asarray(mask.any(-1)[:, 0][:, :, None, None])
  for kind in ('auto', 'blockwise', 'splash'):
    out, weights = attention.attention(q, k, v, spec, _switch(kind, attention_weights=True))
    assert weights.shape == (B, H, q.shape[1], k.shape[1])
    np.testing.assert_allclose(jnp.where(real, out, 0.0), reference, atol=1e-5)
    np.testing.assert_allclose(jnp.where(jnp.asarray(mask), weights, 0.0), weights)  # masked keys are 0
  cache_k, cache_v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, H, L, K]
  step_mask = jnp.asarray(mask[:, :, -1:])  # the last query's row [B, 1, 1, L]
  for kind in ('blockwise', 'splash'):
    out, weights = attention.attention(q[:, -1:], cache_k, cache_v, step_mask, _switch(kind, decode=True))
    assert weights is None
    expected = jax.nn.dot_product_attention(q[:, -1:], k, v, mask=step_mask)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_stored_attention_impl_maps_onto_the_switch():
  """Old configs name the dense backend in attention_impl and may carry attention_interpret: they still load."""
  load = lambda **model: ModelConfig.from_config({'vocab_size': 32, **model}).attention
  assert load(attention_impl='cudnn') == 'cudnn'
  assert load(attention_impl='cudnn', attention='dense') == 'cudnn'
  assert load(attention_impl='cudnn', attention='blockwise') == 'blockwise'
  for impl in ('auto', 'xla', None, ''):
    assert load(attention_impl=impl) == 'dense'
  assert load(attention='splash', attention_interpret=True) == 'splash'


# ---------------------------------------------------------------------------------------------------------------------
# In the model


def _packed_batch(rng, length, vocab):
  seg = random_segments(rng, length)
  pos = np.zeros_like(seg)
  for row_seg, row_pos in zip(seg, pos):
    for s in range(1, row_seg.max() + 1):
      row_pos[row_seg == s] = np.arange(np.sum(row_seg == s))
  tokens = np.where(seg > 0, rng.integers(4, vocab, size=seg.shape), 0).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize('window', [0, 5])
def test_transformer_blockwise_logits_equal_dense_on_a_packed_batch(window):
  rng = np.random.default_rng(window)
  cfg = ModelConfig(
    vocab_size=32,
    num_layers=1,
    d_model=16,
    num_heads=2,
    d_ff=32,
    dropout_rate=0.0,
    max_len=64,
    attention_window=window,
    attention_block_size=16,
  )
  inputs, inputs_seg, inputs_pos = _packed_batch(rng, 48, 32)
  targets, targets_seg, targets_pos = _packed_batch(rng, 32, 32)
  # Target segment i reads source segment i: keep the segment counts equal.
  targets_seg = jnp.minimum(targets_seg, inputs_seg.max(axis=1, keepdims=True))
  args = (inputs, targets, inputs_seg, targets_seg, inputs_pos, targets_pos)
  params = jax.jit(Transformer(cfg).init)(jax.random.key(0), *args)['params']
  logits = {
    kind: jax.jit(Transformer(ModelConfig(**{**cfg.__dict__, 'attention': kind})).apply)({'params': params}, *args)
    for kind in ('dense', 'blockwise')
  }
  real = np.asarray(targets_seg > 0)
  np.testing.assert_allclose(np.asarray(logits['dense'])[real], np.asarray(logits['blockwise'])[real], atol=1e-5)


def _lm(window, max_len=24, kind='dense'):
  return ModelConfig(
    vocab_size=32,
    num_layers=2,
    d_model=16,
    num_heads=2,
    d_ff=32,
    dropout_rate=0.0,
    max_len=max_len,
    kind='decoder',
    pre_norm=True,
    positional='learned',
    attention=kind,
    attention_window=window,
    attention_block_size=8,
  )


@pytest.mark.parametrize('window', [1, 3, 7])
def test_windowed_decoding_over_the_ring_buffer_equals_teacher_forcing(window):
  cfg = _lm(window)
  tokens = jnp.asarray(np.random.default_rng(window).integers(4, 32, size=(B, 20)), jnp.int32)
  params = LanguageModel(cfg).init(jax.random.key(1), tokens)['params']
  teacher = LanguageModel(cfg).apply({'params': params}, tokens, method=LanguageModel.decode)
  blockwise = LanguageModel(_lm(window, kind='blockwise')).apply(
    {'params': params}, tokens, method=LanguageModel.decode
  )
  np.testing.assert_allclose(teacher, blockwise, atol=1e-5)
  model = generate.decoding_model(cfg)
  cache = generate.init_cache(model, params, B, tokens.shape[1])
  assert cache['decoder']['layers_0']['self_attention']['cached_key'].shape == (B, 2, window, 8)  # O(W), not O(T)
  step = jax.jit(functools.partial(generate.decode_step, model))
  for t in range(tokens.shape[1]):
    logits, cache = step(params, cache, tokens[:, t])
    np.testing.assert_allclose(logits, teacher[:, t], atol=1e-5, err_msg=f'position {t}')


def test_windowed_translation_decoding_equals_teacher_forcing():
  cfg = ModelConfig(
    vocab_size=32, num_layers=1, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0, max_len=24, attention_window=4
  )
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(4, 32, size=(B, 12)), jnp.int32)
  decoder_inputs = jnp.asarray(rng.integers(4, 32, size=(B, 16)), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(2), inputs, decoder_inputs)['params']
  inputs_seg = jnp.ones_like(inputs)
  encoded = Transformer(cfg).apply({'params': params}, inputs, method=Transformer.encode)
  teacher = Transformer(cfg).apply({'params': params}, encoded, inputs_seg, decoder_inputs, method=Transformer.decode)
  model = decode.decoding_model(cfg)
  cache = decode.init_cache(model, params, encoded, inputs_seg, 16)
  step = jax.jit(functools.partial(decode.decode_step, model))
  for t in range(16):
    log_probs, cache = step(params, cache, encoded, inputs_seg, decoder_inputs[:, t])
    np.testing.assert_allclose(log_probs, jax.nn.log_softmax(teacher[:, t]), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Memory: a compile-time property


def planned_temp_bytes(kind: str, length: int, window: int = 0) -> int:
  """XLA's planned temporaries of one LM train step (loss, gradients) at `length` tokens per row."""
  cfg = ModelConfig(**{**_lm(window, max_len=length, kind=kind).__dict__, 'num_layers': 1, 'attention_block_size': 256})
  model = LanguageModel(cfg)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params'])

  def loss(params, tokens):
    logits = model.apply({'params': params}, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_train_step_temporaries_grow_linearly_in_length():
  short, long = 1024, 4096
  blockwise = planned_temp_bytes('blockwise', long) / planned_temp_bytes('blockwise', short)
  dense = planned_temp_bytes('dense', long) / planned_temp_bytes('dense', short)
  assert blockwise < 6, blockwise  # 4x the length: ~4x the bytes
  assert dense > 10, dense  # the [B, H, T, T] logits: ~16x (so this test can tell the two apart)


# ---------------------------------------------------------------------------------------------------------------------
# Bad settings


def _config(max_length=1000, **model):
  return ml_collections.ConfigDict(
    dict(
      max_length=max_length,
      packed_inputs_length=1024,
      packed_targets_length=1024,
      model=dict(d_model=16, num_heads=2, **model),
    )
  )


@pytest.mark.parametrize(
  'model, expected',
  [
    (dict(attention='flash'), "model.attention='flash': must be one of auto, dense, cudnn, blockwise, splash"),
    (dict(attention='blockwise', attention_window=-1), 'model.attention_window=-1: must be an integer >= 0'),
    (dict(attention='blockwise', attention_block_size=256), 'must divide max_length=1000'),
    (dict(attention='splash', attention_block_size=512), "model.attention='splash': a TPU kernel"),
    (dict(attention='splash', attention_block_size=200), 'splash blocks must be multiples of 128'),
  ],
)
def test_bad_settings_are_one_line_errors(model, expected):
  errors = config_checks.config_errors(_config(**model))
  assert any(expected in e for e in errors), errors
  assert all('\n' not in e for e in errors)


def test_splash_is_allowed_in_stored_configs_and_refused_for_training_off_tpu():
  assert not config_checks.config_errors(_config(1024, attention='splash'), platform_checks=False)
  errors = config_checks.config_errors(_config(1024, attention='splash'))
  assert len(errors) == (jax.default_backend() != 'tpu'), errors


@pytest.mark.parametrize(
  'field, value', [('attention', 'flash'), ('attention', 'xla'), ('attention_window', -2), ('attention_block_size', 0)]
)
def test_a_bad_attention_setting_fails_once_in_one_line(field, value):
  """config_checks.py is the one check: one line naming the key; ModelConfig and the dispatch do not check again."""
  errors = config_checks.config_errors(_config(1024, **{field: value}))
  assert len(errors) == 1 and f'model.{field}={value!r}' in errors[0] and '\n' not in errors[0], errors
  assert getattr(ModelConfig.from_config({'vocab_size': 32, field: value}), field) == value


def test_every_kind_and_auto_pass_the_check_with_any_lengths():
  # auto and the dense kernels pad nothing, so they take any length; blockwise and splash name their block's rule.
  for kind in ('auto', 'dense', 'cudnn'):
    assert not config_checks.config_errors(_config(1000, attention=kind, attention_block_size=300)), kind


@pytest.mark.parametrize('fmt', ['hf-gpt2', 'hf-marian'])
def test_a_windowed_model_refuses_hf_formats_in_one_line(fmt, tmp_path):
  from transformer_jax import export

  source = export.Exportable(config=None, cfg=_lm(4), params={}, tokenizer_path='', step=0)
  with pytest.raises(export.ExportError, match='cannot express model.attention_window=4') as e:
    export.export(source, fmt, str(tmp_path / 'out'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'out').exists()


def test_splash_under_a_mesh_runs_per_shard():
  # Batch over 'data', heads over 'tensor' (parallel.py's rules): the kernel runs under shard_map, same numbers.
  mesh = jax.make_mesh(
    (2, 2), ('data', 'tensor'), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  q, k, v, spec = make_case('causal_window', 4, t=256, s=256)
  dense = loss_and_grads('dense', q, k, v, spec)
  with jax.set_mesh(mesh):
    splash = loss_and_grads('splash', q, k, v, spec, block_size=128, interpret=True)
  assert_same(dense, splash)
