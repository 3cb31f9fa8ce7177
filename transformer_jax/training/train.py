"""THE train step and the run the CLI calls: setup -> steps -> final evaluation.

train_step(state, batch, rng) -> (state, metrics) is the one function that trains: jax.jit with the state's
NamedShardings in and out, the batch sharded over the mesh's batch axes, and the state donated.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import linen as nn

from transformer_jax.inference import evaluation
from transformer_jax.storage import layout as layout_lib
from transformer_jax.training import checkpoint as checkpoint_lib
from transformer_jax.training import faults
from transformer_jax.training import metrics as metrics_lib
from transformer_jax.training import optim
from transformer_jax import parallel
from transformer_jax.storage import paths
from transformer_jax.training import preemption as preemption_lib
from transformer_jax.training import run_control
from transformer_jax.training import train_state
from transformer_jax.model.transformer import Transformer, build_model

BATCH_KEYS = ('inputs', 'targets', 'inputs_segmentation', 'targets_segmentation', 'inputs_position', 'targets_position')


# ---------------------------------------------------------------------------------------------------------------------
# Loss and steps


RNG_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')


def dropout_rng_impl(config) -> str:
  """The PRNG that draws the step's dropout bits (config.rng_impl, default threefry2x32). On TPU, rbg draws them
  with the chip's RngBitGenerator instead of threefry's element-wise rounds, but its bits are written to HBM as u32
  arrays where threefry's fuse into their consumers: the per-operation estimate charges rbg
  more HBM traffic, libtpu's cycle counts charge threefry more vector work."""
  impl = config.get('rng_impl', 'threefry2x32')
  if impl not in RNG_IMPLS:
    raise ValueError(f'rng_impl={impl!r}; expected one of {", ".join(RNG_IMPLS)}')
  return impl


def as_rng_impl(key, impl: str):
  """key (threefry2x32) as a key of `impl`: its two words repeated to the rbg key's four, as rbg's own seeding lays
  out a threefry seed, so the step's key still fixes the stream and nothing about the key saved or passed changes."""
  if impl == 'threefry2x32':
    return key
  data = jax.random.key_data(key)
  return jax.random.wrap_key_data(jnp.concatenate([data, data], axis=-1), impl=impl)


def make_train_step(model: Transformer, tx, config, rng_impl: str = 'threefry2x32'):
  """Builds train_step(state, batch, rng) -> (state, metrics). Loss is normalised by real target tokens over the
  GLOBAL batch (sums inside, one division), so it does not depend on how the batch is split over devices or
  micro-batches. rng is a threefry2x32 key; the dropout bits come from `rng_impl` (see dropout_rng_impl)."""
  label_smoothing = float(config.label_smoothing)
  accum = int(config.get('grad_accum_steps', 1))
  schedule = optim.make_schedule(config)
  pad_id = model.cfg.special_ids.pad

  def micro_sums(params, micro, rng):
    rngs = {'dropout': as_rng_impl(rng, rng_impl)}
    logits = evaluation.apply_model(model, params, micro, deterministic=False, rngs=rngs)
    sums = evaluation.cross_entropy_sums(
      logits, micro['targets'], evaluation.target_weights(micro, pad_id), label_smoothing
    )
    return sums['loss_sum'], sums

  grad_fn = jax.value_and_grad(micro_sums, has_aux=True)

  def train_step(state: train_state.TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if accum == 1:
      (_, sums), grads = grad_fn(state.params, batch, rng)
    else:
      # Micro-batch i takes rows i::accum, so each one spans every device of a sharded batch; sums add up exactly.
      micro_batches = jax.tree.map(
        lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), batch
      )

      def body(carry, xs):
        grads_acc, sums_acc = carry
        micro, i = xs
        (_, sums), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      zero_sums = {k: jnp.zeros((), jnp.float32) for k in ('loss_sum', 'nll_sum', 'correct_sum', 'weight_sum')}
      (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (micro_batches, jnp.arange(accum)))
    denom = jnp.maximum(sums['weight_sum'], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      'loss': sums['loss_sum'] / denom,
      'nll': sums['nll_sum'] / denom,
      'accuracy': sums['correct_sum'] / denom,
      'tokens': sums['weight_sum'],
      'grad_norm': optax.tree.norm(grads),
      'learning_rate': schedule(state.step),
    }
    return train_state.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def jit_train_step(model, tx, config, mesh, state_shardings):
  return jax.jit(
    make_train_step(model, tx, config, dropout_rng_impl(config)),
    in_shardings=(state_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
    out_shardings=(state_shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )


# ---------------------------------------------------------------------------------------------------------------------
# The run: setup -> steps -> final evaluation. Metrics files, signals and between-step checks have their own modules.


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _fmt(metrics: dict[str, float]) -> str:
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in metrics.items())


def train_and_evaluate(config, workdir: str | layout_lib.WorkdirLayout) -> dict[str, float]:
  """Trains config in workdir (resuming from its newest good checkpoint) and returns the final metrics. workdir: its
  layout (storage/layout.py), or a path resolved here.

  SIGTERM/SIGINT at any phase: see faults.SIGNALS_HELP; the result then holds 'preempted'. A run already at (or past)
  num_train_steps trains nothing and writes nothing: it returns the step and the held-out metrics only."""
  with preemption_lib.Preemption() as preemption:
    try:
      return _train_and_evaluate(config, workdir, preemption)
    except Exception as e:
      # Preempted raised inside a C++ callback (e.g. SentencePiece's trainer reading its sentences) comes back
      # wrapped in the library's RuntimeError: after a signal in these phases, any exception is the preemption.
      if not (preemption.requested and preemption.phase in ('setup', 'final_eval')):
        if isinstance(e, OSError) and faults.is_disk_full(e) and preemption.checkpointer is not None:
          # A full disk fails a save in flight too, and its error (what needs the space, where training resumes)
          # says more than a metrics or hypotheses write's: wait for the save, which raises its failure.
          preemption.checkpointer.wait()
        raise
      logging.info('stopping after a signal; the exception it became: %r', e)
      return preemption_lib.stop_preempted(preemption)
    except preemption_lib.Preempted:
      return preemption_lib.stop_preempted(preemption)


def _train_and_evaluate(
  config, workdir: layout_lib.WorkdirLayout | str, preemption: preemption_lib.Preemption
) -> dict[str, float]:
  from transformer_jax.data import pipeline  # (TensorFlow is slow to import)

  clock = run_control.PhaseClock()
  workdir = layout_lib.of(workdir)
  paths.makedirs(workdir.root)
  mesh = _checked_mesh(config)
  tx = optim.make_optimizer(config)
  shardings, abstract = _checked_resumable(config, workdir, mesh, tx)  # before any data is prepared or written
  data = pipeline.build_datasets(config, workdir, process_index=jax.process_index(), process_count=jax.process_count())
  clock.mark('data (text, tokenizer, shards, held-out set)')
  if data.tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
      f'the tokenizer has {data.tokenizer.vocab_size} pieces but model.vocab_size is {config.model.vocab_size}'
    )
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    run = _setup(config, workdir, mesh, tx, shardings, abstract, data, preemption)
    run.clock = clock.mark('state and evaluator')
    if run.start_step >= int(config.num_train_steps):  # a finished run: no step to run; the workdir is not written
      return _evaluate_finished(run)
    writer = metrics_lib.MetricsWriter(workdir, enabled=run.is_chief, start_step=run.start_step)
    final = _train_steps(run, writer, preemption)
    if 'preempted' in final:
      return final
    final = _final_evaluation(run, final, writer, preemption)
    clock.mark('final evaluation')
  if run.is_chief:
    metrics_lib.plot_curves(workdir, workdir.curves)
    clock.report()
  return final


def _checked_mesh(config):
  mesh = parallel.make_mesh(config.mesh)
  if config.batch_size % (mesh.shape['data'] * mesh.shape['fsdp']):
    raise ValueError(
      f'batch_size={config.batch_size} is not divisible by the batch axes '
      f'data*fsdp={mesh.shape["data"] * mesh.shape["fsdp"]}'
    )
  parallel.process_batch_rows(mesh, config.batch_size)  # each process must own its own rows: fail before loading data
  return mesh


def _checked_resumable(config, workdir: layout_lib.WorkdirLayout, mesh, tx):
  """The state's shardings and abstract shape; refuses a checkpoint of another architecture or vocabulary in
  workdir before anything is written there (shapes do not depend on the tokenizer's special ids)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    model = build_model(train_state.model_config(config))
    shardings = parallel.logical_shardings(train_state.state_logical_specs(model, tx, config), mesh)
    abstract = train_state.abstract_state(model, tx, config, shardings)
  checkpoint_lib.check_resumable(workdir, abstract)  # outside the mesh: its agreement is a host collective
  return shardings, abstract


@dataclasses.dataclass
class _Run:
  """What setup hands to the steps and the final evaluation."""

  config: Any
  workdir: layout_lib.WorkdirLayout
  mesh: Any
  data: Any
  state: Any
  start_step: int
  train_step: Callable
  step_rng: Any
  checkpointer: Any
  evaluate: evaluation.Evaluator
  is_chief: bool
  clock: run_control.PhaseClock | None = None


def _setup(config, workdir, mesh, tx, shardings, abstract, data, preemption) -> _Run:
  """The model, the state (restored, or born sharded), the jitted step and the evaluator. Under the mesh context."""
  is_chief = jax.process_index() == 0
  cfg = train_state.model_config(config, special_ids=data.tokenizer.special_ids)
  model = build_model(cfg)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  checkpointer = checkpoint_lib.Checkpointer(
    workdir, keep=config.keep_checkpoints, async_save=config.get('async_checkpointing', True)
  )
  preemption.checkpointer = checkpointer
  if checkpointer.latest_step() is not None:
    state, data_state, restored_step = checkpointer.restore(abstract)
    data.train.set_state(data_state)
    if is_chief:
      print(f'resumed from step {restored_step}', flush=True)
  else:
    state, _ = train_state.create_sharded_state(model, tx, config, mesh, init_rng)
  if is_chief:
    logging.info('%d parameters; mesh %s', train_state.count_params(state.params), dict(mesh.shape))
  return _Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    data=data,
    state=state,
    start_step=int(jax.device_get(state.step)),
    train_step=jit_train_step(model, tx, config, mesh, shardings),
    step_rng=step_rng,
    checkpointer=checkpointer,
    evaluate=evaluation.Evaluator(config, workdir, mesh, cfg, model, data),
    is_chief=is_chief,
  )


def _evaluate_finished(run: _Run) -> dict[str, float]:
  """A run already at (or past) num_train_steps: the held-out metrics of its checkpoint, nothing written."""
  if run.is_chief:
    print(
      f'the run is already complete at step {run.start_step} (num_train_steps={run.config.num_train_steps}); '
      'held-out metrics of that checkpoint follow (raise --config.num_train_steps to train on)',
      flush=True,
    )
  final = {'step': run.start_step, **run.evaluate(run.state.params, run.start_step, write=False)}
  run.checkpointer.close()
  return final


def _train_steps(run: _Run, writer, preemption) -> dict[str, float]:
  """Steps from run.start_step to num_train_steps: logs, evaluates, checkpoints; stops after a signal (saved)."""
  from tqdm import tqdm

  config, checkpointer, is_chief, state = run.config, run.checkpointer, run.is_chief, run.state
  num_steps, log_every = int(config.num_train_steps), int(config.get('log_every_steps', 50))
  last_train: dict[str, float] = {}
  # The bar starts after the first step, which compiles: its rate and ETA are then the steps' own from the start.
  progress = tqdm(total=num_steps, initial=run.start_step, disable=True)
  if is_chief:
    print('compiling the train step (the first step waits for it) ...', file=sys.stderr, flush=True)
  compile_start, throughput = time.time(), run_control.Throughput()
  step = run.start_step
  pending, pending_counted = None, True
  stall = run_control.StallDetector(int(config.get('stall_patience_steps', 0)), int(config.get('warmup_steps', 0)))
  preemption.phase = 'train'
  with run_control.Profiler(config.get('profile_steps', ''), run.workdir) as profiler:
    while step < num_steps:
      profiler.before_step(step)
      state, metrics = run.train_step(state, parallel.global_batch(next(run.data.train), run.mesh), run.step_rng)
      step += 1
      profiler.after_step(step, state)
      first = step == run.start_step + 1  # it compiled
      if first:
        jax.block_until_ready(metrics)
        if is_chief:
          print(f'compiled and ran the first step in {time.time() - compile_start:.1f} s', file=sys.stderr, flush=True)
          progress = tqdm(total=num_steps, initial=step - 1, dynamic_ncols=True, unit='step')
        run.clock.mark('first step (compiles)')
        throughput.restart()  # tokens/s from here: the first step's tokens are not counted
      # Read the previous step's metrics while this one runs: the host never waits on the device here.
      if pending is not None:
        last_train = {k: float(v) for k, v in jax.device_get(pending).items()}
        run_control.stop_if_not_finite(last_train, step - 1, checkpointer)
        throughput.tokens += last_train['tokens'] if pending_counted else 0.0
      pending, pending_counted = metrics, not first
      progress.update(1)
      if step % log_every == 0 or step == num_steps:
        last_train['tokens_per_s'] = throughput.rate()
        progress.set_postfix(
          loss=f'{last_train.get("loss", float("nan")):.3f}', tok_s=f'{last_train["tokens_per_s"]:.0f}'
        )
        writer.write(step, {k: v for k, v in last_train.items() if k != 'tokens'})
        if 'loss' in last_train:
          stall.update(step, last_train['loss'])
      if step % config.eval_every_steps == 0 and step != num_steps:
        last_eval = run.evaluate(state.params, step)
        writer.write(step, last_eval)
        throughput.restart()  # tokens/s counts training steps, not the evaluation
        if is_chief:  # tqdm.write prints even where the bar is disabled
          progress.write(f'eval step={step} {_fmt(last_eval)}')
      checkpointer.check_for_errors()  # a background save that failed stops the run at the next step
      stop = preemption.should_stop(step)
      if step % config.checkpoint_every_steps == 0 or step == num_steps or stop:
        last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
        pending = None
        run_control.stop_if_not_finite(last_train, step, checkpointer, state)
        checkpointer.save(step, state, run.data.train.get_state(), _config_json(config), force=True)
      if stop:
        checkpointer.wait()
        progress.close()
        if is_chief:
          print(f'preempted: saved checkpoint at step {step} in {checkpointer.directory}', flush=True)
        return {'step': step, 'preempted': 1.0}
  progress.close()
  run.clock.mark(f'steps {run.start_step + 2}..{num_steps}' if num_steps > run.start_step + 1 else 'no more steps')
  run.state = state
  return {'step': step, 'loss': last_train.get('loss', float('nan'))}


def _final_evaluation(run: _Run, final: dict[str, float], writer, preemption) -> dict[str, float]:
  """The held-out metrics of the last step while its checkpoint saves in the background; then the commit."""
  preemption.phase = 'final_eval'
  final = {**final, **run.evaluate(run.state.params, final['step'])}
  writer.write(final['step'], {k: v for k, v in final.items() if k not in ('step', 'loss')})  # loss was logged already
  preemption.phase = 'commit'
  run.checkpointer.wait()
  run.checkpointer.close()
  return final
