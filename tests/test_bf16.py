"""bfloat16 compute, checked on the compiled programs: every matrix product of the train step takes bfloat16
operands (TPU and CPU), sums (softmax, LayerNorm statistics, the loss) run in float32, parameters and optimizer state
stay float32; and a short bfloat16 training run follows the float32 one.

The TPU program is compiled here by libtpu (the [tpu] extra) for v5e:2x2, as `transformer-jax compile` does."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from benchmarks import bf16_training as hlo_lib  # noqa: E402
from transformer_jax.model import attention  # noqa: E402
from transformer_jax.training import train as train_lib  # noqa: E402

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler",
)


def _config(kind: str, **model):
  from configs import lm_tiny, tiny

  config = (lm_tiny if kind == 'decoder' else tiny).get_config()
  config.model.update(num_layers=1, d_model=64, d_ff=128, num_heads=4, dtype='bfloat16', **model)
  config.update(
    packed_inputs_length=32, packed_targets_length=32, max_length=32, batch_size=16, eval_translate_batch_size=16
  )
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config


def _forward_products(config) -> int:
  """Matrix products of one forward pass: per attention Q, K, V, output and the two of attention itself; two per
  feed-forward; the logits. The train step holds each once more per operand gradient (x2)."""
  decoder_only = config.model.get('kind', 'encoder_decoder') == 'decoder'
  per_layer = 6 * (1 if decoder_only else 3) + 2 * (1 if decoder_only else 2)
  return per_layer * config.model.num_layers + 1


@pytest.fixture(scope='module', params=[('encoder_decoder', 'dense'), ('decoder', 'blockwise')], ids=str)
def tpu_train(request):
  """(config, HLO text, abstract state) of the bfloat16 train step compiled for v5e:2x2 (fsdp=4), once per module. The
  translation model with dense attention, the language model with blockwise attention (two blocks of 16)."""
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
  from transformer_jax.tpu import compile as tpu_compile

  kind, attention_kind = request.param
  config = _config(kind, attention=attention_kind, attention_block_size=16)
  (report,) = tpu_compile.compile_programs(
    config, 'v5e:2x2', programs=('train',), keep_compiled=True, progress=lambda line: None
  )
  return config, report.compiled.as_text(), report.setup.state


# ---------------------------------------------------------------------------------------------------------------------
# the checker itself: a float32 operand is found


_F32_OPERAND = """
%fused_computation.7 (param_0.1: f32[4,32,32], param_1.1: bf16[4,32,16]) -> f32[4,32,16] {
  %param_0.1 = f32[4,32,32]{2,1,0:T(8,128)} parameter(0)
  %param_1.1 = bf16[4,32,16]{2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.3 = f32[4,32,16]{2,1,0:T(8,128)} convolution(%param_0.1, %param_1.1), dim_labels=0bf_oi0->0bf
}

ENTRY %main.9 (p.0: f32[4,32,32], p.1: bf16[4,32,16]) -> f32[4,32,16] {
  %p.0 = f32[4,32,32]{2,1,0} parameter(0)
  %p.1 = bf16[4,32,16]{2,1,0} parameter(1)
  ROOT %fusion.1 = f32[4,32,16]{2,1,0} fusion(%p.0, %p.1), kind=kOutput, calls=%fused_computation.7
}
"""


def test_the_checker_sees_a_float32_operand_by_name():
  """Compiled HLO prints operands by name only: their types come from their definitions."""
  (dot,) = hlo_lib.dots(_F32_OPERAND)
  assert (dot.operands, dot.dtype) == (('f32', 'bf16'), 'f32')
  assert hlo_lib.dot_dtypes(_F32_OPERAND) == {'f32 x bf16 -> f32': 1}
  assert [p.dtype for p in hlo_lib.entry_parameters(_F32_OPERAND)] == ['f32', 'bf16']


def test_the_checker_sees_what_jnp_einsum_gradients_do():
  """The backward of a float32-result product (attention logits) through plain jnp.einsum multiplies a float32
  cotangent by a bfloat16 operand; through attention.einsum_f32 it does not."""
  q = jax.ShapeDtypeStruct((2, 8, 2, 16), jnp.bfloat16)
  plain = lambda a, b: jnp.einsum('bthk,bshk->bhts', a, b, preferred_element_type=jnp.float32)
  ours = lambda a, b: attention.einsum_f32('bthk,bshk->bhts', a, b, jnp.bfloat16)
  hlo = lambda f: jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), (0, 1))).lower(q, q).as_text(dialect='hlo')
  assert any('f32' in d.operands for d in hlo_lib.dots(hlo(plain)))
  assert all(d.operands == ('bf16', 'bf16') and d.dtype == 'f32' for d in hlo_lib.dots(hlo(ours)))


# ---------------------------------------------------------------------------------------------------------------------
# einsum_f32 and dense_attention: the same functions as their float32 references


@pytest.mark.parametrize(
  'equation, shapes',
  [
    ('btd,dhk->bthk', ((2, 5, 8), (8, 2, 4))),
    ('bthk,hkd->btd', ((2, 5, 2, 4), (2, 4, 8))),
    ('bld,vd->blv', ((2, 5, 8), (11, 8))),
    ('bld,df->blf', ((2, 5, 8), (8, 6))),
    ('bthk,bshk->bhts', ((2, 5, 2, 4), (2, 7, 2, 4))),
    ('bhts,bshk->bthk', ((2, 2, 5, 7), (2, 7, 2, 4))),
  ],
)
def test_einsum_f32_value_and_gradients_match_float32(equation, shapes):
  rng = np.random.default_rng(len(equation))
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  w = jnp.asarray(rng.normal(size=jnp.einsum(equation, a, b).shape), jnp.float32)
  loss = lambda f: lambda x, y: jnp.sum(w * f(x, y))
  ref = jax.value_and_grad(loss(lambda x, y: jnp.einsum(equation, x, y)), (0, 1))(a, b)
  # float32 is plain jnp.einsum
  f32 = jax.value_and_grad(loss(lambda x, y: attention.einsum_f32(equation, x, y, jnp.float32)), (0, 1))(a, b)
  jax.tree.map(np.testing.assert_array_equal, f32, ref)
  # bfloat16: gradients come back in the inputs' dtypes (a float32 kernel's in float32), within bfloat16 rounding
  # of operands with 4-8 terms per sum (relative 2^-8 per rounding, a few roundings: 3% of the scale)
  mixed = lambda x, y: attention.einsum_f32(equation, x, y, jnp.bfloat16)
  value, (da, db) = jax.value_and_grad(loss(mixed), (0, 1))(a, b.astype(jnp.bfloat16))
  assert (da.dtype, db.dtype) == (jnp.float32, jnp.bfloat16)
  for got, want in zip((value, da, db), (ref[0], *ref[1])):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.03 * scale)


@pytest.mark.parametrize('equation', ['bd,dk->b', 'bd,dk', 'b...d,dk->b...k', 'bdd,dk->bk', 'bx,dk->bk'])
def test_einsum_f32_refuses_equations_its_gradient_cannot_form(equation):
  with pytest.raises(ValueError):
    attention.einsum_f32(equation, jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.bfloat16)


def test_dense_attention_is_jax_dot_product_attention():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(rng.random((2, 1, 6, 6)) < 0.7).at[:, :, :, 0].set(True)
  np.testing.assert_allclose(
    attention.dense_attention(q, k, v, mask), jax.nn.dot_product_attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-6
  )
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  got = attention.dense_attention(q16, k16, v16, mask)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(got, np.float32),
    np.asarray(jax.nn.dot_product_attention(q16, k16, v16, mask=mask), np.float32),
    atol=0.02,
  )


def test_bfloat16_blockwise_attention_and_its_gradients_follow_dense():
  """Blockwise attention in bfloat16 (bfloat16 block products, float32 online softmax) against dense attention in
  bfloat16: values and gradients agree to bfloat16's resolution at these magnitudes (entries ~1: 2^-7 per rounding,
  a few roundings)."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 64, 2, 16)), jnp.bfloat16) for _ in range(3))
  segments = jnp.asarray(np.repeat([[1] * 40 + [2] * 24], 2, axis=0), jnp.int32)
  mask = attention.MaskSpec(segments, segments, causal=True)
  run = lambda kind: jax.value_and_grad(
    lambda *x: jnp.sum(jnp.sin(attention.attend(*x, mask, kind=kind, block_size=16).astype(jnp.float32))), (0, 1, 2)
  )(q, k, v)
  (blockwise, grads), (dense, dense_grads) = run('blockwise'), run('dense')
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(blockwise, dense, rtol=2e-3)
  for g, want in zip(grads, dense_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want, np.float32), atol=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# the TPU train step


@needs_libtpu
def test_every_tpu_matrix_product_takes_bfloat16_operands(tpu_train):
  """Results are float32 (the products ask for float32 results: einsum_f32); a bfloat16 result would do too where
  the compiler fuses the rounding into the product, since the MXU accumulates in float32 either way."""
  config, hlo, _ = tpu_train
  products = hlo_lib.dots(hlo)
  assert len(products) >= 3 * _forward_products(config), hlo_lib.dot_dtypes(hlo)
  bad = [(d.name, d.operands, d.op_name) for d in products if d.operands != ('bf16', 'bf16')]
  assert not bad, bad
  assert {d.dtype for d in products} <= {'f32', 'bf16'}


@needs_libtpu
def test_tpu_sums_run_in_float32(tpu_train):
  """Every floating-point sum (softmax denominators, LayerNorm statistics, the loss, bias gradients) is float32;
  maxima may be bfloat16 (exact in any dtype)."""
  _, hlo, _ = tpu_train
  sums = hlo_lib.float_add_reductions(hlo)
  assert [(s.name, s.op_name) for s in sums if s.dtype != 'f32'] == []
  names = ' '.join(s.op_name for s in sums)
  for part in ('self_attention/reduce_sum', 'self_attention_norm/reduce_sum', 'feed_forward_norm/reduce_sum'):
    assert part in names  # the softmax and the LayerNorms are among them


@needs_libtpu
def test_tpu_parameters_and_optimizer_state_are_float32(tpu_train):
  _, hlo, state = tpu_train
  floats = [p.dtype for p in hlo_lib.entry_parameters(hlo) if p.dtype in hlo_lib.FLOATS]
  leaves = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) == len(leaves) >= 3 * len(jax.tree.leaves(state.params))  # params, Adam's mu and nu
  assert set(floats) == {'f32'}


# ---------------------------------------------------------------------------------------------------------------------
# a short run on CPU, both dtypes

STEPS = 40


def _train_config():
  from configs import lm_tiny

  config = lm_tiny.get_config()
  config.model.update(vocab_size=32, num_layers=1, d_model=64, num_heads=4, d_ff=128)
  config.update(packed_targets_length=32, max_length=32, batch_size=16, warmup_steps=10)
  return config


def _batches(config, steps: int):
  """Counting from a random token: each next token is the previous one + 1 (over tokens 3..31; 0-2 are pad, eos,
  bos), a rule the model picks up within a few dozen steps; a new batch each step."""
  rng = np.random.default_rng(0)
  rows, length, vocab = config.batch_size, config.packed_targets_length, config.model.vocab_size
  for _ in range(steps):
    start = rng.integers(0, vocab - 3, size=(rows, 1))
    yield {'targets': (3 + (start + np.arange(length)) % (vocab - 3)).astype(np.int32)}


def _run(config, dtype: str):
  """(losses per step, compiled HLO text) of STEPS steps of the train step in model.dtype=dtype."""
  config.model.dtype = dtype
  from flax import linen as nn
  from transformer_jax.training import optim
  from transformer_jax.training import train_state
  from transformer_jax.model.transformer import build_model

  model = build_model(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  state = jax.jit(lambda r: nn.meta.unbox(train_state.init_boxed_state(model, tx, config, r)))(jax.random.key(0))
  batches = list(_batches(config, STEPS))
  step = jax.jit(train_lib.make_train_step(model, tx, config)).lower(state, batches[0], jax.random.key(1)).compile()
  losses = []
  for batch in batches:
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert {
    jnp.dtype(x.dtype)
    for x in jax.tree.leaves((state.params, state.opt_state))
    if jnp.issubdtype(x.dtype, jnp.floating)
  } == {jnp.dtype(jnp.float32)}
  return np.asarray(losses), step.as_text()


@pytest.fixture(scope='module')
def cpu_runs():
  config = _train_config()
  return {dtype: _run(config, dtype) for dtype in ('float32', 'bfloat16')}


def test_bfloat16_training_follows_float32(cpu_runs):
  """The loss falls from ln(32) ~ 3.5 to ~0.11 nats (its floor: each row's first token is a guess among 29) in 40
  steps; bfloat16's stays within 0.01 nats of float32's at every step. The two curves differ far less than that
  (bfloat16 rounds operands to 8 significant bits, ~0.4%, but sums in float32), so 0.01 leaves room for
  another platform's rounding order, while a run whose products lost their float32 accumulation drifts by more,
  and a diverging one by up to the whole drop (3.8)."""
  f32, b16 = cpu_runs['float32'][0], cpu_runs['bfloat16'][0]
  assert f32[-1] < 0.1 * f32[0]  # it learns: the comparison is not between two flat curves
  np.testing.assert_allclose(b16, f32, rtol=0, atol=0.01)
  assert not np.array_equal(b16, f32)  # and the bfloat16 run did round


def test_bfloat16_cpu_train_step_multiplies_bfloat16(cpu_runs):
  """On XLA:CPU too: every product takes bfloat16 operands (a bfloat16 x bfloat16 -> bfloat16 dot would be computed
  in float32 on converted copies: its operands in the compiled HLO are float32)."""
  products = hlo_lib.dots(cpu_runs['bfloat16'][1])
  assert products and all(d.operands == ('bf16', 'bf16') for d in products), hlo_lib.dot_dtypes(cpu_runs['bfloat16'][1])
  assert all(d.operands == ('f32', 'f32') for d in hlo_lib.dots(cpu_runs['float32'][1]))
