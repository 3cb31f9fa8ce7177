"""Language-model data: documents -> SentencePiece ids + EOS -> chunks of at most max_length -> packed rows.

Sources (config.dataset):
  pystdlib          the running interpreter's standard library .py files (sysconfig.get_paths()['stdlib']; test
                    suites, idlelib, lib2to3, site-packages and the like left out): real text every machine with
                    Python has. One document per file.
  text:DIR_OR_GLOB  local text files, one document per file (a directory is read recursively).
  tfds:NAME         a TFDS dataset's `config.text_feature` (default 'text'), one document per example (lm1b: one
                    sentence each); its own splits are used as they are.
For pystdlib and text:, the held-out split is a fixed hash of each file's path relative to the root: a file with
int(sha256(path)[:8], 16) % 100 < config.eval_percent is held out (split config.eval_split), every other file is
training text, so a held-out file is never trained on, on any machine.

Training stream: every document is tokenized, EOS appended, cut into chunks of at most max_length tokens (each
chunk a packed segment, positions restarting at 0, so the model starts it from BOS); epoch e permutes the chunks
with np.random.default_rng((seed, e)) and packs them first-fit into rows; every epoch yields the number of full
batches of epoch 0, so the position is a function of the step alone and resume needs only the step. Each process
packs its own documents (every process_count-th, sorted by path).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig
import time
from typing import Any

from absl import logging
import numpy as np

from transformer_jax.storage import layout as layout_lib
from transformer_jax.data import packing
from transformer_jax.data import tensorflow_cpu
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.data.tokenizer import EOS_ID

Batch = dict[str, np.ndarray]
KEYS = ('targets', 'targets_segmentation', 'targets_position')

# Left out of pystdlib: test suites (much of it generated or deliberately odd), the IDLE GUI, the deprecated 2to3
# grammar tools, and anything installed rather than shipped with Python.
_STDLIB_EXCLUDED_DIRS = frozenset(
  (
    'test',
    'tests',
    'idle_test',
    'idlelib',
    'lib2to3',
    'site-packages',
    'dist-packages',
    '__pycache__',
    'turtledemo',
    'ensurepip',
  )
)

# SentencePiece for text where whitespace matters (code): no normalization, no whitespace folding, no dummy space
# prefix, byte fallback for characters it never saw, newline a piece of its own (training sees text line by line),
# runs of spaces (indentation) allowed as pieces. Decoding then gives back the input exactly.
LM_TOKENIZER_OPTIONS = dict(
  normalization_rule_name='identity',
  remove_extra_whitespaces=False,
  add_dummy_prefix=False,
  byte_fallback=True,
  user_defined_symbols=['\n'],
  allow_whitespace_only_pieces=True,
  split_by_whitespace=True,
  character_coverage=0.9995,
)  # rare characters: bytes, not pieces of their own


# ---------------------------------------------------------------------------------------------
# Documents.
# ---------------------------------------------------------------------------------------------
def is_held_out(relative_path: str, eval_percent: float) -> bool:
  return int(hashlib.sha256(relative_path.encode('utf-8')).hexdigest()[:8], 16) % 100 < eval_percent


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
  """(relative path, absolute path) of the standard library's .py files, sorted, exclusions applied."""
  root = root or sysconfig.get_paths()['stdlib']
  out = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith('.'))
    for name in files:
      if name.endswith('.py') and not name.startswith('test_'):
        path = os.path.join(directory, name)
        out.append((os.path.relpath(path, root), path))
  return sorted(out)


def _text_files(spec: str) -> list[tuple[str, str]]:
  if os.path.isdir(spec):
    root = spec
    paths = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files]
  else:
    root = os.path.dirname(spec.split('*')[0].split('?')[0].split('[')[0]) or '.'
    paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise ValueError(f'text:{spec}: no files (a directory, or a glob of files, one document per file)')
  return sorted((os.path.relpath(p, root), p) for p in paths)


def _read(path: str) -> str | None:
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except (UnicodeDecodeError, OSError):
    return None


def _split_files(files: list[tuple[str, str]], split: str, eval_split: str, eval_percent: float) -> list[str]:
  held_out = split == eval_split
  docs = []
  for rel, path in files:
    if is_held_out(rel, eval_percent) == held_out:
      text = _read(path)
      if text and text.strip():
        docs.append(text)
  return docs


def _load_tfds(name: str, split: str, feature: str, data_dir: str | None, max_documents: int | None) -> list[str]:
  tfds = tensorflow_cpu.tensorflow_datasets()
  ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
  if feature not in ds.element_spec:
    raise ValueError(f'tfds:{name} has features {sorted(ds.element_spec)}, no {feature!r} (config.text_feature)')
  ds = ds.map(lambda ex: ex[feature])
  if max_documents is not None:
    ds = ds.take(max_documents)
  return [t.decode('utf-8', errors='replace') for t in ds.as_numpy_iterator()]


def load_documents(config, split: str) -> list[str]:
  """Every document of `split` (all processes see the same list; sharding happens after)."""
  dataset = str(config.dataset)
  kind, _, rest = dataset.partition(':')
  eval_percent = float(config.get('eval_percent', 5))
  max_docs = config.get('max_eval_documents' if split == config.eval_split else 'max_train_documents')
  if dataset == 'pystdlib':
    docs = _split_files(stdlib_files(config.get('stdlib_dir')), split, config.eval_split, eval_percent)
  elif kind == 'text' and rest:
    docs = _split_files(_text_files(rest), split, config.eval_split, eval_percent)
  elif kind == 'tfds' and rest:
    return _load_tfds(rest, split, config.get('text_feature', 'text'), config.get('data_dir'), max_docs)
  else:
    raise ValueError(f'unknown language-model dataset {dataset!r}; supported: pystdlib, text:DIR_OR_GLOB, tfds:NAME')
  if split not in (config.train_split, config.eval_split):
    raise ValueError(f'{dataset}: split {split!r} is neither train_split nor eval_split')
  return docs if max_docs is None else docs[: int(max_docs)]


# ---------------------------------------------------------------------------------------------
# Tokens -> chunks -> rows.
# ---------------------------------------------------------------------------------------------
def tokenize_documents(tokenizer: tokenizer_lib.Tokenizer, docs: list[str], max_length: int) -> list[np.ndarray]:
  """Each document's ids + EOS, cut into chunks of at most max_length tokens (in document order)."""
  chunks = []
  for ids in tokenizer.encode_batch(docs):
    ids = np.asarray(ids + [EOS_ID], np.int32)
    chunks.extend(ids[i : i + max_length] for i in range(0, len(ids), max_length))
  return chunks


def pack_chunks(chunks: list[np.ndarray], length: int, max_open_rows: int = 64) -> Batch:
  """First-fit packing (data/packing.py's placement) of single token sequences into rows of `length`."""
  lens = np.fromiter((len(c) for c in chunks), np.int64, count=len(chunks))
  row, offset, _, seg, num_rows = packing._place(lens, lens, length, length, max_open_rows)
  tokens, segmentation, position = packing._fill(chunks, lens, row, offset, seg, num_rows, length)
  return {'targets': tokens, 'targets_segmentation': segmentation, 'targets_position': position}


class LMTrainIterator:
  """Infinite, deterministic stream of this process's packed LM batches; state = the step (see module doc)."""

  def __init__(self, chunks: list[np.ndarray], *, batch_size: int, length: int, seed: int):
    if not chunks:
      raise ValueError('LMTrainIterator: no training text')
    self._chunks, self.batch_size, self.length, self.seed = chunks, int(batch_size), int(length), int(seed)
    first = self._pack(0)
    self.rows_per_epoch_0 = first['targets'].shape[0]
    self.batches_per_epoch = self.rows_per_epoch_0 // self.batch_size
    if self.batches_per_epoch < 1:
      raise ValueError(
        f'the training text packs into {self.rows_per_epoch_0} rows, fewer than one batch of '
        f'{self.batch_size}; use more text or a smaller batch'
      )
    self.packing_efficiency = float(np.count_nonzero(first['targets_segmentation'])) / first['targets'].size
    self._epoch_data = {0: self._cut(first)}
    self._epoch = self._batch = 0

  def _pack(self, epoch: int) -> Batch:
    order = np.random.default_rng((self.seed, epoch)).permutation(len(self._chunks))
    return pack_chunks([self._chunks[i] for i in order], self.length)

  def _cut(self, packed: Batch) -> Batch:
    # Epoch 0 fixes the epoch length; later epochs are cut to it or repeat their own first rows.
    need = self.batches_per_epoch * self.batch_size
    idx = np.arange(need) % packed['targets'].shape[0]
    return {k: v[idx] for k, v in packed.items()}

  def _get(self, epoch: int) -> Batch:
    if epoch not in self._epoch_data:
      self._epoch_data = {epoch: self._cut(self._pack(epoch))}
    return self._epoch_data[epoch]

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    data = self._get(self._epoch)
    lo = self._batch * self.batch_size
    batch = {k: v[lo : lo + self.batch_size] for k, v in data.items()}
    self._batch += 1
    if self._batch == self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    return batch

  @property
  def step(self) -> int:
    return self._epoch * self.batches_per_epoch + self._batch

  def get_state(self) -> dict[str, int]:
    return {'epoch': int(self._epoch), 'batch': int(self._batch), 'step': int(self.step)}

  def set_state(self, state: dict[str, Any]) -> None:
    if 'step' not in state or int(state['step']) < 0:
      raise ValueError(f'iterator state needs a non-negative step, got {dict(state)}')
    self._epoch, self._batch = divmod(int(state['step']), self.batches_per_epoch)


@dataclasses.dataclass
class LMDatasets:
  tokenizer: tokenizer_lib.Tokenizer
  train: LMTrainIterator
  eval_rows: Batch  # every held-out chunk packed in order (all processes: the same rows)
  eval_tokens: int  # real target tokens (EOS included) of the held-out split
  eval_bytes: int  # UTF-8 bytes of the held-out text: bits per byte = nats / eval_bytes / ln 2
  eval_documents: list[str]
  process_index: int = 0
  process_count: int = 1
  eval_pairs: list = dataclasses.field(default_factory=list)  # no translations to score (no BLEU)

  def eval_batches(
    self, *, batch_size: int, targets_length: int = 0, inputs_length: int = 0, num_batches: int | None = None
  ) -> list[Batch]:
    """This process's share (every process_count-th row) in batches; the last padded with all-zero rows."""
    del targets_length, inputs_length  # rows were packed at max_length
    rows = {k: v[self.process_index :: self.process_count] for k, v in self.eval_rows.items()}
    n = -(-rows['targets'].shape[0] // batch_size)
    n = max(n, num_batches or 0)
    out = []
    for b in range(n):
      batch = {}
      for k, v in rows.items():
        part = v[b * batch_size : (b + 1) * batch_size]
        batch[k] = np.concatenate([part, np.zeros((batch_size - part.shape[0], v.shape[1]), v.dtype)])
      out.append(batch)
    return out


def build_datasets(
  config, workdir: str | layout_lib.WorkdirLayout, *, process_index: int = 0, process_count: int = 1
) -> LMDatasets:
  start = time.time()
  if config.batch_size % process_count:
    raise ValueError(f'batch_size {config.batch_size} is not divisible by the number of processes {process_count}')
  length = int(config.max_length)
  train_docs = load_documents(config, config.train_split)
  eval_docs = load_documents(config, config.eval_split)
  if not train_docs:
    raise ValueError(f'{config.dataset} split {config.train_split!r} has no documents')

  max_lines = int(config.get('tokenizer_train_sentences', 200_000))

  def lines():  # every k-th line of the training text, so the sample spans every file, not the first few
    every = [line for doc in train_docs for line in doc.splitlines() if line.strip()]
    return every[:: max(1, len(every) // max_lines)]

  tokenizer = tokenizer_lib.load_or_train_tokenizer(
    layout_lib.of(workdir).tokenizer,
    lines,
    int(config.model.vocab_size),
    is_chief=process_index == 0,
    max_sentences=max_lines,
    train_options=LM_TOKENIZER_OPTIONS,
  )
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
      f'tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is {config.model.vocab_size}; '
      f'delete {tokenizer.model_path} or raise vocab_size'
    )
  train_chunks = tokenize_documents(tokenizer, train_docs[process_index::process_count], length)
  eval_chunks = tokenize_documents(tokenizer, eval_docs, length)
  eval_rows = pack_chunks(eval_chunks, length) if eval_chunks else {k: np.zeros((0, length), np.int32) for k in KEYS}
  train = LMTrainIterator(
    train_chunks, batch_size=config.batch_size // process_count, length=length, seed=int(config.seed)
  )
  data = LMDatasets(
    tokenizer=tokenizer,
    train=train,
    eval_rows=eval_rows,
    eval_tokens=int(sum(len(c) for c in eval_chunks)),
    eval_bytes=sum(len(d.encode('utf-8')) for d in eval_docs),
    eval_documents=eval_docs,
    process_index=process_index,
    process_count=process_count,
  )
  logging.info(
    'LM data %s: %d train / %d held-out documents; %d train chunks -> %d rows of %d (packing %.3f), '
    '%d batches per epoch; held-out %d tokens, %d bytes; %.1f s',
    config.dataset,
    len(train_docs),
    len(eval_docs),
    len(train_chunks),
    train.rows_per_epoch_0,
    length,
    train.packing_efficiency,
    train.batches_per_epoch,
    data.eval_tokens,
    data.eval_bytes,
    time.time() - start,
  )
  return data
