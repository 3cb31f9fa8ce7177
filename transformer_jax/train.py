"""TrainState, loss, THE train step, the eval step, and the loop the CLI calls.

train_step(state, batch, rng) -> (state, metrics) is the one function that trains: jax.jit with the state's
NamedShardings in and out, the batch sharded over the mesh's batch axes, and the state donated.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from transformer_jax import checkpoint as checkpoint_lib
from transformer_jax import decode as decode_lib
from transformer_jax import evaluate as evaluate_lib
from transformer_jax import faults
from transformer_jax import optim
from transformer_jax import parallel
from transformer_jax import paths
from transformer_jax import train_state
from transformer_jax import workdir as workdir_lib
from transformer_jax import generate
from transformer_jax.model import LanguageModel, ModelConfig, Transformer, build_model

BATCH_KEYS = ('inputs', 'targets', 'inputs_segmentation', 'targets_segmentation', 'inputs_position',
              'targets_position')


class NonFiniteLossError(RuntimeError):
  pass


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
# The loop


class Preempted(BaseException):
  """Raised by the signal handler where there is nothing left to save. A BaseException, like KeyboardInterrupt, so
  that no `except Exception` on its way (e.g. the damaged-checkpoint fallback of a restore) mistakes it for damage."""


class _Preemption:
  """SIGTERM/SIGINT -> exit 0 at any phase of train_and_evaluate (faults.SIGNALS_HELP, in `train --help`).

  phase 'setup' (data, tokenizer, restore) and 'final_eval': the handler raises Preempted (nothing new to save, or
  the final save is already running); 'train' (and 'commit'): it sets a flag and the loop finishes the current
  step, saves and stops.

  Several processes (jax.distributed initialised): JAX's preemption service catches SIGTERM on any host and names
  one step for all (multihost_utils.reached_preemption_sync_point, asked every step), so no Python handler is
  installed there (it would replace JAX's).
  """

  def __init__(self, checkpointer=None):
    self.requested = False
    self.phase = 'setup'
    self.checkpointer = checkpointer
    self._previous = {}
    self._multihost = jax.process_count() > 1

  def should_stop(self, step: int) -> bool:
    return self.checkpointer.reached_preemption(step) if self._multihost else self.requested

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT) if not self._multihost else ():
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    first = not self.requested
    self.requested = True
    if first and self.phase in ('setup', 'final_eval'):
      raise Preempted(signum)
    logging.warning('received signal %d: saving after this step', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


METRICS_NAME = 'metrics.jsonl'
METRICS_PARTS = 'metrics'  # gs:// workdirs: WORKDIR/metrics/<part>.jsonl (an object store has no append)
METRICS_PART_ROWS = 200  # rows per part: each write re-uploads only the current part


class TensorBoardEvents:
  """One TensorBoard event file of scalars, written with tensorboard's own record writer and protos: the trainer
  never imports TensorFlow for it (~5 s of CPU at start-up on 2 cores)."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.transformer_jax'
    self._records = record_writer.RecordWriter(open(os.path.join(logdir, name), 'wb'))  # pylint: disable=consider-using-with
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    if self._records is None:
      return
    try:
      self._records.write(event.SerializeToString())
      self._records.flush()
    except OSError as e:  # a full disk, say: TensorBoard is a convenience copy, metrics.jsonl is the record
      logging.warning('TensorBoard events are no longer written (%s); metrics.jsonl keeps every row', e)
      self._records = None

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in metrics.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))


class MetricsWriter:
  """TensorBoard scalars + a JSON-lines copy (for curves.png and for people without TensorBoard).

  Local workdir: WORKDIR/metrics.jsonl, appended, and TensorBoard events written in WORKDIR/tensorboard.
  gs:// workdir: nothing is appended (GCS has none; gcsfs would silently truncate): each run writes numbered parts
  WORKDIR/metrics/<first step>-<run start>-<part>.jsonl, the current part re-uploaded whole at each write; the
  events are written to a local staging directory (TensorFlow's own gs:// filesystem cannot be pointed at another
  endpoint, and would be a second GCS client) and the event files uploaded whole at each write. read_metrics reads
  both layouts.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self.workdir = workdir
    self.remote = paths.is_gcs(workdir)
    self.path = paths.join(workdir, METRICS_NAME)
    self._rows: list[str] = []
    self._part = 0
    self._run = f'{start_step:010d}-{time.strftime("%Y%m%dT%H%M%S", time.gmtime())}-{os.getpid()}'
    if enabled:
      if self.remote:
        self._staging = tempfile.mkdtemp(prefix='transformer_jax_tensorboard_')
        # uploaded at each write, so a local copy is not needed after the run: gone at exit, however it ends
        atexit.register(shutil.rmtree, self._staging, ignore_errors=True)
      self._events = TensorBoardEvents(self._staging if self.remote else os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._events.scalars(step, metrics)
    line = json.dumps({'step': step, **{k: float(v) for k, v in metrics.items()}}) + '\n'
    if not self.remote:
      with open(self.path, 'a') as f:
        f.write(line)
      return
    if len(self._rows) >= METRICS_PART_ROWS:
      self._rows, self._part = [], self._part + 1
    self._rows.append(line)
    paths.write_text_atomic(paths.join(self.workdir, METRICS_PARTS, f'{self._run}-{self._part:05d}.jsonl'),
                            ''.join(self._rows))
    self._upload_events()

  def _upload_events(self) -> None:
    for name in os.listdir(self._staging):
      paths.upload_file(os.path.join(self._staging, name), paths.join(self.workdir, 'tensorboard', name))


def read_metrics(workdir: str) -> list[dict]:
  """Every metrics row of a workdir in the order written: metrics.jsonl, then the numbered parts (gs://)."""
  texts = []
  local = paths.join(workdir, METRICS_NAME)
  if paths.exists(local):
    texts.append(paths.read_text(local))
  parts_dir = paths.join(workdir, METRICS_PARTS)
  for name in paths.listdir(parts_dir):
    if name.endswith('.jsonl'):
      texts.append(paths.read_text(paths.join(parts_dir, name)))
  return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]


def plot_curves(workdir: str, out_path: str) -> None:
  """curves.png (at out_path, local or gs://): training loss and held-out metrics of workdir against step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = read_metrics(workdir)
  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
  for key, ax in (('loss', ax_loss), ('eval_loss', ax_loss)):
    pts = [(r['step'], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), label=key, marker='.' if key.startswith('eval') else None)
  ax_loss.set(xlabel='step', ylabel='label-smoothed cross-entropy', title='loss', yscale='log')
  ax_loss.legend()
  for key in ('bleu', 'chrf', 'exact_match'):
    pts = [(r['step'], r[key]) for r in rows if key in r]
    if pts:
      ax_eval.plot(*zip(*pts), label=key, marker='o')
  ax_eval.set(xlabel='step', ylabel='score (0-100)', title='held-out', ylim=(0, 100))
  if ax_eval.lines:  # a language model has no BLEU
    ax_eval.legend()
  fig.tight_layout()
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=90)
  plt.close(fig)
  paths.write_bytes_atomic(out_path, buffer.getvalue())


def _stop_if_not_finite(metrics: dict[str, float], step: int, checkpointer, state=None) -> None:
  """NaN/inf loss or gradient norm (or, given `state`, a non-finite parameter or moment: an overflowing update)
  -> stop before anything of this step is saved; the last good checkpoint stays."""
  bad = [f'{k}={metrics[k]}' for k in ('loss', 'grad_norm') if k in metrics and not math.isfinite(metrics[k])]
  if not bad and state is not None and not checkpoint_lib.tree_all_finite(state):
    bad.append('non-finite parameters or optimizer state')
  if bad:
    checkpointer.wait()  # an earlier, good save may still be committing in the background: let it finish
    raise NonFiniteLossError(f'{", ".join(bad)} at step {step}; stopping without saving (last good checkpoint: '
                             f'step {checkpointer.latest_step()})')


class TrainingStalledError(RuntimeError):
  pass


class StallDetector:
  """Fails loudly when the training loss stops falling (post-norm Transformers stall near ln-ish plateaus when the
  peak learning rate is too high): after warmup, if the best smoothed loss has not improved by `min_improvement`
  (relative) within `patience` steps, raise. patience=0 disables it."""

  def __init__(self, patience: int, warmup_steps: int, min_improvement: float = 0.01, smoothing: float = 0.9):
    self.patience, self.warmup_steps, self.min_improvement, self.smoothing = patience, warmup_steps, min_improvement, smoothing
    self.smoothed = None
    self.best = math.inf
    self.best_step = None

  def update(self, step: int, loss: float) -> None:
    self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
    if not self.patience or step <= self.warmup_steps:
      return
    if self.best_step is None or self.smoothed < self.best * (1 - self.min_improvement):
      self.best, self.best_step = self.smoothed, step
    elif step - self.best_step >= self.patience:
      raise TrainingStalledError(
          f'training loss stopped falling: {self.smoothed:.3f} at step {step}, no better than {self.best:.3f} at step '
          f'{self.best_step}; the peak learning rate may be too high (try a smaller --config.learning_rate) '
          f'(stall_patience_steps={self.patience}; 0 disables this check)')


class Profiler:
  """config.profile_steps='a,b': a jax.profiler trace of the steps that take the step counter from a to b, written
  to WORKDIR/profile (open with TensorBoard's profile plugin, xprof or Perfetto). '' (the default): no trace."""

  def __init__(self, profile_steps: str, workdir: str):
    self.directory = os.path.join(workdir, 'profile')
    self.active = False
    self.start_step = self.stop_step = None
    if str(profile_steps or '').strip():
      try:
        self.start_step, self.stop_step = (int(x) for x in str(profile_steps).split(','))
      except ValueError as e:
        raise ValueError(f"profile_steps must be 'a,b' (two step numbers), got {profile_steps!r}") from e
      if not 0 <= self.start_step < self.stop_step:
        raise ValueError(f'profile_steps={profile_steps!r} needs 0 <= a < b')

  def before_step(self, step: int) -> None:
    if step == self.start_step and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, state) -> None:
    if self.active and step >= self.stop_step:
      jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info('profile of steps %d..%d in %s', self.start_step, self.stop_step, self.directory)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def _fmt(metrics: dict[str, float]) -> str:
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in metrics.items())


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains config in workdir (resuming from its newest good checkpoint) and returns the final metrics.

  SIGTERM/SIGINT at any phase: see faults.SIGNALS_HELP; the result then holds 'preempted'. A run already at (or past)
  num_train_steps trains nothing and writes nothing: it returns the step and the held-out metrics only."""
  with _Preemption() as preemption:
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
      return _stop_preempted(preemption)
    except Preempted:
      return _stop_preempted(preemption)


def _stop_preempted(preemption: _Preemption) -> dict[str, float]:
  """Waits for any save in flight (the final checkpoint), says where the run stopped, returns the preempted result."""
  checkpointer = preemption.checkpointer
  if checkpointer is not None:
    checkpointer.wait()  # the final checkpoint (or any save in flight) commits before we go
  step = checkpointer.latest_step() if checkpointer is not None else None
  if jax.process_index() == 0:
    if preemption.phase == 'final_eval':
      print(f'preempted: during the final evaluation; checkpoint step {step} is committed in '
            f'{checkpointer.directory} (rerun to evaluate it)', flush=True)
    else:
      print('preempted: before the first training step; nothing new to save (newest checkpoint: '
            f'{"none" if step is None else f"step {step}"})', flush=True)
  if checkpointer is not None:
    checkpointer.close()
  return {'step': step or 0, 'preempted': 1.0}


def _train_and_evaluate(config, workdir: str, preemption: _Preemption) -> dict[str, float]:
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  process_index, process_count = jax.process_index(), jax.process_count()
  is_chief = process_index == 0
  workdir = paths.resolve(workdir)
  paths.makedirs(workdir)
  mesh = parallel.make_mesh(config.mesh)
  if config.batch_size % (mesh.shape['data'] * mesh.shape['fsdp']):
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the batch axes '
                     f"data*fsdp={mesh.shape['data'] * mesh.shape['fsdp']}")
  parallel.process_batch_rows(mesh, config.batch_size)  # each process must own its own rows: fail before loading data
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    # Shapes do not depend on the tokenizer's special ids: check the checkpoint against the config before any data
    # is prepared or written, so a refused command leaves the workdir as it was.
    shapes_model = build_model(model_config(config))
    shardings = parallel.logical_shardings(state_logical_specs(shapes_model, tx, config), mesh)
    abstract = abstract_state(shapes_model, tx, config, shardings)
    workdir_lib.Workdir(workdir).check_resumable(abstract)

  data = pipeline.build_datasets(config, workdir, process_index=process_index, process_count=process_count)
  if data.tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'the tokenizer has {data.tokenizer.vocab_size} pieces but model.vocab_size is '
                     f'{config.model.vocab_size}')

  cfg = model_config(config, special_ids=data.tokenizer.special_ids)
  model = build_model(cfg)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)

  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
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
    start_step = int(jax.device_get(state.step))
    if is_chief:
      logging.info('%d parameters; mesh %s', count_params(state.params), dict(mesh.shape))

    train_step = jit_train_step(model, tx, config, mesh, shardings)
    eval_step = jax.jit(make_eval_step(model, config))
    eval_lengths = dict(batch_size=config.batch_size // process_count, inputs_length=config.packed_inputs_length,
                        targets_length=config.packed_targets_length)
    is_lm = cfg.kind == 'decoder'
    make_eval_batches = data.eval_batches if is_lm else functools.partial(pipeline.eval_batches, data.eval_ids)
    eval_batches = make_eval_batches(**eval_lengths)
    num_eval_batches = parallel.max_over_processes(len(eval_batches))  # every process runs the same eval steps
    if len(eval_batches) < num_eval_batches:
      eval_batches = make_eval_batches(num_batches=num_eval_batches, **eval_lengths)
    # BLEU: translate_ids wants the same rows on every process, but each holds every process_count-th held-out
    # pair: gather them all (original order), so every process translates and scores the same set.
    eval_pairs = parallel.gather_process_shards(data.eval_pairs)
    num_bleu = min(len(eval_pairs), int(config.get('eval_translate_examples', 1000)))
    bleu_sources = evaluate_lib.encode_sources(data.tokenizer, [s for s, _ in eval_pairs[:num_bleu]],
                                               config.max_length)
    bleu_references = [t for _, t in eval_pairs[:num_bleu]]

    def run_eval(params, step, write: bool = True) -> dict[str, float]:
      if is_chief:  # stderr, with the bars: stdout keeps the metrics lines
        tqdm.write(f'evaluating step {step}: held-out loss over {num_eval_batches} batches'
                   + (f', then greedy decoding of {num_bleu} sentences' if num_bleu else ''), file=sys.stderr)
      results = evaluate_loss(eval_step, params, eval_batches, mesh)
      if is_lm:  # perplexity, bits per byte, and samples in the run's output
        results.update(evaluate_lib.lm_metrics(results['eval_nll'], data.eval_tokens, data.eval_bytes))
        prompts = list(config.get('lm_sample_prompts', ()))
        if prompts:
          texts = generate.generate_texts(params, cfg, data.tokenizer, prompts,
                                          max_new_tokens=int(config.get('lm_sample_tokens', 64)), temperature=0.8,
                                          top_p=0.95, seed=step)
          if is_chief:
            for prompt, text in zip(prompts, texts):
              tqdm.write(f'sample step={step} (temperature 0.8, top_p 0.95):\n{prompt}{text}\n' + '-' * 40)
      if num_bleu:
        tokens = translate_ids(params, bleu_sources, cfg=cfg, mesh=mesh,
                               batch_size=int(config.get('eval_translate_batch_size', 256)),
                               max_decode_len=config.max_length, progress=is_chief)
        hypotheses = evaluate_lib.decode_outputs(data.tokenizer, tokens)
        results.update(evaluate_lib.text_metrics(hypotheses, bleu_references, config.get('bleu_tokenize', '13a')))
        if is_chief and write:
          paths.write_text_atomic(paths.join(workdir, f'eval_hypotheses_{step}.txt'), '\n'.join(hypotheses) + '\n')
      return results

    num_steps = int(config.num_train_steps)
    if start_step >= num_steps:  # a finished run: no step to run and no loss to report; the workdir is not written
      if is_chief:
        print(f'the run is already complete at step {start_step} (num_train_steps={num_steps}); held-out metrics '
              'of that checkpoint follow (raise --config.num_train_steps to train on)', flush=True)
      final = {'step': start_step, **run_eval(state.params, start_step, write=False)}
      checkpointer.close()
      return final
    writer = MetricsWriter(workdir, enabled=is_chief, start_step=start_step)
    log_every = int(config.get('log_every_steps', 50))
    last_eval: dict[str, float] = {}
    last_train: dict[str, float] = {}
    # The bar starts after the first step, which compiles: its rate and ETA are then the steps' own from the start.
    progress = tqdm(total=num_steps, initial=start_step, disable=True)
    if is_chief:
      print('compiling the train step (the first step waits for it) ...', file=sys.stderr, flush=True)
    compile_start = time.time()
    window_tokens, window_start = 0.0, time.time()
    step = start_step
    pending, pending_counted = None, True
    stall = StallDetector(int(config.get('stall_patience_steps', 0)), int(config.get('warmup_steps', 0)))
    preemption.phase = 'train'
    with Profiler(config.get('profile_steps', ''), workdir) as profiler:
      while step < num_steps:
        profiler.before_step(step)
        batch = parallel.global_batch(next(data.train), mesh)
        state, metrics = train_step(state, batch, step_rng)
        step += 1
        profiler.after_step(step, state)
        first = step == start_step + 1  # it compiled
        if first:
          jax.block_until_ready(metrics)
          if is_chief:
            print(f'compiled and ran the first step in {time.time() - compile_start:.1f} s', file=sys.stderr,
                  flush=True)
            progress = tqdm(total=num_steps, initial=step - 1, dynamic_ncols=True, unit='step')
          window_start = time.time()  # tokens/s from here: the first step's tokens are not counted
        # Read the previous step's metrics while this one runs: the host never waits on the device here.
        if pending is not None:
          last_train = {k: float(v) for k, v in jax.device_get(pending).items()}
          _stop_if_not_finite(last_train, step - 1, checkpointer)
          window_tokens += last_train['tokens'] if pending_counted else 0.0
        pending, pending_counted = metrics, not first
        progress.update(1)
        if step % log_every == 0 or step == num_steps:
          elapsed = time.time() - window_start
          last_train['tokens_per_s'] = window_tokens / max(elapsed, 1e-9)
          window_tokens, window_start = 0.0, time.time()
          progress.set_postfix(loss=f"{last_train.get('loss', float('nan')):.3f}",
                               tok_s=f"{last_train['tokens_per_s']:.0f}")
          writer.write(step, {k: v for k, v in last_train.items() if k != 'tokens'})
          if 'loss' in last_train:
            stall.update(step, last_train['loss'])
        if step % config.eval_every_steps == 0 and step != num_steps:
          last_eval = run_eval(state.params, step)
          writer.write(step, last_eval)
          window_tokens, window_start = 0.0, time.time()  # tokens/s counts training steps, not the evaluation
          if is_chief:  # tqdm.write prints even where the bar is disabled
            progress.write(f'eval step={step} {_fmt(last_eval)}')
        checkpointer.check_for_errors()  # a background save that failed stops the run at the next step
        stop = preemption.should_stop(step)
        if step % config.checkpoint_every_steps == 0 or step == num_steps or stop:
          last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
          pending = None
          _stop_if_not_finite(last_train, step, checkpointer, state)
          checkpointer.save(step, state, data.train.get_state(), _config_json(config), force=True)
        if stop:
          checkpointer.wait()
          progress.close()
          if is_chief:
            print(f'preempted: saved checkpoint at step {step} in {checkpointer.directory}', flush=True)
          return {'step': step, 'preempted': 1.0}
    progress.close()
    final = {'step': step, 'loss': last_train.get('loss', float('nan'))}
    preemption.phase = 'final_eval'  # the final checkpoint is saving in the background meanwhile
    final.update(run_eval(state.params, step))
    writer.write(step, {k: v for k, v in final.items() if k not in ('step', 'loss')})  # loss was logged already
    preemption.phase = 'commit'
    checkpointer.wait()
    checkpointer.close()
  if is_chief:
    plot_curves(workdir, paths.join(workdir, 'curves.png'))
  return final
