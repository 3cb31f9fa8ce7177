"""TrainState, loss, THE train step, the eval step, and the run the CLI calls: setup -> steps -> final evaluation.

train_step(state, batch, rng) -> (state, metrics) is the one function that trains: jax.jit with the state's
NamedShardings in and out, the batch sharded over the mesh's batch axes, and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from transformer_jax import decode as decode_lib
from transformer_jax import evaluate as evaluate_lib
from transformer_jax import faults
from transformer_jax import metrics as metrics_lib
from transformer_jax import optim
from transformer_jax import parallel
from transformer_jax import paths
from transformer_jax import preemption as preemption_lib
from transformer_jax import run_control
from transformer_jax import train_state
from transformer_jax import workdir as workdir_lib
from transformer_jax import generate
from transformer_jax.model import LanguageModel, ModelConfig, Transformer, build_model

BATCH_KEYS = ('inputs', 'targets', 'inputs_segmentation', 'targets_segmentation', 'inputs_position',
              'targets_position')


# The state and its construction live in train_state.py (workdir.py uses them too); these names are the trainer's API.
TrainState = train_state.TrainState
model_config = train_state.model_config
dummy_batch = train_state.dummy_batch
state_logical_specs = train_state.state_logical_specs
create_sharded_state = train_state.create_sharded_state
abstract_state = train_state.abstract_state
count_params = train_state.count_params


# ---------------------------------------------------------------------------------------------------------------------
# Loss and steps


def cross_entropy_sums(logits, targets, weights, label_smoothing: float) -> dict[str, jax.Array]:
  """Sums over real tokens (weights = non-pad): label-smoothed loss, plain NLL, correct predictions, token count.

  The smoothed target q = (1 - ls) one_hot + ls / V (optax.smooth_labels) gives, in closed form,
  -sum_v q_v log p_v = (1 - ls) nll + ls (logsumexp(z) - mean_v z_v): no dense [tokens, V] one-hot or smoothed
  tensor (they were ~13% of the base model's step time on CPU). `correct` counts z_target >= max_v z.

  Logits may be bfloat16: they are read in float32 inside the reductions. Every [tokens, V] term is a reduction
  over V of an elementwise function of z (the target's logit too: a select against an iota, not a gather whose
  gradient would scatter into a zero [tokens, V] array), so XLA reads z in one or two fused passes, the backward
  pass is one elementwise fusion, and under vocabulary sharding each shard reduces its own slice.
  """
  z = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  is_target = jnp.arange(z.shape[-1], dtype=jnp.int32) == targets[..., None]
  target_logit = jnp.sum(jnp.where(is_target, z, 0.0), axis=-1)
  nll = lse - target_logit
  loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(z, axis=-1)) if label_smoothing \
      else nll
  correct = target_logit >= jnp.max(z, axis=-1)
  real = weights > 0  # where, not multiply: a non-finite value in a padding slot must not reach the sums
  return {'loss_sum': jnp.sum(jnp.where(real, loss * weights, 0.0)),
          'nll_sum': jnp.sum(jnp.where(real, nll * weights, 0.0)),
          'correct_sum': jnp.sum(jnp.where(real, correct * weights, 0.0)), 'weight_sum': jnp.sum(weights)}


def _apply(model, params, batch, *, deterministic: bool, rngs=None):
  if isinstance(model, LanguageModel):  # next-token targets only: documents packed in `targets`
    return model.apply({'params': params}, batch['targets'], batch.get('targets_segmentation'),
                       batch.get('targets_position'), deterministic=deterministic, rngs=rngs)
  return model.apply({'params': params}, batch['inputs'], batch['targets'], batch.get('inputs_segmentation'),
                     batch.get('targets_segmentation'), batch.get('inputs_position'), batch.get('targets_position'),
                     deterministic=deterministic, rngs=rngs)


def _weights(batch, pad_id: int):
  # Packed rows pad with 0, which is a real token (EOS) in a Marian vocabulary: the segmentation says what is real.
  if batch.get('targets_segmentation') is not None:
    return (batch['targets_segmentation'] > 0).astype(jnp.float32)
  return (batch['targets'] != pad_id).astype(jnp.float32)


def make_train_step(model: Transformer, tx, config):
  """Builds train_step(state, batch, rng) -> (state, metrics). Loss is normalised by real target tokens over the
  GLOBAL batch (sums inside, one division), so it does not depend on how the batch is split over devices or
  micro-batches."""
  label_smoothing = float(config.label_smoothing)
  accum = int(config.get('grad_accum_steps', 1))
  schedule = optim.make_schedule(config)
  pad_id = model.cfg.special_ids.pad

  def micro_sums(params, micro, rng):
    logits = _apply(model, params, micro, deterministic=False, rngs={'dropout': rng})
    sums = cross_entropy_sums(logits, micro['targets'], _weights(micro, pad_id), label_smoothing)
    return sums['loss_sum'], sums

  grad_fn = jax.value_and_grad(micro_sums, has_aux=True)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if accum == 1:
      (_, sums), grads = grad_fn(state.params, batch, rng)
    else:
      # Micro-batch i takes rows i::accum, so each one spans every device of a sharded batch; sums add up exactly.
      micro_batches = jax.tree.map(
          lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), batch)

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
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: Transformer, config):
  label_smoothing = float(config.label_smoothing)

  def eval_step(params, batch):
    logits = _apply(model, params, batch, deterministic=True)
    return cross_entropy_sums(logits, batch['targets'], _weights(batch, model.cfg.special_ids.pad), label_smoothing)

  return eval_step


def jit_train_step(model, tx, config, mesh, state_shardings):
  return jax.jit(make_train_step(model, tx, config),
                 in_shardings=(state_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def translate_ids(params, source_rows: np.ndarray, *, cfg: ModelConfig, mesh, batch_size: int, max_decode_len: int,
                  progress: bool = False, beam_size: int = 1, alpha: float = 0.6, penalty: str = 'gnmt'):
  """Translations of [N, S] source ids in batches (padded to batch_size, sharded over the batch axes): greedy, or
  beam search with beam_size > 1 and length penalty alpha.

  Every process passes the same rows and gets every translation back.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  outputs = []
  sharding = parallel.batch_sharding(mesh)
  starts = range(0, len(source_rows), batch_size)
  for start in tqdm(starts, disable=not progress or jax.process_index() != 0, unit='batch', desc='translating'):
    chunk = source_rows[start:start + batch_size]
    padded = np.full((batch_size,) + chunk.shape[1:], cfg.special_ids.pad, np.int32)  # batch-padding rows: all PAD
    padded[:len(chunk)] = chunk
    inputs = jax.make_array_from_callback(padded.shape, sharding, lambda idx, p=padded: p[idx])
    if beam_size > 1:
      tokens, _ = decode_lib.beam_search(params, inputs, cfg=cfg, beam_size=beam_size, alpha=alpha, penalty=penalty,
                                         max_decode_len=max_decode_len)
    else:
      tokens = decode_lib.greedy_decode(params, inputs, cfg=cfg, max_decode_len=max_decode_len)
    outputs.append(np.asarray(multihost_utils.process_allgather(tokens, tiled=True))[:len(chunk)])
  return np.concatenate(outputs) if outputs else np.zeros((0, max_decode_len), np.int32)


def evaluate_loss(eval_step, params, batches, mesh) -> dict[str, float]:
  totals: dict[str, float] = {}
  for batch in batches:
    sums = eval_step(params, parallel.global_batch(batch, mesh))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  denom = max(totals.get('weight_sum', 0.0), 1.0)
  return {'eval_loss': totals.get('loss_sum', 0.0) / denom, 'eval_nll': totals.get('nll_sum', 0.0) / denom,
          'eval_accuracy': totals.get('correct_sum', 0.0) / denom}


# ---------------------------------------------------------------------------------------------------------------------
# The run: setup -> steps -> final evaluation. Metrics files, signals and between-step checks have their own modules;
# their names stay importable from here.

Preempted = preemption_lib.Preempted
NonFiniteLossError = run_control.NonFiniteLossError
TrainingStalledError = run_control.TrainingStalledError
StallDetector = run_control.StallDetector
Profiler = run_control.Profiler
_stop_if_not_finite = run_control.stop_if_not_finite
MetricsWriter = metrics_lib.MetricsWriter
read_metrics = metrics_lib.read_metrics
plot_curves = metrics_lib.plot_curves


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _fmt(metrics: dict[str, float]) -> str:
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in metrics.items())


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains config in workdir (resuming from its newest good checkpoint) and returns the final metrics.

  SIGTERM/SIGINT at any phase: see faults.SIGNALS_HELP; the result then holds 'preempted'. A run already at (or past)
  num_train_steps trains nothing and writes nothing: it returns the step and the held-out metrics only."""
  with preemption_lib.Preemption() as preemption:
    try:
      return _train_and_evaluate(config, workdir, preemption)
    except Exception as e:  # pylint: disable=broad-except
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
    except Preempted:
      return preemption_lib.stop_preempted(preemption)


def _train_and_evaluate(config, workdir: str, preemption: preemption_lib.Preemption) -> dict[str, float]:
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  clock = run_control.PhaseClock()
  workdir = paths.resolve(workdir)
  paths.makedirs(workdir)
  mesh = _checked_mesh(config)
  tx = optim.make_optimizer(config)
  shardings, abstract = _checked_resumable(config, workdir, mesh, tx)  # before any data is prepared or written
  data = pipeline.build_datasets(config, workdir, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  clock.mark('data (text, tokenizer, shards, held-out set)')
  if data.tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'the tokenizer has {data.tokenizer.vocab_size} pieces but model.vocab_size is '
                     f'{config.model.vocab_size}')
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
    plot_curves(workdir, paths.join(workdir, 'curves.png'))
    clock.report()
  return final


def _checked_mesh(config):
  mesh = parallel.make_mesh(config.mesh)
  if config.batch_size % (mesh.shape['data'] * mesh.shape['fsdp']):
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the batch axes '
                     f"data*fsdp={mesh.shape['data'] * mesh.shape['fsdp']}")
  parallel.process_batch_rows(mesh, config.batch_size)  # each process must own its own rows: fail before loading data
  return mesh


def _checked_resumable(config, workdir: str, mesh, tx):
  """The state's shardings and abstract shape; refuses a checkpoint of another architecture or vocabulary in
  workdir before anything is written there (shapes do not depend on the tokenizer's special ids)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    model = build_model(model_config(config))
    shardings = parallel.logical_shardings(state_logical_specs(model, tx, config), mesh)
    abstract = abstract_state(model, tx, config, shardings)
  workdir_lib.Workdir(workdir).check_resumable(abstract)  # outside the mesh: its agreement is a host collective
  return shardings, abstract


@dataclasses.dataclass
class _Run:
  """What setup hands to the steps and the final evaluation."""
  config: Any
  workdir: str
  mesh: Any
  data: Any
  state: Any
  start_step: int
  train_step: Callable
  step_rng: Any
  checkpointer: Any
  evaluate: '_Evaluator'
  is_chief: bool
  clock: 'run_control.PhaseClock | None' = None


def _setup(config, workdir, mesh, tx, shardings, abstract, data, preemption) -> _Run:
  """The model, the state (restored, or born sharded), the jitted step and the evaluator. Under the mesh context."""
  is_chief = jax.process_index() == 0
  cfg = model_config(config, special_ids=data.tokenizer.special_ids)
  model = build_model(cfg)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  checkpointer = workdir_lib.Workdir(workdir).checkpointer(keep=config.keep_checkpoints,
                                                           async_save=config.get('async_checkpointing', True))
  preemption.checkpointer = checkpointer
  if checkpointer.latest_step() is not None:
    state, data_state, restored_step = checkpointer.restore(abstract)
    data.train.set_state(data_state)
    if is_chief:
      print(f'resumed from step {restored_step}', flush=True)
  else:
    state, _ = create_sharded_state(model, tx, config, mesh, init_rng)
  if is_chief:
    logging.info('%d parameters; mesh %s', count_params(state.params), dict(mesh.shape))
  return _Run(config=config, workdir=workdir, mesh=mesh, data=data, state=state,
              start_step=int(jax.device_get(state.step)),
              train_step=jit_train_step(model, tx, config, mesh, shardings), step_rng=step_rng,
              checkpointer=checkpointer, evaluate=_Evaluator(config, workdir, mesh, cfg, model, data),
              is_chief=is_chief)


class _Evaluator:
  """Held-out loss (a language model: perplexity, bits per byte, samples), then greedy translations of the first
  eval_translate_examples held-out sources scored against their references (BLEU, chrF, exact match)."""

  def __init__(self, config, workdir: str, mesh, cfg: ModelConfig, model, data):
    from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    self.config, self.workdir, self.mesh, self.cfg, self.data = config, workdir, mesh, cfg, data
    self.is_chief = jax.process_index() == 0
    self.eval_step = jax.jit(make_eval_step(model, config))
    lengths = dict(batch_size=config.batch_size // jax.process_count(), inputs_length=config.packed_inputs_length,
                   targets_length=config.packed_targets_length)
    self.is_lm = cfg.kind == 'decoder'
    make_batches = data.eval_batches if self.is_lm else functools.partial(pipeline.eval_batches, data.eval_ids)
    self.batches = make_batches(**lengths)
    self.num_batches = parallel.max_over_processes(len(self.batches))  # every process runs the same eval steps
    if len(self.batches) < self.num_batches:
      self.batches = make_batches(num_batches=self.num_batches, **lengths)
    # BLEU: translate_ids wants the same rows on every process, but each holds every process_count-th held-out
    # pair: gather them all (original order), so every process translates and scores the same set.
    eval_pairs = parallel.gather_process_shards(data.eval_pairs)
    self.num_bleu = min(len(eval_pairs), int(config.get('eval_translate_examples', 1000)))
    self.sources = evaluate_lib.encode_sources(data.tokenizer, [s for s, _ in eval_pairs[:self.num_bleu]],
                                               config.max_length)
    self.references = [t for _, t in eval_pairs[:self.num_bleu]]

  def __call__(self, params, step: int, write: bool = True) -> dict[str, float]:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    config = self.config
    if self.is_chief:  # stderr, with the bars: stdout keeps the metrics lines
      tqdm.write(f'evaluating step {step}: held-out loss over {self.num_batches} batches'
                 + (f', then greedy decoding of {self.num_bleu} sentences' if self.num_bleu else ''), file=sys.stderr)
    results = evaluate_loss(self.eval_step, params, self.batches, self.mesh)
    if self.is_lm:
      results.update(evaluate_lib.lm_metrics(results['eval_nll'], self.data.eval_tokens, self.data.eval_bytes))
      self._samples(params, step)
    if self.num_bleu:
      tokens = translate_ids(params, self.sources, cfg=self.cfg, mesh=self.mesh,
                             batch_size=int(config.get('eval_translate_batch_size', 256)),
                             max_decode_len=config.max_length, progress=self.is_chief)
      hypotheses = evaluate_lib.decode_outputs(self.data.tokenizer, tokens)
      results.update(evaluate_lib.text_metrics(hypotheses, self.references, config.get('bleu_tokenize', '13a')))
      if self.is_chief and write:
        paths.write_text_atomic(paths.join(self.workdir, f'eval_hypotheses_{step}.txt'), '\n'.join(hypotheses) + '\n')
    return results

  def _samples(self, params, step: int) -> None:
    """A language model's samples of config.lm_sample_prompts, in the run's output."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    prompts = list(self.config.get('lm_sample_prompts', ()))
    if not prompts:
      return
    texts = generate.generate_texts(params, self.cfg, self.data.tokenizer, prompts,
                                    max_new_tokens=int(self.config.get('lm_sample_tokens', 64)), temperature=0.8,
                                    top_p=0.95, seed=step)
    if self.is_chief:
      for prompt, text in zip(prompts, texts):
        tqdm.write(f'sample step={step} (temperature 0.8, top_p 0.95):\n{prompt}{text}\n' + '-' * 40)


def _evaluate_finished(run: _Run) -> dict[str, float]:
  """A run already at (or past) num_train_steps: the held-out metrics of its checkpoint, nothing written."""
  if run.is_chief:
    print(f'the run is already complete at step {run.start_step} (num_train_steps={run.config.num_train_steps}); '
          'held-out metrics of that checkpoint follow (raise --config.num_train_steps to train on)', flush=True)
  final = {'step': run.start_step, **run.evaluate(run.state.params, run.start_step, write=False)}
  run.checkpointer.close()
  return final


def _train_steps(run: _Run, writer, preemption) -> dict[str, float]:
  """Steps from run.start_step to num_train_steps: logs, evaluates, checkpoints; stops after a signal (saved)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
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
  stall = StallDetector(int(config.get('stall_patience_steps', 0)), int(config.get('warmup_steps', 0)))
  preemption.phase = 'train'
  with Profiler(config.get('profile_steps', ''), run.workdir) as profiler:
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
        _stop_if_not_finite(last_train, step - 1, checkpointer)
        throughput.tokens += last_train['tokens'] if pending_counted else 0.0
      pending, pending_counted = metrics, not first
      progress.update(1)
      if step % log_every == 0 or step == num_steps:
        last_train['tokens_per_s'] = throughput.rate()
        progress.set_postfix(loss=f"{last_train.get('loss', float('nan')):.3f}",
                             tok_s=f"{last_train['tokens_per_s']:.0f}")
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
        _stop_if_not_finite(last_train, step, checkpointer, state)
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
