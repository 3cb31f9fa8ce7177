"""The schedule, the loss, and the one train step: it learns, and its normalisation is by real target tokens."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from transformer_jax.inference import evaluation
from transformer_jax.training import optim
from transformer_jax import parallel
from transformer_jax.training import run_control
from transformer_jax.training import train as train_lib
from transformer_jax.training import train_state
from transformer_jax.model.transformer import Transformer
import helpers


def small_config(**overrides):
  config = tiny.get_config()
  config.model.update(num_layers=1, d_model=32, num_heads=4, d_ff=64, vocab_size=32, dropout_rate=0.0)
  config.update(
    max_length=8,
    packed_inputs_length=8,
    packed_targets_length=8,
    batch_size=8,
    label_smoothing=0.1,
    warmup_steps=10,
    learning_rate=2.0,
  )
  config.update(overrides)
  return config


@pytest.mark.parametrize('step', [1, 10, 399, 400, 401, 4000, 100000])
def test_schedule_matches_the_papers_formula(step):
  d_model, warmup, scale = 512, 400, 0.5
  schedule = optim.paper_schedule(d_model, warmup, scale)
  expected = scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
  assert float(schedule(step - 1)) == pytest.approx(expected, rel=1e-5)  # optax counts updates from 0


@pytest.mark.parametrize('num_steps,fraction', [(450, 1 / 3), (8, 1 / 3), (1000, 0.05), (100, 0.0)])
def test_cooldown_ramps_the_schedule_linearly_to_zero_over_the_last_fraction(num_steps, fraction):
  config = small_config(lr_schedule='rsqrt', num_train_steps=num_steps, cooldown_fraction=fraction, warmup_steps=20)
  cooled, plain = optim.make_schedule(config), optim.paper_schedule(32, 20, config.learning_rate)
  cooldown = round(fraction * num_steps)
  counts = np.arange(num_steps + 5)
  got = np.array([float(cooled(c)) for c in counts])
  want = np.array([float(plain(c)) for c in counts])
  if cooldown < 1:
    np.testing.assert_allclose(got, want, rtol=1e-6)
    return
  ramp = np.clip((num_steps - counts) / cooldown, 0.0, 1.0)
  np.testing.assert_allclose(got, want * ramp, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(got[: num_steps - cooldown + 1], want[: num_steps - cooldown + 1], rtol=1e-6)
  assert np.all(got[num_steps:] == 0.0) and np.all(got[:num_steps] > 0.0)
  assert np.all(np.diff(got[num_steps - cooldown :]) <= 0.0)  # falls monotonically once it starts


def test_phase_clock_reports_each_phase_in_order_on_one_stderr_line(capsys):
  clock = run_control.PhaseClock()
  sum(range(300_000))
  clock.mark('data').mark('steps 2..8')
  clock.report()
  err = capsys.readouterr().err
  assert re.fullmatch(r'time: data \d+\.\d s \(cpu \d+\.\d s\); steps 2\.\.8 \d+\.\d s \(cpu \d+\.\d s\)\n', err), err
  assert all(wall >= 0 and cpu >= 0 for _, wall, cpu in clock.phases)


def test_label_smoothing_matches_direct_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
  targets = rng.integers(1, 11, (2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  ls = 0.1
  sums = evaluation.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), ls)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  q = np.full_like(logits, ls / 11)
  np.put_along_axis(q, targets[..., None], 1 - ls + ls / 11, axis=-1)
  loss = -(q * log_probs).sum(-1)
  assert float(sums['loss_sum']) == pytest.approx(float((loss * weights).sum()), rel=1e-5)
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  assert float(sums['nll_sum']) == pytest.approx(float((nll * weights).sum()), rel=1e-5)
  assert float(sums['weight_sum']) == weights.sum()


def _setup(config, devices=None):
  mesh = parallel.make_mesh(config.mesh, devices=devices or jax.devices()[:1])
  model = Transformer(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  state, shardings = train_state.create_sharded_state(model, tx, config, mesh, jax.random.key(0))
  return mesh, model, tx, state, shardings


def _batch(config, seed=0, pad_from=None):
  rng = np.random.default_rng(seed)
  shape = (config.batch_size, config.packed_targets_length)
  inputs = rng.integers(4, config.model.vocab_size, shape).astype(np.int32)
  targets = np.roll(inputs, 1, axis=1)  # a learnable function of the input
  if pad_from is not None:
    targets[:, pad_from:] = 0
  return {'inputs': inputs, 'targets': targets}


def test_small_model_overfits_a_few_batches():
  config = small_config(lr_schedule='constant', learning_rate=3e-3)
  mesh, model, tx, state, shardings = _setup(config)
  step = train_lib.jit_train_step(model, tx, config, mesh, shardings)
  batches = [parallel.global_batch(_batch(config, seed=i), mesh) for i in range(2)]
  first = None
  for i in range(150):
    state, metrics = step(state, batches[i % 2], jax.random.key(1))
    first = first if first is not None else float(metrics['loss'])
  # label smoothing 0.1 over 32 classes bounds the loss below by its entropy (~0.5); start is ~ln(32)=3.5
  assert first > 3.0
  assert float(metrics['nll']) < 0.2, float(metrics['nll'])
  assert float(metrics['accuracy']) > 0.97


def test_loss_is_normalised_by_real_target_tokens():
  """Padding positions add nothing: the same real tokens give the same loss whatever the padding."""
  config = small_config()
  _, model, _, state, _ = _setup(config)
  eval_step = jax.jit(evaluation.make_eval_step(model, config))
  batch = _batch(config, pad_from=5)
  sums = eval_step(state.params, batch)
  assert float(sums['weight_sum']) == config.batch_size * 5
  wider = {k: np.pad(v, ((0, 0), (0, 4))) for k, v in batch.items()}
  sums_wide = eval_step(state.params, wider)
  np.testing.assert_allclose(float(sums['loss_sum']), float(sums_wide['loss_sum']), rtol=1e-5)


def test_train_step_updates_step_and_reports_finite_metrics():
  config = small_config(grad_clip_norm=1.0)
  mesh, model, tx, state, shardings = _setup(config)
  step = train_lib.jit_train_step(model, tx, config, mesh, shardings)
  new_state, metrics = step(state, parallel.global_batch(_batch(config), mesh), jax.random.key(0))
  assert int(new_state.step) == 1
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics['learning_rate']) == pytest.approx(float(optim.make_schedule(config)(0)))


def test_stall_detector_fails_loudly_on_a_plateau_and_not_on_progress():
  falling = run_control.StallDetector(patience=100, warmup_steps=50)
  for step in range(0, 1000, 10):
    falling.update(step, 6.0 * 0.997**step + 0.5)
  stuck = run_control.StallDetector(patience=100, warmup_steps=50)
  with pytest.raises(run_control.TrainingStalledError, match='stopped falling'):
    for step in range(0, 1000, 10):
      stuck.update(step, 3.0 + 0.001 * np.sin(step))
  off = run_control.StallDetector(patience=0, warmup_steps=50)
  for step in range(0, 1000, 10):
    off.update(step, 3.0)


def test_default_config_learns_at_its_learning_rate(tmp_path):
  """configs/tiny.py as shipped (model, schedule, learning rate, packing) drives the held-out loss well down in 60
  steps, run as a user runs it (the README's command: one process, default XLA flags, the `train` malloc heap of
  hugepages.py).

  The bounds (held-out loss < 4.4, token accuracy > 0.33, from ln(512) ~ 6.2 at the start) sit between what the
  shipped rate reaches at step 60 and what a tenth of it reaches (benchmarks/RESULTS.md has both runs), so a default
  that learns at a tenth of the rate, or not at all, fails. With 200 warmup steps the peak rate is never reached this early: the default job's own figures guard
  the rest of the schedule. Decoding is left to the final evaluation's other tests (eval_translate_examples=0).
  """
  # cooldown_fraction=0: a 60-step run would otherwise cool down from step 40, unlike the default job's first 60.
  # 60 steps of 32 rows use ~11k pairs: 12k leave a margin.
  overrides = dict(
    num_train_steps=60,
    cooldown_fraction=0.0,
    max_train_examples=12000,
    max_eval_examples=64,
    eval_translate_examples=0,
    eval_every_steps=1000,
    checkpoint_every_steps=1000,
    tokenizer_train_sentences=12000,
  )
  # mesh.num_devices=1: the same math as 8-way data parallel (test_parallel), without 8 simulated devices.
  args = [f'--config.{k}={v}' for k, v in overrides.items()] + ['--config.mesh.num_devices=1']
  result = helpers.cli(
    'train',
    f'--workdir={tmp_path / "run"}',
    *args,
    timeout=900,
    env=helpers.cli_env(TRANSFORMER_JAX_ONE_HEAP='1', XLA_FLAGS=''),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith('final: step=60 '), result.stdout[-2000:]
  final = {k: float(v) for k, v in (kv.split('=') for kv in last[len('final: ') :].split())}
  assert final['eval_loss'] < 4.4, final
  assert final['eval_accuracy'] > 0.33, final


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg', 'unsafe_rbg'])
def test_dropout_rng_impl_reads_the_config(impl):
  assert train_lib.dropout_rng_impl(small_config(rng_impl=impl)) == impl


def test_dropout_rng_impl_is_threefry_for_a_config_without_the_key():
  assert train_lib.dropout_rng_impl(ml_collections.ConfigDict({'seed': 0})) == 'threefry2x32'


def test_dropout_rng_impl_refuses_an_unknown_name():
  with pytest.raises(ValueError, match='rng_impl'):
    train_lib.dropout_rng_impl(small_config(rng_impl='philox'))


@pytest.mark.parametrize('impl', ['rbg', 'unsafe_rbg'])
def test_rbg_dropout_step_is_a_function_of_the_threefry_key(impl):
  """The step's key stays threefry2x32 (what a run derives from config.seed again on resume); under rbg the same
  key gives the same step bit for bit, another key other dropout masks, and the masks are not threefry's."""
  config = small_config(lr_schedule='constant', learning_rate=3e-3)
  config.model.dropout_rate = 0.3
  mesh, model, tx, state, shardings = _setup(config)
  batch = parallel.global_batch(_batch(config), mesh)
  host = jax.device_get(state)

  def one_step(rng_impl, key):
    fresh = jax.device_put(host, shardings)
    config.rng_impl = rng_impl
    step = train_lib.jit_train_step(model, tx, config, mesh, shardings)
    new_state, metrics = step(fresh, batch, key)
    return jax.device_get(new_state.params), float(metrics['loss'])

  params, loss = one_step(impl, jax.random.key(1))
  again, loss_again = one_step(impl, jax.random.key(1))
  other, other_loss = one_step(impl, jax.random.key(2))
  threefry, threefry_loss = one_step('threefry2x32', jax.random.key(1))
  assert np.isfinite(loss) and loss == loss_again
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert other_loss != loss and threefry_loss != loss
  leaves = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
  assert not np.array_equal(leaves(params), leaves(other))
  assert not np.array_equal(leaves(params), leaves(threefry))
