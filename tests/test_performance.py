"""Performance options change speed, not results: bf16, remat, scanned layers, gradient accumulation; the FLOPs
formula of benchmarks/train_throughput.py against XLA's own count; profiling writes a trace."""

import functools
import glob
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from benchmarks import train_throughput  # noqa: E402
from configs import lm_tiny  # noqa: E402
from configs import tiny  # noqa: E402
from transformer_jax.inference import evaluation
from transformer_jax import parallel  # noqa: E402
from transformer_jax.training import run_control
from transformer_jax.training import train as train_lib  # noqa: E402
from transformer_jax.training import train_state
from transformer_jax.model.transformer import LanguageModel, ModelConfig, Transformer  # noqa: E402
import helpers  # noqa: E402

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0, max_len=32)
BF16_LOSS_RTOL = 5e-3  # bfloat16 compute (float32 parameters, float32 logits/loss): loss within 0.5% of float32
BF16_GRAD_COSINE = 0.99  # and the gradient points the same way (cosine similarity of the flattened gradients)


def _cfg(**overrides) -> ModelConfig:
  return ModelConfig(**{**CFG.__dict__, **overrides})


def _batch(rows=8, inputs_length=16, targets_length=12, seed=0):
  return train_throughput.synthetic_batch(
    rows, inputs_length, targets_length, CFG.vocab_size, fill=0.9, segments=2, seed=seed
  )


def _init(cfg, batch, seed=0):
  model = Transformer(cfg)
  return nn.meta.unbox(model.init(jax.random.key(seed), batch['inputs'][:1], batch['targets'][:1])['params'])


def _loss_and_grads(cfg, params, batch):
  """Token-mean label-smoothed loss (as the train step computes it) and its gradients."""
  model = Transformer(cfg)

  def loss_fn(p):
    logits = model.apply({'params': p}, **{k: jnp.asarray(v) for k, v in batch.items()}, deterministic=True)
    weights = (jnp.asarray(batch['targets']) != 0).astype(jnp.float32)
    sums = evaluation.cross_entropy_sums(logits, jnp.asarray(batch['targets']), weights, 0.1)
    return sums['loss_sum'] / sums['weight_sum']

  return jax.jit(jax.value_and_grad(loss_fn))(params)


_to_scan_layout = helpers.to_scan_layout


def _assert_trees_close(a, b, rtol, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------------------------
# Options change speed, not results


def test_bfloat16_loss_within_tolerance_of_float32():
  batch, params, loss32, grads32 = _reference()
  loss16, grads16 = _loss_and_grads(_cfg(dtype=jnp.bfloat16), params, batch)
  assert abs(float(loss16) - float(loss32)) <= BF16_LOSS_RTOL * float(loss32), (float(loss16), float(loss32))
  g32, g16 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (grads32, grads16))
  assert np.dot(g32, g16) / (np.linalg.norm(g32) * np.linalg.norm(g16)) >= BF16_GRAD_COSINE
  # parameters (and so their gradients) stay float32; only the compute dtype changes
  assert {x.dtype for x in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_config_string_is_accepted():
  config = tiny.get_config()
  config.model.dtype = 'bfloat16'
  assert train_state.model_config(config).dtype == jnp.bfloat16


@functools.cache
def _reference():
  """(batch, unrolled params, their loss and gradients): the plain model every option is compared with."""
  batch = _batch()
  params = _init(CFG, batch)
  loss, grads = _loss_and_grads(CFG, params, batch)
  return batch, params, loss, grads


@pytest.mark.parametrize('remat', ['full', 'dots_saveable'])
def test_remat_gives_the_same_loss_and_gradients(remat):
  batch, params, loss, grads = _reference()
  loss_r, grads_r = _loss_and_grads(_cfg(remat=remat), params, batch)
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  _assert_trees_close(grads_r, grads, rtol=1e-5, atol=1e-7)


def test_scan_layers_equals_unrolled_with_stacked_parameters():
  batch, params, loss, grads = _reference()
  scanned_params = _to_scan_layout(params, CFG.num_layers)
  # the mapping is exactly the scan model's own layout
  own = jax.eval_shape(lambda: _init(_cfg(scan_layers=True), batch))
  assert jax.tree.structure(own) == jax.tree.structure(scanned_params)
  assert jax.tree.map(lambda x: x.shape, own) == jax.tree.map(lambda x: x.shape, scanned_params)
  loss_s, grads_s = _loss_and_grads(_cfg(scan_layers=True), scanned_params, batch)
  np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-6)
  _assert_trees_close(grads_s, _to_scan_layout(grads, CFG.num_layers), rtol=1e-5, atol=1e-7)


def _train_config(**overrides):
  config = tiny.get_config()
  config.model.update(
    vocab_size=CFG.vocab_size,
    num_layers=CFG.num_layers,
    d_model=CFG.d_model,
    num_heads=CFG.num_heads,
    d_ff=CFG.d_ff,
    dropout_rate=0.0,
  )
  config.update(batch_size=16, max_length=12, packed_inputs_length=16, packed_targets_length=12)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _one_step(config, params, batch, mesh, tx):
  """One jitted, sharded train step (train.jit_train_step) from `params`; returns (new params, metrics)."""
  model = Transformer(train_state.model_config(config))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    shardings = parallel.logical_shardings(train_state.state_logical_specs(model, tx, config), mesh)
    state = train_state.TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params))
    state = jax.device_put(state, shardings)
    step = train_lib.jit_train_step(model, tx, config, mesh, shardings)
    new_state, metrics = step(state, parallel.global_batch(batch, mesh), jax.random.key(1))
    return jax.device_get(new_state.params), {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.fixture(scope='module')
def mesh():
  config = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
  return parallel.make_mesh(config)


@pytest.fixture(scope='module')
def plain_step(mesh):
  """The reference: one SGD step on the whole batch, unrolled layers, no remat, no accumulation."""
  config = _train_config()
  batch = _batch(rows=16, inputs_length=16, targets_length=12, seed=3)
  params = _init(train_state.model_config(config), batch)
  return config, params, batch, _one_step(config, params, batch, mesh, optax.sgd(1.0))


@pytest.mark.parametrize('accum', [4])  # 2: in the scanned test below
def test_grad_accumulation_equals_one_batch_k_times_larger(plain_step, mesh, accum):
  config, params, batch, (new_params, metrics) = plain_step
  new_params_k, metrics_k = _one_step(_train_config(grad_accum_steps=accum), params, batch, mesh, optax.sgd(1.0))
  for key in ('loss', 'nll', 'accuracy', 'tokens', 'grad_norm'):
    assert metrics_k[key] == pytest.approx(metrics[key], rel=1e-5), key
  # SGD with learning rate 1: the parameter change IS the gradient, so this compares gradients
  _assert_trees_close(new_params_k, new_params, rtol=1e-5, atol=1e-6)


def test_train_step_metrics_count_only_the_real_target_tokens(plain_step):
  """tokens = the non-padding target slots (segmentation > 0), accuracy = the share of them whose logit is the
  largest, computed here from the forward pass (the step ran without dropout, so its logits are these)."""
  config, params, batch, (_, metrics) = plain_step
  real = np.asarray(batch['targets_segmentation']) > 0
  assert 0 < real.sum() < real.size  # the batch has padding
  assert metrics['tokens'] == real.sum()
  logits = jax.jit(Transformer(train_state.model_config(config)).apply)(
    {'params': params}, **{k: jnp.asarray(v) for k, v in batch.items()}
  )
  hits = np.argmax(np.asarray(logits), axis=-1) == np.asarray(batch['targets'])
  assert hits[real].any()  # so an accuracy that never counts a hit would show
  assert metrics['accuracy'] == pytest.approx(hits[real].mean(), abs=1e-6)


def test_dropout_acts_in_the_train_step_only(plain_step, mesh):
  """With dropout, the train step's loss is not the deterministic loss (and depends on the step's key); evaluation
  and the deterministic forward pass are the dropout-free model's."""
  config, params, batch, (_, metrics) = plain_step
  dropped = _train_config(**{'model.dropout_rate': 0.3})
  _, metrics_d = _one_step(dropped, params, batch, mesh, optax.sgd(1.0))
  assert abs(metrics_d['loss'] - metrics['loss']) > 1e-3 * metrics['loss'], (metrics_d['loss'], metrics['loss'])
  assert metrics_d['tokens'] == metrics['tokens']
  model = Transformer(train_state.model_config(dropped))
  eval_step = jax.jit(evaluation.make_eval_step(model, dropped))
  sums = eval_step(params, {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(sums['loss_sum'] / sums['weight_sum']) == pytest.approx(metrics['loss'], rel=1e-5)


def test_accumulated_micro_batches_draw_their_own_dropout_masks(plain_step, mesh):
  """Micro-batch 1 a copy of micro-batch 0: had it the same dropout masks, its loss would equal micro-batch 0's, and
  the step's token-mean loss would be what it is with micro-batch 1 all padding (bit for bit: 2x / 2n = x / n)."""
  config, params, batch, _ = plain_step
  first = {k: np.asarray(v)[0::2] for k, v in batch.items()}  # micro-batch i is rows i::2

  def interleave(second):
    return {k: np.stack([first[k], second[k]], axis=1).reshape((-1,) + first[k].shape[1:]) for k in first}

  variant = _train_config(**{'model.dropout_rate': 0.3, 'grad_accum_steps': 2})
  _, copied = _one_step(variant, params, interleave(first), mesh, optax.sgd(1.0))
  _, padding = _one_step(
    variant, params, interleave({k: np.zeros_like(v) for k, v in first.items()}), mesh, optax.sgd(1.0)
  )
  assert copied['tokens'] == 2 * padding['tokens']
  assert copied['loss'] != padding['loss']


def test_scanned_rematted_train_step_on_a_mesh_matches_plain(plain_step, mesh):
  """Scanned layers (params stacked on the 'layers' logical axis) shard on a data x fsdp x tensor mesh, and the
  sharded, rematted, accumulated step computes what the plain one does."""
  config, params, batch, (new_params, metrics) = plain_step
  variant = _train_config(**{'model.scan_layers': True, 'model.remat': 'dots_saveable', 'grad_accum_steps': 2})
  new_params_s, metrics_s = _one_step(
    variant, _to_scan_layout(params, config.model.num_layers), batch, mesh, optax.sgd(1.0)
  )
  assert metrics_s['loss'] == pytest.approx(metrics['loss'], rel=1e-5)
  _assert_trees_close(new_params_s, _to_scan_layout(new_params, config.model.num_layers), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def test_flops_formula_matches_xla_count():
  """benchmarks/train_throughput.py counts matmuls from the architecture; XLA counts every op of the compiled
  forward (layer norms and softmax add a little) and of forward + backward (the 3x rule)."""
  d, f, v, n, s, t = 64, 256, 256, 2, 32, 16
  cfg = ModelConfig(vocab_size=v, num_layers=n, d_model=d, num_heads=4, d_ff=f, dropout_rate=0.0, max_len=64)
  model = Transformer(cfg)
  inputs, targets = jnp.ones((2, s), jnp.int32), jnp.ones((2, t), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, targets))['params'])
  forward = jax.jit(lambda p: model.apply({'params': p}, inputs, targets)).lower(params).compile()
  backward = jax.jit(jax.grad(lambda p: model.apply({'params': p}, inputs, targets).sum())).lower(params).compile()
  ours = 2 * train_throughput.forward_flops_per_row(d, f, n, v, s, t)
  assert 0.99 <= train_throughput.xla_flops(forward) / ours <= 1.06
  assert 0.95 <= train_throughput.xla_flops(backward) / (3 * ours) <= 1.06
  config = _train_config()
  assert train_throughput.train_flops_per_step(config) == 3 * 16 * train_throughput.forward_flops_per_row(
    32, 64, 2, 64, 16, 12
  )


def test_lm_flops_formula_matches_xla_count():
  """The decoder-only language model's count (no encoder, no cross-attention) against XLA's, as above."""
  d, f, v, n, t = 64, 256, 256, 2, 32
  cfg = ModelConfig(
    vocab_size=v, num_layers=n, d_model=d, num_heads=4, d_ff=f, dropout_rate=0.0, max_len=64, kind='decoder'
  )
  model = LanguageModel(cfg)
  targets = jnp.ones((2, t), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), targets))['params'])
  forward = jax.jit(lambda p: model.apply({'params': p}, targets)).lower(params).compile()
  backward = jax.jit(jax.grad(lambda p: model.apply({'params': p}, targets).sum())).lower(params).compile()
  ours = 2 * train_throughput.lm_forward_flops_per_row(d, f, n, v, t)
  assert 0.99 <= train_throughput.xla_flops(forward) / ours <= 1.06
  assert 0.95 <= train_throughput.xla_flops(backward) / (3 * ours) <= 1.06


def assert_mfu_is_flops_over_time_over_peak(result):
  """MFU = model FLOPs / median step time / peak (the harmonic mean of the measured matmul rates), and a CPU
  cannot run a model step faster than its own best matmul."""
  assert result.step_s == statistics.median(result.step_times)
  peak = len(result.peak_samples) / sum(1 / r for r in result.peak_samples)
  assert result.peak == pytest.approx(peak)
  assert result.mfu == pytest.approx(result.model_flops / result.step_s / peak)
  assert 0 < result.mfu < 1, result.mfu


def test_throughput_benchmark_runs_for_the_language_model():
  config = lm_tiny.get_config()
  config.model.update(vocab_size=64, num_layers=1, d_model=32, num_heads=4, d_ff=64)
  config.update(batch_size=8, max_length=16, packed_inputs_length=16, packed_targets_length=16)
  batch = train_throughput.make_batch(config)
  assert sorted(batch) == ['targets', 'targets_position', 'targets_segmentation']
  result = train_throughput.run_variant(
    'lm', config, batch, steps=1, warmup=0, peak_size=128, peak_reps=1, mesh=parallel.make_mesh(config.mesh), pause=0.0
  )
  assert result.tokens == float((batch['targets'] != 0).sum())
  assert result.model_flops == 3 * 8 * train_throughput.lm_forward_flops_per_row(32, 64, 1, 64, 16)
  assert_mfu_is_flops_over_time_over_peak(result)
  # compile_time compiles the same train step from abstract shapes (nothing allocated): the same program, so XLA
  # counts the same FLOPs per device as in the step that ran, at least its 1/8 share of the model's
  lower_s, compile_s, compiled = train_throughput.compile_time(config, parallel.make_mesh(config.mesh))
  assert lower_s > 0 and compile_s > 0
  assert train_throughput.xla_flops(compiled) == result.xla_flops >= result.model_flops / 8


def test_generation_benchmark_runs_and_both_sides_agree():
  """benchmarks/generate_throughput.py at a tiny size: the same exported weights give HF GPT-2 and us the same greedy
  tokens, exactly --new_tokens of them (its workers fail otherwise), and it prints the ratio row."""
  import subprocess

  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(_REPO, 'benchmarks', 'generate_throughput.py'),
      '--num_layers=1',
      '--d_model=32',
      '--d_ff=64',
      '--vocab=64',
      '--context=16',
      '--batch=2',
      '--prompt_len=3',
      '--new_tokens=5',
      '--repeats=1',
      '--threads=1',
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'greedy outputs equal: yes (0 of 10 tokens differ' in proc.stdout
  assert '| greedy, batch 2, 3 + 5 tokens |' in proc.stdout and 'x (' in proc.stdout.splitlines()[-3]


def test_closed_form_loss_what_if_equals_the_train_loss():
  """The benchmark's `bench_loss=closed_form` what-if computes the same sums as train.cross_entropy_sums."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 7, 50)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, 7)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (3, 7)), jnp.float32)
  for ls in (0.0, 0.1):
    want = evaluation.cross_entropy_sums(logits, targets, weights, ls)
    got = train_throughput.closed_form_cross_entropy_sums(logits, targets, weights, ls)
    for key in want:
      np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)


def test_synthetic_batch_is_packed_like_the_pipeline():
  batch = train_throughput.synthetic_batch(4, 40, 20, 100, fill=0.9, segments=3, seed=1)
  for side, length in (('inputs', 40), ('targets', 20)):
    seg, pos, tok = batch[f'{side}_segmentation'], batch[f'{side}_position'], batch[side]
    assert ((tok != 0) == (seg != 0)).all()
    assert (seg.max(axis=1) == 3).all()
    assert ((tok != 0).sum(axis=1) == round(0.9 * length)).all()
    for r in range(4):
      for s in (1, 2, 3):
        np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
        assert tok[r][seg[r] == s][-1] == 1  # EOS closes every example


def test_throughput_benchmark_runs_and_reports_mfu():
  config = _train_config(batch_size=8)
  mesh = parallel.make_mesh(config.mesh)
  batch = train_throughput.make_batch(config)
  closed_form = train_throughput.apply_overrides(config, [('bench_loss', 'closed_form')])
  results = train_throughput.run_variants(
    [('base', config), ('closed form', closed_form)],
    batch,
    steps=2,
    warmup=0,
    peak_size=128,
    peak_reps=1,
    mesh=mesh,
    pause=0.0,
  )
  for result in results:
    assert result.tokens == float((batch['targets'] != 0).sum())
    assert len(result.step_times) == 2 and 0 < result.mfu_cpu_time < 1
    assert result.model_flops == train_throughput.train_flops_per_step(config)
    assert_mfu_is_flops_over_time_over_peak(result)
  # the what-if loss trains the same: same loss after the same steps
  assert results[1].loss == pytest.approx(results[0].loss, rel=1e-5)
  # the speedup pairs the steps of one round: base step i / what-if step i, median over the rounds
  base, what_if = results[0].step_times, results[1].step_times
  assert results[0].paired_speedup == 1.0
  assert results[1].paired_speedup == pytest.approx(statistics.median(b / t for b, t in zip(base, what_if)))
  # and the what-if is another program, not the train loss under a second name
  args = (jnp.zeros((2, 3, 8)), jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3)), 0.1)
  assert str(jax.make_jaxpr(evaluation.cross_entropy_sums, static_argnums=3)(*args)) != str(
    jax.make_jaxpr(train_throughput.closed_form_cross_entropy_sums, static_argnums=3)(*args)
  )
  table = train_throughput.results_table(results)
  assert '| base |' in table and '| closed form |' in table
  assert train_throughput.parse_overrides('model.dtype=bfloat16, grad_accum_steps=2') == [
    ('model.dtype', 'bfloat16'),
    ('grad_accum_steps', '2'),
  ]
  variant = train_throughput.apply_overrides(config, [('model.scan_layers', 'True'), ('grad_accum_steps', '2')])
  assert variant.model.scan_layers is True and variant.grad_accum_steps == 2 and config.grad_accum_steps == 1


# ---------------------------------------------------------------------------------------------------------------------
# Profiling


def test_profile_steps_writes_a_trace(tmp_path):
  assert tiny.get_config().profile_steps == ''
  profiler = run_control.Profiler('1,3', str(tmp_path))
  step_fn = jax.jit(lambda x: x @ x)
  x = jnp.ones((16, 16))
  with profiler:
    for step in range(5):
      profiler.before_step(step)
      x = step_fn(x)
      profiler.after_step(step + 1, x)
      assert profiler.active == (1 <= step < 2)
  assert glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert not run_control.Profiler('', str(tmp_path)).active
  with pytest.raises(ValueError):
    run_control.Profiler('5', str(tmp_path))
  with pytest.raises(ValueError):
    run_control.Profiler('3,3', str(tmp_path))


_SHOW_TUNABLES = (
  'import os, sys; from transformer_jax import hugepages; hugepages.reexec_if_wanted(); '
  'print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:])'
)


def test_programs_reexecute_once_with_the_huge_page_tunable_and_keep_pid_argv_and_other_tunables():
  """hugepages.py: the CLI's first act puts XLA's step buffers on transparent huge pages (glibc reads tunables only at
  start-up): the same process (pid, argv) comes back with the tunable added, once, other tunables kept; =0 opts out."""
  import subprocess
  from transformer_jax import hugepages

  base = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  base['PYTHONPATH'] = _REPO
  with pytest.MonkeyPatch.context() as patch:
    patch.delenv('GLIBC_TUNABLES', raising=False)
    if not hugepages.wanted():
      pytest.skip('this machine would not use the tunable (not Linux/glibc >= 2.35, or THP is not "madvise")')

  def run(**env):
    proc = subprocess.Popen(
      [sys.executable, '-c', _SHOW_TUNABLES, 'a b', '--c'], stdout=subprocess.PIPE, text=True, env={**base, **env}
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.startswith(f'{proc.pid} '), out  # the same process, exec'd in place
    return out.strip().splitlines()

  lines = run()
  assert len(lines) == 1, lines  # exec replaces the process: one output, no second re-exec
  assert lines[0].endswith(f" {hugepages.TUNABLE} ['a b', '--c']"), lines
  other = 'glibc.malloc.arena_max=2'
  assert run(GLIBC_TUNABLES=other)[0].endswith(f" {other}:{hugepages.TUNABLE} ['a b', '--c']")
  assert run(TRANSFORMER_JAX_HUGEPAGES='0')[0].endswith(" ['a b', '--c']")
  assert hugepages.TUNABLE not in run(TRANSFORMER_JAX_HUGEPAGES='0')[0]


def test_train_reexecutes_with_one_heap_and_the_tests_opt_out():
  """`train` (a long run) also gets one malloc heap that is never handed back (no page faults per step);
  TRANSFORMER_JAX_ONE_HEAP=0 (set by conftest for the tests' short runs) leaves only the huge pages."""
  import subprocess
  from transformer_jax import hugepages

  base = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'TRANSFORMER_JAX_ONE_HEAP')}
  base['PYTHONPATH'] = _REPO
  with pytest.MonkeyPatch.context() as patch:
    patch.delenv('GLIBC_TUNABLES', raising=False)
    patch.delenv('TRANSFORMER_JAX_ONE_HEAP', raising=False)
    expected = hugepages.tunables(one_heap=True)
  if not expected:
    pytest.skip('this machine would not use the tunables (not Linux/glibc >= 2.35)')
  show = _SHOW_TUNABLES.replace('reexec_if_wanted()', 'reexec_if_wanted(one_heap=True)')

  def tunables(**env):
    out = subprocess.run(
      [sys.executable, '-c', show], capture_output=True, text=True, env={**base, **env}, timeout=60, check=True
    ).stdout.split()
    return out[1].split(':') if len(out) > 2 else []

  assert tunables() == expected and set(hugepages.ONE_HEAP) <= set(expected)
  assert not set(hugepages.ONE_HEAP) & set(tunables(TRANSFORMER_JAX_ONE_HEAP='0'))
  assert tunables(GLIBC_TUNABLES='glibc.malloc.arena_max=4')[:1] == ['glibc.malloc.arena_max=4']  # the user's wins
  assert 'glibc.malloc.arena_max=1' not in tunables(GLIBC_TUNABLES='glibc.malloc.arena_max=4')
