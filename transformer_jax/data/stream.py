"""The training stream over prepared shards: index shuffle, per-host sharding, chunked packing, batching, prefetch.

The machinery, and why (figures: benchmarks/RESULTS.md, "Streaming input at WMT size"):
  * Random access + an index shuffle, not a shuffle buffer over interleaved shards. The shards (data/prepare.py)
    are memmapped .npy files; epoch e visits example `perm_e(j)` at global position j, where perm_e is a
    bijection of [0, N) computed on the fly (a 6-round Feistel network keyed by (seed, epoch), with cycle-walking
    into [0, N)). That is a global, seeded shuffle with O(1) memory (no permutation array, no buffer), and the
    position is three ints, so resume is exact and instant. A shuffle buffer would have to be checkpointed (tf.data's
    iterator checkpoint holds the whole buffer) or replayed, and mixes only within the buffer.
  * Per-host sharding: process p of P takes global positions p, p + P, p + 2P, ...: disjoint and covering per epoch.
  * Packing: the process's sequence is cut into chunks of CHUNK_EXAMPLES examples; each chunk is gathered from the
    memmaps (vectorised) and packed by data/packing.py's first-fit (separate input/target row lengths). A chunk's
    rows are a function of (seed, epoch, chunk) alone, so the position of the next row is (epoch, chunk, row).
    Closing a chunk's open rows leaves some target slots empty; a large chunk makes that share small.
  * Batching over the row stream (batches may span chunks and epochs: every row is used), a prefetch thread that
    packs ahead into a bounded queue. numpy only: no tf.data here (its iterator position is not a few ints).

Packing is cheap per example (first-fit placement in Python, the token scatter vectorised): one process streams
more real target tokens per second than a step consumes, so one prefetch thread suffices and there are no worker
processes.

Memory: the memmapped shards (page cache, not the process's heap), one packed chunk and the prefetch queue: nothing
grows with the corpus.

State (the checkpoint's `data` item): {'step': batches returned, 'positions': [[epoch, chunk, row] per process],
'num_examples', 'chunk_examples', 'seed'}. With several processes get_state() is a collective (every process calls
it at the same step, as train.py's save does): each process's position is gathered, so one saved dict resumes all.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from absl import logging
import numpy as np

from transformer_jax import parallel
from transformer_jax.data import packing

Batch = dict[str, np.ndarray]
CHUNK_EXAMPLES = 16_384
MAX_OPEN_ROWS = 64
PREFETCH_BATCHES = 16
FEISTEL_ROUNDS = 6
STATE_FORMAT = 'stream/1'


# ---------------------------------------------------------------------------------------------------------------------
# Index shuffle


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


class IndexShuffle:
  """A seeded bijection of [0, n), evaluated for any array of indices in O(len) time and memory."""

  def __init__(self, n: int, seed: int, epoch: int):
    if n < 1:
      raise ValueError(f'IndexShuffle needs n >= 1, got {n}')
    self.n = int(n)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    self.half = np.uint64(bits // 2)
    self.mask = np.uint64((1 << (bits // 2)) - 1)
    self.keys = np.random.default_rng((int(seed), int(epoch), 0x5EED)).integers(
      0, 2**63, FEISTEL_ROUNDS, dtype=np.uint64
    )

  def _round_trip(self, x: np.ndarray) -> np.ndarray:
    left, right = x >> self.half, x & self.mask
    for key in self.keys:
      left, right = right, left ^ (_mix(right ^ key) & self.mask)
    return (left << self.half) | right

  def __call__(self, idx: np.ndarray) -> np.ndarray:
    x = self._round_trip(np.asarray(idx, np.uint64))
    out = x >= np.uint64(self.n)
    while out.any():  # cycle-walking: a bijection of [0, 2^bits) restricted to [0, n) stays a bijection
      x[out] = self._round_trip(x[out])
      out = x >= np.uint64(self.n)
    return x.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Random access to the prepared examples


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, s + l) for every (s, l), vectorised."""
  total = int(lens.sum())
  if not total:
    return np.zeros(0, np.int64)
  first = np.cumsum(lens) - lens
  return np.repeat(starts - first, lens) + np.arange(total)


class Shards:
  """The prepared examples of a manifest, memmapped (np.load(mmap_mode='r'), no pickle): random access by index."""

  def __init__(self, directory: str, manifest: dict | None = None):
    if manifest is None:
      with open(os.path.join(directory, 'manifest.json'), 'rb') as f:
        manifest = json.loads(f.read().decode('utf-8'))
    self.directory, self.manifest = directory, manifest
    self.arrays: list[dict[str, np.ndarray]] = []
    for shard in manifest['shards']:
      self.arrays.append(
        {
          k: np.load(os.path.join(directory, e['name']), mmap_mode='r', allow_pickle=False)
          for k, e in shard['files'].items()
        }
      )
    self.cum = np.concatenate([[0], np.cumsum([s['num_examples'] for s in manifest['shards']])]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.cum[-1])

  def gather(self, idx: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{side: (flat int32 tokens, lengths)} of examples `idx`, in that order."""
    idx = np.asarray(idx, np.int64)
    shard = np.searchsorted(self.cum, idx, side='right') - 1
    local = idx - self.cum[shard]
    out = {}
    for side in ('inputs', 'targets'):
      starts = np.empty(len(idx), np.int64)
      lens = np.empty(len(idx), np.int64)
      groups = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard).tolist()]
      for s, m in groups:
        offsets = self.arrays[s][f'{side}_offsets']
        starts[m] = offsets[local[m]]
        lens[m] = offsets[local[m] + 1] - starts[m]
      flat = np.empty(int(lens.sum()), np.int32)
      dest_starts = np.cumsum(lens) - lens
      for s, m in groups:
        flat[_ranges(dest_starts[m], lens[m])] = self.arrays[s][side][_ranges(starts[m], lens[m])]
      out[side] = (flat, lens)
    return out

  def examples(self, idx) -> list[tuple[list[int], list[int]]]:
    """Examples as (inputs, targets) lists (tests and tools)."""
    got = self.gather(np.asarray(idx, np.int64))
    out = []
    for side in ('inputs', 'targets'):
      flat, lens = got[side]
      out.append([a.tolist() for a in np.split(flat, np.cumsum(lens)[:-1])] if len(lens) else [])
    return list(zip(*out))


# ---------------------------------------------------------------------------------------------------------------------
# The stream


class TrainStream:
  """Infinite, deterministic stream of this process's packed training batches; exact, instant resume.

  train.py uses next(), get_state() (saved as the checkpoint's `data` item) and set_state().
  """

  def __init__(
    self,
    shards: Shards,
    *,
    batch_size: int,
    inputs_length: int,
    targets_length: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    chunk_examples: int = CHUNK_EXAMPLES,
    max_open_rows: int = MAX_OPEN_ROWS,
    prefetch: int = PREFETCH_BATCHES,
    gather_states: Callable[[list[int]], list[list[int]]] | None = None,
  ):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self.shards = shards
    self.total_examples = len(shards)
    self.num_examples = len(range(process_index, self.total_examples, process_count))  # this process, per epoch
    if self.num_examples < 1:
      raise ValueError(
        f'TrainStream: {self.total_examples} training examples, none for process {process_index} of {process_count}'
      )
    self.batch_size, self.inputs_length, self.targets_length = int(batch_size), int(inputs_length), int(targets_length)
    self.seed, self.process_index, self.process_count = int(seed), int(process_index), int(process_count)
    self.chunk_examples, self.max_open_rows, self.prefetch = int(chunk_examples), int(max_open_rows), int(prefetch)
    self.chunks_per_epoch = -(-self.num_examples // self.chunk_examples)
    self._gather_states = gather_states
    self._position = (0, 0, 0)  # (epoch, chunk, row) of the next row to return
    self._step = 0
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None
    self._cache: tuple[tuple[int, int], Batch] | None = None
    first = self.chunk_rows(0, 0)
    self.packing_efficiency = packing.packing_efficiency(first)
    self.inputs_efficiency = packing.inputs_efficiency(first)
    self.rows_per_chunk_0 = int(first['inputs'].shape[0])
    if self.rows_per_chunk_0 < 1:
      raise ValueError('TrainStream: the first chunk packs into no rows')

  # -- rows ------------------------------------------------------------------------------------------------------------
  def chunk_indices(self, epoch: int, chunk: int) -> np.ndarray:
    """Global example indices of this process's chunk `chunk` of epoch `epoch`, in stream order."""
    lo = chunk * self.chunk_examples
    hi = min(lo + self.chunk_examples, self.num_examples)
    positions = np.arange(lo, hi, dtype=np.int64) * self.process_count + self.process_index
    return IndexShuffle(self.total_examples, self.seed, epoch)(positions)

  def chunk_rows(self, epoch: int, chunk: int) -> Batch:
    """The packed rows of a chunk (a pure function of seed, epoch, chunk and the process)."""
    if self._cache is not None and self._cache[0] == (epoch, chunk):
      return self._cache[1]
    got = self.shards.gather(self.chunk_indices(epoch, chunk))
    (in_flat, in_lens), (tg_flat, tg_lens) = got['inputs'], got['targets']
    if len(in_lens) and (in_lens.max() > self.inputs_length or tg_lens.max() > self.targets_length):
      raise ValueError(
        f'prepared examples are longer ({int(in_lens.max())}/{int(tg_lens.max())} tokens) than the '
        f'packed rows ({self.inputs_length}/{self.targets_length}); raise packed_*_length'
      )
    rows = packing.pack_flat(
      in_flat, in_lens, tg_flat, tg_lens, self.inputs_length, self.targets_length, max_open_rows=self.max_open_rows
    )
    self._cache = ((epoch, chunk), rows)
    return rows

  def epoch_rows(self, epoch: int):
    """Every packed row of one epoch, chunk by chunk (tests: an epoch holds every example exactly once)."""
    for chunk in range(self.chunks_per_epoch):
      yield self.chunk_rows(epoch, chunk)

  def _next_batch(self, position: tuple[int, int, int]) -> tuple[Batch, tuple[int, int, int]]:
    epoch, chunk, row = position
    parts: list[Batch] = []
    need = self.batch_size
    while need:
      rows = self.chunk_rows(epoch, chunk)
      n = rows['inputs'].shape[0]
      take = min(need, n - row)
      if take > 0:
        parts.append({k: v[row : row + take] for k, v in rows.items()})
        need -= take
        row += take
      if row >= n:
        epoch, chunk, row = (epoch, chunk + 1, 0) if chunk + 1 < self.chunks_per_epoch else (epoch + 1, 0, 0)
    batch = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {k: np.ascontiguousarray(v) for k, v in batch.items()}, (epoch, chunk, row)

  # -- prefetch thread -------------------------------------------------------------------------------------------------
  def _start(self) -> None:
    q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
    stop = threading.Event()
    position = self._position

    def produce():
      pos = position
      try:
        while not stop.is_set():
          item = self._next_batch(pos)
          pos = item[1]
          while not stop.is_set():
            try:
              q.put(item, timeout=0.1)
              break
            except queue.Full:
              continue
      except BaseException as e:
        q.put(e)

    self._queue, self._stop = q, stop
    self._thread = threading.Thread(target=produce, name='train-stream', daemon=True)
    self._thread.start()

  def close(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = self._queue = self._stop = None

  def __del__(self):
    try:
      if self._stop is not None:
        self._stop.set()
    except Exception:
      pass

  # -- iteration -------------------------------------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self.prefetch <= 0:
      batch, self._position = self._next_batch(self._position)
    else:
      if self._thread is None:
        self._start()
      item = self._queue.get()
      if isinstance(item, BaseException):
        self.close()
        raise item
      batch, self._position = item
    self._step += 1
    return batch

  # -- state -----------------------------------------------------------------------------------------------------------
  @property
  def step(self) -> int:
    return self._step

  @property
  def position(self) -> tuple[int, int, int]:
    return self._position

  def get_state(self) -> dict[str, Any]:
    mine = [int(x) for x in self._position]
    if self.process_count == 1:
      positions = [mine]
    else:
      gather = self._gather_states
      if gather is None:
        gather = parallel.allgather_objects
      positions = [list(map(int, p)) for p in gather(mine)]
    return {
      'format': STATE_FORMAT,
      'step': int(self._step),
      'positions': positions,
      'num_examples': int(self.total_examples),
      'chunk_examples': self.chunk_examples,
      'seed': self.seed,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Positions the stream where get_state() was taken (on every process, from the same dict)."""
    if state.get('format') != STATE_FORMAT:
      if 'step' in state:  # an epoch/batch/step state: it holds no row position to map to
        logging.warning(
          'Data state %s holds no stream position; the stream restarts at epoch 0 (the batches '
          'after this resume differ from an uninterrupted run)',
          dict(state),
        )
        self.close()
        self._position, self._step, self._cache = (0, 0, 0), int(state['step']), None
        return
      raise ValueError(f'invalid data state {dict(state)}')
    for key, mine in (
      ('num_examples', self.total_examples),
      ('chunk_examples', self.chunk_examples),
      ('seed', self.seed),
    ):
      if int(state[key]) != mine:
        raise ValueError(
          f"the checkpoint's data position is for {key}={state[key]}, this run has {mine}: "
          'the training data changed since the checkpoint'
        )
    positions = state['positions']
    if len(positions) != self.process_count:
      raise ValueError(
        f"the checkpoint's data position is for {len(positions)} processes, this run has {self.process_count}"
      )
    epoch, chunk, row = (int(x) for x in positions[self.process_index])
    if epoch < 0 or not 0 <= chunk < self.chunks_per_epoch or row < 0:
      raise ValueError(f'invalid data position {positions[self.process_index]}')
    self.close()
    self._position, self._step = (epoch, chunk, row), int(state['step'])
