"""Text pairs -> token ids -> packed rows -> batches, per process, with exactly resumable state.

build_datasets streams the training split from prepared shards (data/prepare.py, data/stream.py); the
in-memory TrainIterator below remains for small lists of examples (tools, benchmarks) and describes the
held-out path (eval_batches).

The training stream is a pure function of (examples, seed, step): epoch e is the examples
permuted by np.random.default_rng((seed, e)) and packed; every epoch yields the same number of
batches (`batches_per_epoch`, fixed from epoch 0, see TrainIterator). So the position after
`step` batches is (step // batches_per_epoch, step % batches_per_epoch), and resuming needs
only the step (or the dict from get_state()). The next epoch is packed on a background thread
while the current one is consumed; batches are slices of the packed epoch, so nothing else
needs prefetching (tf.data is used for reading files/TFDS in sources.py, not here: a tf.data
iterator's position is not a plain int and would need its own checkpoint).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np

from transformer_jax.data import lm
from transformer_jax.data import packing
from transformer_jax.data import sources
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.data.tokenizer import EOS_ID
from transformer_jax.storage import layout as layout_lib

Batch = dict[str, np.ndarray]
ExampleIds = tuple[list[int], list[int]]


# ---------------------------------------------------------------------------------------------
# Tokenization.
# ---------------------------------------------------------------------------------------------
def _finish(ids: list[int], max_length: int, truncate: bool, eos_id: int = EOS_ID) -> list[int] | None:
  if not ids:
    return None
  if len(ids) + 1 > max_length:
    if not truncate:
      return None
    ids = ids[: max_length - 1]
  return ids + [eos_id]


def _tokenize_aligned(
  tokenizer: tokenizer_lib.Tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, truncate: bool
) -> list[ExampleIds | None]:
  """Like tokenize_pairs, but one entry per pair: None where the pair is dropped."""
  if max_length < 2:
    raise ValueError(f'max_length must be >= 2 (one token + EOS), got {max_length}')
  if not pairs:
    return []
  src = tokenizer.encode_batch([s for s, _ in pairs])
  tgt = tokenizer.encode_batch([t for _, t in pairs], target=True)
  eos = tokenizer.special_ids.eos
  out: list[ExampleIds | None] = []
  for s, t in zip(src, tgt):
    s = _finish(s, max_length, truncate, eos)
    t = _finish(t, max_length, truncate, eos)
    out.append(None if s is None or t is None else (s, t))
  return out


def tokenize_pairs(
  tokenizer: tokenizer_lib.Tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int, truncate: bool = False
) -> list[ExampleIds]:
  """Encodes both sides and appends EOS.

  Pairs with an empty side are dropped. A side longer than `max_length` tokens (EOS included)
  drops the pair, or with `truncate=True` is cut to `max_length` tokens ending in EOS.
  """
  return [e for e in _tokenize_aligned(tokenizer, pairs, max_length, truncate) if e is not None]


# ---------------------------------------------------------------------------------------------
# Training stream.
# ---------------------------------------------------------------------------------------------
class TrainIterator:
  """Infinite, deterministic stream of this process's packed training batches.

  Each epoch e: permute the examples with np.random.default_rng((seed, e)), pack them, cut into
  batches of `batch_size` rows. Every epoch yields exactly `batches_per_epoch` batches, the
  number of full batches of epoch 0: a later epoch that packs into more rows drops the extra
  (incomplete-batch) rows, one that packs into fewer repeats its own first rows to fill up
  (packing of a shuffled set barely varies, so this is at most a few rows). This fixed epoch
  length makes the position a function of the step alone, identical in meaning on every
  process, so multi-host resume can use the global step.

  get_state() -> {'epoch', 'batch', 'step'} counts batches *returned* by __next__.
  set_state(state) accepts that dict (the step decides), or just {'step': n}.
  """

  def __init__(
    self,
    examples_ids: list[ExampleIds],
    *,
    batch_size: int,
    inputs_length: int,
    targets_length: int,
    seed: int,
    max_open_rows: int = 64,
    prefetch: bool = True,
  ):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if not examples_ids:
      raise ValueError('TrainIterator: no training examples (after filtering)')
    self._examples = list(examples_ids)
    self.batch_size = int(batch_size)
    self.inputs_length = int(inputs_length)
    self.targets_length = int(targets_length)
    self.seed = int(seed)
    self.max_open_rows = int(max_open_rows)
    self._prefetch = prefetch
    self._lock = threading.Lock()
    self._packed: dict[int, Batch] = {}
    self._pending: dict[int, threading.Thread] = {}
    self._errors: dict[int, BaseException] = {}
    first = self._pack_epoch(0)
    self._packed[0] = first
    self.rows_per_epoch_0 = int(first['inputs'].shape[0])
    self.batches_per_epoch = self.rows_per_epoch_0 // self.batch_size
    if self.batches_per_epoch < 1:
      raise ValueError(
        f'TrainIterator: {len(self._examples)} examples pack into {self.rows_per_epoch_0} rows, '
        f'fewer than one batch of {self.batch_size} rows; use more data or a smaller batch'
      )
    self.packing_efficiency = packing.packing_efficiency(first)
    self.inputs_efficiency = packing.inputs_efficiency(first)
    self._epoch = 0
    self._batch = 0

  @property
  def num_examples(self) -> int:
    return len(self._examples)

  # -- packing, with the next epoch built in the background ----------------------------------
  def _pack_epoch(self, epoch: int) -> Batch:
    order = np.random.default_rng((self.seed, epoch)).permutation(len(self._examples))
    packed = packing.pack_examples(
      [self._examples[i] for i in order], self.inputs_length, self.targets_length, max_open_rows=self.max_open_rows
    )
    rows = packed['inputs'].shape[0]
    # Epoch 0 defines batches_per_epoch (its full batches); later epochs are cut or filled to it.
    need = (self.batches_per_epoch if epoch else rows // self.batch_size) * self.batch_size
    if rows >= need or rows == 0:
      return {k: v[:need] for k, v in packed.items()}
    idx = np.arange(need) % rows
    return {k: v[idx] for k, v in packed.items()}

  def _start(self, epoch: int) -> None:
    with self._lock:
      if epoch in self._packed or epoch in self._pending:
        return

      def work():
        try:
          result = self._pack_epoch(epoch)
          with self._lock:
            self._packed[epoch] = result
        except BaseException as e:
          with self._lock:
            self._errors[epoch] = e

      t = threading.Thread(target=work, name=f'pack-epoch-{epoch}', daemon=True)
      self._pending[epoch] = t
    t.start()

  def _get_epoch(self, epoch: int) -> Batch:
    with self._lock:
      if epoch in self._packed:
        got = self._packed[epoch]
      else:
        got = None
      thread = self._pending.get(epoch)
    if got is None:
      if thread is None:
        got = self._pack_epoch(epoch)
        with self._lock:
          self._packed[epoch] = got
      else:
        thread.join()
        with self._lock:
          if epoch in self._errors:
            raise self._errors.pop(epoch)
          got = self._packed[epoch]
    with self._lock:  # keep only this epoch and the next one
      for e in [e for e in self._packed if e not in (epoch, epoch + 1)]:
        del self._packed[e]
      for e in [e for e in self._pending if e <= epoch]:
        del self._pending[e]
    if self._prefetch:
      self._start(epoch + 1)
    return got

  # -- iteration -------------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    packed = self._get_epoch(self._epoch)
    lo = self._batch * self.batch_size
    batch = {k: v[lo : lo + self.batch_size] for k, v in packed.items()}
    self._batch += 1
    if self._batch == self.batches_per_epoch:
      self._epoch += 1
      self._batch = 0
    return batch

  # -- state -----------------------------------------------------------------------------------
  @property
  def step(self) -> int:
    return self._epoch * self.batches_per_epoch + self._batch

  def get_state(self) -> dict[str, int]:
    return {'epoch': int(self._epoch), 'batch': int(self._batch), 'step': int(self.step)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Positions the stream after `state['step']` batches (or at `epoch`/`batch` without a step).

    The step is authoritative: it means the same on every process, so on multi-host runs each
    process can be given process 0's saved state (its epoch/batch may differ from this process's,
    since each process packs its own shard; that case is only logged).
    """
    if 'step' in state:
      step = int(state['step'])
      if step < 0:
        raise ValueError(f'invalid iterator state {dict(state)}: negative step')
      epoch, batch = divmod(step, self.batches_per_epoch)
      if 'epoch' in state and 'batch' in state and (int(state['epoch']), int(state['batch'])) != (epoch, batch):
        logging.info(
          'Iterator state %s: position from the step is epoch %d batch %d here (%d batches per epoch on this process)',
          dict(state),
          epoch,
          batch,
          self.batches_per_epoch,
        )
    elif 'epoch' in state and 'batch' in state:
      epoch, batch = int(state['epoch']), int(state['batch'])
      if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
        raise ValueError(f'invalid iterator state {dict(state)} ({self.batches_per_epoch} batches per epoch)')
    else:
      raise ValueError(f"iterator state needs 'step' (or 'epoch' and 'batch'), got {dict(state)}")
    self._epoch, self._batch = epoch, batch


# ---------------------------------------------------------------------------------------------
# Evaluation batches.
# ---------------------------------------------------------------------------------------------
def eval_batches(
  examples_ids: Sequence[ExampleIds],
  *,
  batch_size: int,
  inputs_length: int,
  targets_length: int,
  num_batches: int | None = None,
  max_open_rows: int = 64,
) -> list[Batch]:
  """Packs held-out examples in order into batches; the last one is padded with all-zero rows.

  `num_batches` pads the list with all-zero batches up to that count (so every process can
  run the same number of eval steps in multi-host evaluation).
  """
  packed = packing.pack_examples(list(examples_ids), inputs_length, targets_length, max_open_rows=max_open_rows)
  rows = packed['inputs'].shape[0]
  n = -(-rows // batch_size)
  if num_batches is not None:
    if num_batches < n:
      raise ValueError(f'eval data needs {n} batches, more than num_batches={num_batches}')
    n = num_batches
  out = []
  for b in range(n):
    batch = {}
    for k, v in packed.items():
      part = v[b * batch_size : (b + 1) * batch_size]
      if part.shape[0] < batch_size:
        part = np.concatenate([part, np.zeros((batch_size - part.shape[0], v.shape[1]), v.dtype)])
      batch[k] = part
    out.append(batch)
  return out


# ---------------------------------------------------------------------------------------------
# Everything the trainer needs.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Datasets:
  tokenizer: tokenizer_lib.Tokenizer
  train: Any  # stream.TrainStream (next / get_state / set_state, like TrainIterator)
  eval_pairs: list[tuple[str, str]]  # raw held-out text (this process's shard), for BLEU
  eval_ids: list[ExampleIds]  # eval_ids[i] is eval_pairs[i] tokenized (truncated, + EOS)


def build_datasets(
  config, workdir: str | layout_lib.WorkdirLayout, *, process_index: int = 0, process_count: int = 1
) -> Datasets:
  """Prepares (once) and streams the training split; loads, tokenizes and packs the held-out split."""
  workdir = layout_lib.of(workdir)
  if config.model.get('kind', 'encoder_decoder') == 'decoder':  # a language model: documents, not pairs
    return lm.build_datasets(config, workdir, process_index=process_index, process_count=process_count)
  start = time.time()
  if config.batch_size % process_count:
    raise ValueError(
      f'batch_size {config.batch_size} (global packed rows) is not divisible by the number of processes {process_count}'
    )
  max_length = int(config.max_length)
  inputs_length = int(config.get('packed_inputs_length', max_length))
  targets_length = int(config.get('packed_targets_length', max_length))
  if inputs_length < max_length or targets_length < max_length:
    raise ValueError(
      f'packed_inputs_length ({inputs_length}) and packed_targets_length '
      f'({targets_length}) must be >= max_length ({max_length})'
    )
  # Training data: prepared once into token-id shards (data/prepare.py), streamed (data/stream.py).
  from transformer_jax.data import prepare as prepare_lib
  from transformer_jax.data import stream as stream_lib

  prepared = prepare_lib.ensure_prepared(config, workdir, is_chief=process_index == 0, progress=process_index == 0)
  tokenizer = prepared.tokenizer  # its size was checked against model.vocab_size before any shard was written
  manifest = prepared.manifest
  if prepared.reused and process_index == 0:
    prepare_lib.report_skipped(manifest, f'{config.dataset} [{config.train_split}]')
  train = stream_lib.TrainStream(
    stream_lib.Shards(prepared.directory, manifest),
    batch_size=config.batch_size // process_count,
    inputs_length=inputs_length,
    targets_length=targets_length,
    seed=int(config.seed),
    process_index=process_index,
    process_count=process_count,
  )

  cache_dir = workdir.generated_data if config.dataset.startswith('generated:') else None
  eval_pairs = sources.load_text_pairs(
    config.dataset,
    config.eval_split,
    max_examples=config.get('max_eval_examples'),
    cache_dir=cache_dir,
    source_lang=config.source_lang,
    target_lang=config.target_lang,
    process_index=process_index,
    process_count=process_count,
    data_dir=config.get('data_dir'),
  )
  # Keep eval_pairs[i] <-> eval_ids[i]: drop the raw pairs whose tokenization was dropped.
  aligned = _tokenize_aligned(tokenizer, eval_pairs, max_length, truncate=True)
  eval_pairs = [p for p, e in zip(eval_pairs, aligned) if e is not None]
  eval_ids = [e for e in aligned if e is not None]
  logging.info(
    'Data %s: %d prepared train examples (%d pairs read; skipped %s), %d for this process, %d eval pairs; '
    'rows of %d/%d tokens, batches of %d rows; packing efficiency targets %.3f inputs %.3f; %.1f s',
    config.dataset,
    manifest['num_examples'],
    manifest['pairs_read'],
    manifest['skipped'],
    train.num_examples,
    len(eval_ids),
    inputs_length,
    targets_length,
    train.batch_size,
    train.packing_efficiency,
    train.inputs_efficiency,
    time.time() - start,
  )
  return Datasets(tokenizer=tokenizer, train=train, eval_pairs=eval_pairs, eval_ids=eval_ids)
