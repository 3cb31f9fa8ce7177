"""Text pairs -> token ids -> packed rows -> batches, per process.

build_datasets streams the training split from prepared shards (data/prepare.py, data/stream.py: a seeded
index shuffle, so the position after any step is a few ints and resume is exact) and keeps the held-out split in
memory: tokenized in order and packed into a fixed list of batches (eval_batches), so every evaluation sees the same
rows.
"""

from __future__ import annotations

import dataclasses
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
  train: Any  # stream.TrainStream: next(), get_state(), set_state()
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
